"""The fast GranQ path: equal values and gradient to eager, few compilations, a clean fallback.

Compiling takes seconds, so every test shares one compiled function (the ``compiled_granq`` fixture, the
process-wide instance that ``quant_impl = compiled`` uses) and keeps tensors small. Where torch.compile
does not work, the tests of the compiled path skip with the reason and the fallback tests still run.
"""

import copy
import logging
import pickle

import pytest
import torch
import torch.nn as nn

import quantization_utils.fused as fused
from quantization_utils import (
    ActQuant,
    CompiledGranQ,
    QuantAct,
    QuantConv2d,
    QuantLinear,
    StudentSpec,
    WeightQuant,
    granq_fake_quant,
    granq_function,
    quant_path,
    quantize_model,
    weight_fake_quant,
    weight_function,
)
from quantization_utils.functional import grouped_values, quant_params


@pytest.fixture(scope="module")
def compiled_granq():
    granq = granq_function("compiled")
    try:
        granq(torch.randn(3, 5, 4, 4), 4)
    except RuntimeError as error:
        pytest.skip(f"torch.compile does not work here: {error}")
    return granq


SHAPES = [(4, 8, 5, 5), (16, 3, 7, 7), (6, 33), (2, 64, 4, 4), (9, 16, 8, 8), (3, 5, 1, 1), (5, 1)]


@pytest.mark.parametrize("bits", range(2, 9))
def test_compiled_equals_eager_over_shapes_and_batch_sizes(compiled_granq, bits):
    generator = torch.Generator().manual_seed(bits)
    for shape in SHAPES + [(batch, 16, 6, 6) for batch in (1, 2, 5, 17)] + [(batch, 10) for batch in (2, 7)]:
        x = torch.randn(shape, generator=generator) * 3 + 0.5
        assert torch.equal(compiled_granq(x, bits), granq_fake_quant(x, bits)), shape


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_compiled_equals_eager_on_hard_rows(compiled_granq, bits):
    x = torch.randn(4, 6, 5, 5)
    x[:, 1] = 2.5  # constant rows: zero span
    x[0, 3] = -7.0
    x[1, 2] = -torch.rand(5, 5) * 4 - 1  # all negative
    x[2, 4] = torch.arange(25.0).view(5, 5) / 24 * (2**bits - 1)  # values exactly on the grid and halfway
    x[3] = x[3].relu()  # post-ReLU rows with zeros
    assert torch.equal(compiled_granq(x, bits), granq_fake_quant(x, bits))


def test_compiled_on_non_contiguous_input(compiled_granq):
    x = torch.randn(6, 8, 5, 5)
    for view in (x[:, ::2], x.transpose(2, 3), x.to(memory_format=torch.channels_last)):
        assert torch.equal(compiled_granq(view, 3), granq_fake_quant(view, 3))


@pytest.mark.parametrize("granularity", ["kernel", "channel"])
def test_compiled_weights_equal_eager(compiled_granq, granularity):
    generator = torch.Generator().manual_seed(0)
    for shape in [(16, 16, 3, 3), (32, 16, 3, 3), (64, 32, 1, 1), (10, 64), (8, 3, 5, 5)]:
        w = torch.randn(shape, generator=generator) * 0.1
        layouts = [w] + ([w.to(memory_format=torch.channels_last)] if w.dim() == 4 else [])
        for bits in (2, 3, 4, 8):
            for weight in layouts:
                expected = weight_fake_quant(weight, bits, granularity)
                assert torch.equal(compiled_granq.weight(weight, bits, granularity), expected), (shape, bits)
    w = torch.randn(8, 4, 3, 3, requires_grad=True)
    upstream = torch.randn(8, 4, 3, 3)
    (compiled_granq.weight(w, 3, granularity) * upstream).sum().backward()
    assert torch.equal(w.grad, upstream)


def test_compiled_gradient_is_straight_through(compiled_granq):
    x = torch.randn(4, 6, 5, 5, requires_grad=True)
    upstream = torch.randn(4, 6, 5, 5)
    (compiled_granq(x, 3) * upstream).sum().backward()
    assert torch.equal(x.grad, upstream)
    # the same graph position as eager: the result depends on x, ranges carry no gradient
    y = compiled_granq(x, 3)
    assert y.requires_grad and y.grad_fn is not None


def test_compiled_under_no_grad_keeps_no_graph(compiled_granq):
    x = torch.randn(2, 4, 3, 3, requires_grad=True)
    with torch.no_grad():
        y = compiled_granq(x, 3)
    assert not y.requires_grad
    assert torch.equal(y, granq_fake_quant(x.detach(), 3))


def test_new_shapes_do_not_recompile(compiled_granq):
    """Batch size, channels and resolution change without a new compilation (sizes kept apart and > 8)."""
    from torch._dynamo.utils import counters

    compiled_granq(torch.randn(12, 16, 10, 10), 3)  # may compile the 2-D row pattern once
    before = counters["stats"]["unique_graphs"]
    for shape in [(13, 16, 10, 10), (20, 32, 12, 12), (200, 64, 9, 9), (11, 24, 14, 14)]:
        x = torch.randn(shape)
        assert torch.equal(compiled_granq(x, 3), granq_fake_quant(x, 3))
    assert counters["stats"]["unique_graphs"] == before


def test_argument_errors_are_not_compiler_failures(compiled_granq):
    with pytest.raises(ValueError, match=r"\[N, C, H, W\] or \[N, F\]"):
        compiled_granq(torch.randn(2, 3, 4), 4)
    with pytest.raises(ValueError, match="bits must be an integer"):
        compiled_granq(torch.randn(2, 3), 9)
    assert compiled_granq.uses_compiled


# --------------------------------------------------------------------------------------- fallback
def failing_compiler(fn):
    raise RuntimeError("simulated: no working C++ compiler")


def compiler_failing_on_call(fn):
    """Like torch.compile: wrapping succeeds, the first call fails (that is when Inductor compiles)."""

    def compiled(*args):
        raise OSError("simulated: compilation failed at the first call")

    return compiled


def wrong_compiler(fn):
    """A compiler that changes the arithmetic: multiplies by the reciprocal instead of dividing."""

    def compiled(groups, bits):
        lo, hi = torch.aminmax(groups, dim=1, keepdim=True)
        scale = (2**bits - 1) / torch.clamp(hi - lo, min=1e-8)
        zero_point = torch.round(scale * lo) + 2 ** (bits - 1)
        return (torch.round(scale * groups - zero_point) + zero_point) * (1 / scale)

    return compiled


@pytest.mark.parametrize("compiler", [failing_compiler, compiler_failing_on_call])
def test_auto_falls_back_to_eager_once(compiler, caplog):
    calls = []
    granq = CompiledGranQ(strict=False, compiler=lambda fn: calls.append(fn) or compiler(fn))
    x = torch.randn(3, 4, 5, 5, requires_grad=True)
    with caplog.at_level(logging.WARNING, logger="quantization_utils.fused"):
        y = granq(x, 3)
    assert torch.equal(y, granq_fake_quant(x, 3))
    assert not granq.uses_compiled and "simulated" in granq.failure
    assert "using the eager one" in caplog.text and "simulated" in caplog.text
    # eager from then on, gradient included; the compiler is not tried again
    upstream = torch.randn_like(x)
    (granq(x, 3) * upstream).sum().backward()
    assert torch.equal(x.grad, upstream)
    granq(torch.randn(2, 7), 5)
    granq.weight(torch.randn(4, 3, 3, 3), 3)
    assert len(calls) == 1
    assert "eager fallback" in repr(granq)


@pytest.mark.parametrize("compiler", [failing_compiler, compiler_failing_on_call])
def test_compiled_raises_when_compilation_fails(compiler):
    granq = CompiledGranQ(strict=True, compiler=compiler)
    with pytest.raises(RuntimeError, match="quant_impl = compiled, but the compiled GranQ quantizer failed"):
        granq(torch.randn(2, 3, 4, 4), 3)


def test_values_that_differ_from_eager_are_caught(caplog):
    x = torch.randn(64, 8, 6, 6) * 3
    wrong = wrong_compiler(None)(x.reshape(512, 36), 3).view(x.shape)
    assert not torch.equal(wrong, granq_fake_quant(x, 3))  # the simulated compiler really is wrong here
    auto = CompiledGranQ(strict=False, compiler=wrong_compiler)
    with caplog.at_level(logging.WARNING, logger="quantization_utils.fused"):
        assert torch.equal(auto(x, 3), granq_fake_quant(x, 3))
    assert "differ from the eager formula" in auto.failure
    with pytest.raises(RuntimeError, match="differ from the eager formula"):
        CompiledGranQ(strict=True, compiler=wrong_compiler)(x, 3)


def same_compiler(fn):
    """A compiler that changes nothing: the compiled path with eager's own arithmetic."""
    return fn


def compiler_wrong_on_rows_from_zero(fn):
    """Wrong by one unit in the last place, only on rows whose minimum is 0: post-ReLU activations, never weights."""

    def compiled(groups, bits):
        y = fn(groups, bits)
        from_zero = groups.amin(dim=1, keepdim=True) == 0
        return torch.where(from_zero, torch.nextafter(y, torch.full_like(y, torch.inf)), y)

    return compiled


def compiler_rounding_half_away(fn):
    """The right formula, but ties of round() go away from zero instead of to the even neighbour."""

    def compiled(groups, bits):
        lo, hi = torch.aminmax(groups, dim=1, keepdim=True)
        scale, zero_point = quant_params(lo, hi, bits)
        scaled = scale * groups - zero_point
        return (torch.sign(scaled) * torch.floor(scaled.abs() + 0.5) + zero_point) / scale

    return compiled


def test_first_calls_are_checked_per_role():
    """With qw = qa, a kernel weight and an activation share rank, grouping, layout, bits, dtype and device:
    the activation still gets its own first-call check."""
    granq = CompiledGranQ(strict=False, compiler=compiler_wrong_on_rows_from_zero)
    w = torch.randn(16, 16, 3, 3) * 0.1
    assert torch.equal(granq.weight(w, 4), weight_fake_quant(w, 4))
    assert granq.uses_compiled and {key[0] for key in granq._verified} == {"kernel weight"}
    x = torch.randn(4, 16, 8, 8).relu()
    assert torch.equal(granq(x, 4), granq_fake_quant(x, 4))
    assert "differ from the eager formula" in granq.failure and "activation" in granq.failure
    with pytest.raises(RuntimeError, match="differ from the eager formula.*activation"):
        strict = CompiledGranQ(strict=True, compiler=compiler_wrong_on_rows_from_zero)
        strict.weight(w, 4)
        strict(x, 4)


def test_first_call_keys_name_the_role():
    granq = CompiledGranQ(strict=True, compiler=same_compiler)
    granq.weight(torch.randn(8, 4, 3, 3), 3, "kernel")
    granq.weight(torch.randn(8, 4, 3, 3), 3, "channel")
    granq(torch.randn(2, 4, 5, 5), 3)
    granq(torch.randn(2, 4, 5, 5).to(memory_format=torch.channels_last), 3)
    roles = sorted(key[0] for key in granq._verified)
    assert roles == ["activation", "activation", "channel weight", "kernel weight"]


def test_first_call_checks_rounding_of_exact_halves():
    """A compiler that rounds ties away from zero is caught even where the input itself holds no tie."""
    x = torch.randn(4, 8, 6, 6, generator=torch.Generator().manual_seed(0)) * 3
    wrong = compiler_rounding_half_away(grouped_values)
    assert torch.equal(fused.grouped_call(wrong, x, 3, 2), granq_fake_quant(x, 3))  # no tie in x
    ties = fused.tie_tensor((2, 4, 23, 23), 2, 3, signed=False)
    assert not torch.equal(fused.grouped_call(wrong, ties, 3, 2), granq_fake_quant(ties, 3))
    granq = CompiledGranQ(strict=False, compiler=compiler_rounding_half_away)
    assert torch.equal(granq(x, 3), granq_fake_quant(x, 3))
    assert "differ from the eager formula on exact halves" in granq.failure
    w = torch.randn(16, 8, 3, 3, generator=torch.Generator().manual_seed(1))
    assert torch.equal(fused.grouped_call(wrong, w, 5, 1), weight_fake_quant(w, 5, "channel"))
    with pytest.raises(RuntimeError, match="exact halves.*channel weight"):
        CompiledGranQ(strict=True, compiler=compiler_rounding_half_away).weight(w, 5, "channel")


@pytest.mark.parametrize("bits", range(2, 9))
@pytest.mark.parametrize("signed", [False, True])
def test_tie_tensor_rounds_exact_halves_to_even(bits, signed):
    x = fused.tie_tensor((8, 529), 1, bits, signed)
    n = 2**bits - 1
    lo, hi = x.aminmax(dim=1, keepdim=True)
    powers = torch.arange(8.0).sub(4).exp2().view(-1, 1)
    assert torch.equal(hi - lo, n * powers)
    assert (lo == 0).all() != signed
    scale, zero_point = quant_params(lo, hi, bits)
    assert torch.equal(scale, 1 / powers)
    scaled = scale * x - zero_point
    assert torch.equal(scaled.double(), x.double() * scale.double() - zero_point.double())  # exact
    ties = scaled[:, 2:]
    assert torch.equal(ties - ties.floor(), torch.full_like(ties, 0.5))
    assert len(ties.unique()) == n  # every half of the grid
    below = ties.floor()
    to_even = below + below.remainder(2)
    assert torch.equal(granq_fake_quant(x, bits)[:, 2:] * scale - zero_point, to_even)


def test_quant_path_names_the_implementation(monkeypatch):
    monkeypatch.setattr(fused, "_SHARED", {})
    assert quant_path("eager") == "eager: quant_impl = eager"
    assert quant_path("auto") == "eager: no call has used the compiled path yet"
    fused._SHARED["auto"] = CompiledGranQ(strict=False, compiler=same_compiler)
    granq_function("auto")(torch.randn(2, 7, 1, 1), 3)  # rows of one element go to eager
    assert quant_path("auto") == "eager: no call has used the compiled path yet"
    granq_function("auto")(torch.randn(2, 7, 3, 3), 3)
    assert quant_path("auto") == "compiled"
    fused._SHARED["compiled"] = CompiledGranQ(strict=True, compiler=failing_compiler)
    with pytest.raises(RuntimeError):
        granq_function("compiled")(torch.randn(2, 7), 3)
    assert quant_path("compiled") == "eager: no call has used the compiled path yet"
    fused._SHARED["auto"] = CompiledGranQ(strict=False, compiler=failing_compiler)
    weight_function("auto")(torch.randn(4, 3, 3, 3), 3)
    assert quant_path("auto") == "eager: RuntimeError: simulated: no working C++ compiler"
    with pytest.raises(ValueError, match="quant_impl must be one of"):
        quant_path("fast")


def test_no_compilation_off_the_cpu_without_eager_numerics(monkeypatch):
    """A torch without Inductor's eager-numerics options: eager on a device that is not the CPU (a meta tensor
    stands in for CUDA here), with the reason; the compiled path still on the CPU."""
    monkeypatch.setattr(fused, "missing_eager_numerics", lambda: ["eager_numerics.division_rounding"])
    calls = []
    granq = CompiledGranQ(strict=False, compiler=lambda fn: calls.append(fn) or fn)
    y = granq(torch.empty(2, 3, 4, 4, device="meta"), 3)
    assert y.device.type == "meta" and y.shape == (2, 3, 4, 4)
    assert calls == []
    assert granq.path == (f"eager: torch {torch.__version__} lacks torch._inductor.config.eager_numerics."
                          f"division_rounding; compiled values could differ from eager on meta")
    with pytest.raises(RuntimeError, match="quant_impl = compiled.*lacks torch._inductor.config.eager_numerics"):
        CompiledGranQ(strict=True, compiler=same_compiler).weight(torch.empty(4, 3, 3, 3, device="meta"), 3)
    on_cpu = CompiledGranQ(strict=True, compiler=same_compiler)
    on_cpu(torch.randn(2, 3, 4, 4), 3)
    assert on_cpu.path == "compiled"


def test_eager_numerics_options_apply_to_this_compilation_only(monkeypatch):
    """compile_values hands the options to Inductor for its own compilations; the process's config is unchanged."""
    if fused.missing_eager_numerics():
        pytest.skip(f"torch {torch.__version__} lacks {fused.missing_eager_numerics()}")
    from torch._inductor import compile_fx as compile_fx_module
    from torch._inductor import config

    def current():
        return {name: config.get_config_copy()[name] for name in fused.EAGER_NUMERICS}

    seen = []  # the options in effect for each call of Inductor's compile_fx (it calls itself once patched)
    original = compile_fx_module.compile_fx

    def recording_compile_fx(*args, **kwargs):
        seen.append({**current(), **(kwargs.get("config_patches") or {})})
        return original(*args, **kwargs)

    monkeypatch.setattr(compile_fx_module, "compile_fx", recording_compile_fx)
    before = current()

    def third(x):
        return x / 3

    x = torch.randn(5)
    try:
        assert torch.equal(fused.compile_values(third)(x), x / 3)
        with_options, seen[:] = seen[:], []
        assert torch.equal(fused.compile_values(third, eager_numerics=False)(x), x / 3)
    except RuntimeError as error:
        pytest.skip(f"torch.compile does not work here: {error}")
    wanted = {name: True for name in fused.EAGER_NUMERICS}
    assert with_options and all({name: s[name] for name in wanted} == wanted for s in with_options)
    assert seen and all(s == before for s in seen)
    assert current() == before


def test_quantize_model_wires_the_implementation():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3), nn.ReLU6(), nn.Flatten(), nn.Linear(4, 2))
    for impl in ("auto", "compiled", "eager"):
        student = quantize_model(model, StudentSpec.of(4, 4, impl=impl))
        acts = [m for m in student.modules() if isinstance(m, QuantAct)]
        layers = [m for m in student.modules() if isinstance(m, (QuantConv2d, QuantLinear))]
        assert len(acts) == 2 and len(layers) == 3
        assert all(a.quant.impl == impl and a.quantizer.fn is granq_function(impl) for a in acts)
        assert all(m.quant.impl == impl and m.weight_fn == weight_function(impl) for m in layers)
        assert f"quant_impl={impl}" in repr(acts[0]) and f"quant_impl={impl}" in repr(layers[0])
    assert granq_function("eager") is granq_fake_quant and weight_function("eager") is weight_fake_quant
    assert granq_function("auto") is granq_function("auto") and not granq_function("auto").strict
    with pytest.raises(ValueError, match="quant_impl must be one of"):
        ActQuant(4, impl="fast")
    with pytest.raises(ValueError, match="quant_impl must be one of"):
        QuantLinear(3, 2, quant=WeightQuant(3, impl="fast"))


def test_compiled_student_equals_eager_student(compiled_granq):
    from utils.models import get_model_spec

    teacher = get_model_spec("resnet20_cifar10").build().eval()
    x = torch.randn(3, 3, 32, 32)
    for memory_format in (torch.contiguous_format, torch.channels_last):
        students = [quantize_model(teacher, StudentSpec.of(3, 3, impl=impl)).to(memory_format=memory_format)
                    for impl in ("compiled", "eager")]
        with torch.no_grad():
            assert torch.equal(students[0](x), students[1](x))


def test_copies_and_pickles_share_the_compiled_function():
    act = QuantAct(ActQuant(3, impl="auto"))
    assert copy.deepcopy(act).quantizer.fn is act.quantizer.fn
    assert pickle.loads(pickle.dumps(act)).quantizer.fn is act.quantizer.fn
    conv = QuantConv2d(3, 4, 3, quant=WeightQuant(8, impl="auto"))
    assert copy.deepcopy(conv).weight_fn == conv.weight_fn
    assert pickle.loads(pickle.dumps(conv)).weight_fn == conv.weight_fn


def test_trainer_runs_with_compile_unavailable(monkeypatch, caplog, tmp_path, cifar_folder):
    """A machine where torch.compile fails: the default (auto) trains with eager after one warning."""
    from utils.data.loaders import build_test_loader
    from utils.models import build_teacher
    from utils.runs.config import load_options
    from utils.training.trainer import Trainer

    from ..conftest import CIFAR10_CONF

    monkeypatch.setattr(fused, "_SHARED", {})
    monkeypatch.setattr(fused, "compile_values", failing_compiler)
    options = load_options(CIFAR10_CONF, [f"dataPath={cifar_folder}", "nThreads=0", "batchSize=4", "iters_per_epoch=2",
                                          "warmup_epochs=0", "test_batch_size=10", "nEpochs=1"])
    assert options.quant_impl == "auto"
    teacher, _ = build_teacher(options.network, "random")
    trainer = Trainer(options, teacher, build_test_loader(options), torch.device("cpu"), str(tmp_path), {})
    with caplog.at_level(logging.WARNING, logger="quantization_utils.fused"):
        summary = trainer.fit()
    assert summary["student_top1"] is not None
    acts = [m for m in trainer.student.modules() if isinstance(m, QuantAct)]
    assert len({id(a.quantizer.fn) for a in acts}) == 1 and "simulated" in acts[0].quantizer.fn.failure
    convs = [m for m in trainer.student.modules() if isinstance(m, QuantConv2d)]
    assert all(c.weight_fn.__self__ is acts[0].quantizer.fn for c in convs)
    assert caplog.text.count("the compiled GranQ quantizer failed") == 1


def make_trainer(impl: str, tmp_path):
    from utils.models import build_teacher
    from utils.runs.config import load_options
    from utils.training.trainer import Trainer

    from ..conftest import CIFAR10_CONF

    options = load_options(CIFAR10_CONF, ["batchSize=4", "iters_per_epoch=2", "warmup_epochs=0", "log_interval=2",
                                          f"quant_impl={impl}"])
    torch.manual_seed(0)
    teacher, _ = build_teacher(options.network, "random")
    return Trainer(options, teacher, None, torch.device("cpu"), str(tmp_path / impl), {})


def test_training_is_the_same_with_the_fast_path(compiled_granq, tmp_path):
    """Two iterations with the compiled quantizer and with eager give the same losses and weights, bit for bit."""
    results = {}
    for impl in ("compiled", "eager"):
        trainer = make_trainer(impl, tmp_path)
        torch.manual_seed(1)
        record = trainer.train_epoch(0)
        results[impl] = (record, trainer.student.state_dict(), trainer.generator.state_dict())
    (record_c, student_c, generator_c), (record_e, student_e, generator_e) = results["compiled"], results["eager"]
    assert {k: v for k, v in record_c.items() if k != "train_seconds"} == \
        {k: v for k, v in record_e.items() if k != "train_seconds"}
    assert all(torch.equal(v, student_e[k]) for k, v in student_c.items())
    assert all(torch.equal(v, generator_e[k]) for k, v in generator_c.items())


HOST_SYNCS = ("item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__")


@pytest.mark.parametrize("act_mode", ["granq", "layerwise", "channel"])
def test_quantized_forward_and_backward_never_read_back_to_the_host(compiled_granq, act_mode, monkeypatch):
    """No .item(), .tolist(), .cpu() or bool(tensor) in a student's forward and backward (a device sync on CUDA)."""
    from utils.models import get_model_spec

    student = quantize_model(get_model_spec("resnet20_cifar10").build().eval(),
                             StudentSpec.of(3, 3, mode=act_mode, impl="compiled"))
    x = torch.randn(4, 3, 32, 32, requires_grad=True)
    student(x).sum().backward()  # first call: verification against eager, which may read back
    called = []
    for name in HOST_SYNCS:
        original = getattr(torch.Tensor, name)
        monkeypatch.setattr(torch.Tensor, name, lambda self, *a, _n=name, _f=original, **k: called.append(_n) or _f(
            self, *a, **k))
    student(x).sum().backward()
    with torch.no_grad():
        student(x)
    monkeypatch.undo()
    assert called == []
