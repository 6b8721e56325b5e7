"""What one training step computes and where its gradients go, checked against the official definitions."""

import math

import pytest
import torch
import torch.nn as nn

import utils.training.losses.synq as synq
from utils.models import build_teacher
from utils.runs.config import load_options
from utils.training.losses import NonFiniteLossError, kd_loss
from utils.training.losses.synq import lowpass
from utils.training.trainer import LOSS_NAMES, Trainer

from ..conftest import CIFAR10_CONF


def make_trainer(tmp_path, *sets, seed=0):
    options = load_options(CIFAR10_CONF, ["batchSize=6", "iters_per_epoch=2", "warmup_epochs=0", "quant_impl=eager",
                                          *sets])
    torch.manual_seed(seed)
    teacher, _ = build_teacher(options.network, "random")
    return Trainer(options, teacher, None, torch.device("cpu"), str(tmp_path), {"id": 0, "seed": 1})


def hand_entropy(logits):
    p = torch.exp(logits) / torch.exp(logits).sum(dim=1, keepdim=True)
    return -(p * torch.log(p)).sum(dim=1)


def hand_cross_entropy(logits, labels):
    log_p = logits - torch.log(torch.exp(logits).sum(dim=1, keepdim=True))
    return -log_p[torch.arange(len(labels)), labels].mean()


class StepRecorder:
    """Records the logits, labels and teacher BatchNorm inputs of the next step."""

    def __init__(self, trainer):
        self.bn_inputs = []
        self.handles = [trainer.teacher.register_forward_hook(lambda m, i, o: setattr(self, "teacher", o.detach())),
                        trainer.student.register_forward_hook(lambda m, i, o: setattr(self, "student", o.detach()))]
        self.handles += [m.register_forward_hook(lambda m, i, o: self.bn_inputs.append((m, i[0].detach())))
                         for m in trainer.teacher.modules() if isinstance(m, nn.BatchNorm2d)]
        sample = trainer.sample_noise

        def recording_sample():
            z, labels = sample()
            self.labels = labels
            return z, labels

        trainer.sample_noise = recording_sample


def test_recorded_losses_follow_the_official_definitions(tmp_path):
    sets = ("beta=0.7", "gamma=1.3", "lambda_l=0.2", "lambda_u=0.6", "alpha_ds=0.3", "alpha_as=0.15",
            "temperature=4")
    trainer = make_trainer(tmp_path, *sets)
    o = trainer.options
    seen = StepRecorder(trainer)
    values = dict(zip(trainer.loss_names, trainer.step(train_student=True).tolist()))
    t, s, y = seen.teacher.double(), seen.student.double(), seen.labels

    h = hand_entropy(t - s)
    h_norm = (h - h.min()) / (math.log(o.nClasses) - h.min())
    marginal = (torch.clamp(o.lambda_l - h_norm, min=0).mean() + torch.clamp(h_norm - o.lambda_u, min=0).mean())
    onehot = o.alpha_ds * hand_cross_entropy(t - s, y) + o.alpha_as * hand_cross_entropy(t + s, y)
    bn_layers = [(m, x.double()) for m, x in seen.bn_inputs]
    bns = sum(((x.mean(dim=(0, 2, 3)) - m.running_mean.double()) ** 2).mean()
              + ((x.var(dim=(0, 2, 3), unbiased=False) - m.running_var.double()) ** 2).mean()
              for m, x in bn_layers) / len(bn_layers)
    loss_S = -o.temperature ** 2 * hand_entropy((t - s) / o.temperature).mean()

    assert len(bn_layers) == 21  # 19 after convolutions, 2 in the projection shortcuts
    assert values["marginal"] == pytest.approx(marginal.item(), rel=1e-5, abs=1e-6)
    assert values["onehot"] == pytest.approx(onehot.item(), rel=1e-5)
    assert values["bns"] == pytest.approx(bns.item(), rel=1e-4)
    assert values["loss_G"] == pytest.approx((marginal + o.beta * onehot + o.gamma * bns).item(), rel=1e-4)
    assert values["loss_S"] == pytest.approx(loss_S.item(), rel=1e-5)
    assert values["kd"] == values["loss_S"]
    assert values["teacher_acc"] == (t.argmax(1) == y).float().mean().item()  # recorded in float32
    # The hand-computed marginal term is not degenerate: swapping the bounds would change it.
    swapped = torch.clamp(o.lambda_u - h_norm, min=0).mean() + torch.clamp(h_norm - o.lambda_l, min=0).mean()
    assert swapped.item() != pytest.approx(marginal.item(), rel=1e-3)


def test_student_loss_reaches_no_generator_parameter(tmp_path):
    trained = make_trainer(tmp_path / "a")
    reference = make_trainer(tmp_path / "b")
    # The reference: the same step with the student frozen, so only loss_G can produce gradients.
    reference.student.requires_grad_(False)
    generator0 = {k: v.clone() for k, v in trained.generator.state_dict().items()}
    student0 = {k: v.clone() for k, v in trained.student.state_dict().items()}
    for trainer, train_student in ((trained, True), (reference, False)):
        torch.manual_seed(5)  # the same noise and labels
        trainer.step(train_student=train_student)
    for (name, param), ref in zip(trained.generator.named_parameters(), reference.generator.parameters()):
        assert torch.equal(param.grad, ref.grad), name
        assert torch.equal(param, ref), name
    assert any(not torch.equal(v, generator0[k]) for k, v in trained.generator.state_dict().items())
    assert any(not torch.equal(v, student0[k]) for k, v in trained.student.state_dict().items())


def test_no_student_parameter_moves_during_warm_up(tmp_path):
    trainer = make_trainer(tmp_path, "warmup_epochs=1", "nEpochs=2")
    student0 = {k: v.clone() for k, v in trainer.student.state_dict().items()}
    trainer.train_epoch(0)
    assert all(torch.equal(v, student0[k]) for k, v in trainer.student.state_dict().items())
    assert all(p.grad is None for p in trainer.student.parameters())


def test_cosine_schedules_decay_per_iteration_over_each_networks_training(tmp_path):
    trainer = make_trainer(tmp_path, "lrPolicy_S=cosine", "lrPolicy_G=cosine", "warmup_epochs=1", "nEpochs=3",
                           "iters_per_epoch=2", "lr_S=0.4", "lr_G=0.8")
    seen = []
    rates = lambda: (trainer.opt_S.param_groups[0]["lr"], trainer.opt_G.param_groups[0]["lr"])  # noqa: E731
    trainer.step = lambda train_student=True: seen.append(rates()) or torch.zeros(len(trainer.loss_names))
    for epoch in range(3):
        trainer.train_epoch(epoch)
    # The student trains 4 iterations (epochs 2-3), the generator 6: base * (1 + cos(pi * done / total)) / 2.
    student = [0.4] * 2 + [0.4 * (1 + math.cos(math.pi * k / 4)) / 2 for k in range(4)]
    generator = [0.8 * (1 + math.cos(math.pi * k / 6)) / 2 for k in range(6)]
    assert seen == pytest.approx(list(zip(student, generator)))


ALL_TERMS = "student_losses=[kd, attention, cam, reliable_ce, pseudo_label]"


def test_student_terms_sum_into_loss_s_and_are_recorded_by_name(tmp_path):
    trainer = make_trainer(tmp_path, ALL_TERMS, "student_input_filter=lowpass")
    terms = ("kd", "attention", "cam", "reliable_ce", "pseudo_label")
    assert trainer.loss_names == LOSS_NAMES + terms + ("lowpass_kept",)
    values = dict(zip(trainer.loss_names, trainer.step(train_student=True).tolist()))
    assert values["loss_S"] == pytest.approx(sum(values[name] for name in terms), rel=1e-5)
    assert all(values[name] != 0 for name in terms)
    assert 0 < values["lowpass_kept"] < 1


class Calls:
    """Inputs and outputs of every forward pass of a model."""

    def __init__(self, model):
        self.inputs, self.outputs = [], []
        model.register_forward_hook(self.record)

    def record(self, module, inputs, output):
        self.inputs.append(inputs[0].detach())
        self.outputs.append(output.detach())


def test_filtered_images_feed_the_teacher_and_the_student_for_the_students_loss(tmp_path):
    trainer = make_trainer(tmp_path, "student_input_filter=lowpass", "temperature=4")
    teacher, student = Calls(trainer.teacher), Calls(trainer.student)
    values = dict(zip(trainer.loss_names, trainer.step(train_student=True).tolist()))
    # first the generated images (the generator's losses), then the filtered ones (the student's)
    assert len(teacher.inputs) == len(student.inputs) == 2
    filtered = lowpass(teacher.inputs[0], trainer.options)
    assert not torch.allclose(filtered, teacher.inputs[0], atol=1e-3)
    for calls in (teacher, student):
        assert torch.equal(calls.inputs[0], teacher.inputs[0])
        assert torch.allclose(calls.inputs[1], filtered, atol=1e-6)
    assert values["kd"] == pytest.approx(kd_loss(teacher.outputs[1], student.outputs[1], 4).item(), rel=1e-5)
    assert values["kd"] != pytest.approx(kd_loss(teacher.outputs[0], student.outputs[0], 4).item(), rel=1e-3)
    assert values["lowpass_kept"] == pytest.approx(
        (filtered.square().sum() / teacher.inputs[0].square().sum()).item(), rel=1e-4)


def hooked(model):
    return {name for name, module in model.named_modules() if module._forward_hooks}


def test_layers_are_hooked_by_name_on_both_networks_only_when_a_term_reads_them(tmp_path):
    plain = make_trainer(tmp_path / "a")
    assert hooked(plain.student) == set() and not plain.features.layers
    attention = make_trainer(tmp_path / "b", "student_losses=[kd, attention, cam]")
    blocks = {f"features.stage{s}.unit{u}" for s in (1, 2, 3) for u in (1, 2, 3)}
    expected = blocks | {"features.stage3.unit3.body.conv2.conv"}
    assert hooked(attention.student) == expected
    assert expected <= hooked(attention.teacher)
    attention.features.remove()
    assert hooked(attention.student) == set()


def test_a_non_finite_cam_stops_the_run_naming_cam(tmp_path, monkeypatch):
    trainer = make_trainer(tmp_path, "student_losses=[kd, cam]", "log_interval=1")
    real = synq.grad_cam
    monkeypatch.setattr(synq, "grad_cam", lambda features, logits, size: real(features, logits, size) * float("nan"))
    with pytest.raises(NonFiniteLossError, match="loss cam became nan at epoch 1, iteration 1"):
        trainer.train_epoch(0)


def test_student_progress_runs_over_the_epochs_after_warm_up(tmp_path):
    trainer = make_trainer(tmp_path, "warmup_epochs=1", "nEpochs=3", "iters_per_epoch=2")
    seen = []
    for trainer.epoch in range(3):
        for trainer.iteration in range(2):
            seen.append(trainer.student_progress())
    assert seen == [0, 0, 0, 0.25, 0.5, 0.75]
