import csv
import os

import pytest
import torch
from PIL import Image

from utils.models import build_teacher
from utils.reports.activation_ranges import activation_stats, measure_activation_ranges
from utils.runs.config import load_options
from utils.training.generator import build_generator

from ..conftest import CIFAR10_CONF, CIFAR10A_CONF


def _tool():
    from utils.runs import activation_ranges_cli

    return activation_ranges_cli


def test_hand_computed_ranges_and_errors():
    ramp = torch.tensor([0.0, 1 / 3, 2 / 3, 1.0])
    # Channels with ranges 1, 0 (dead), 10 and 100: 2 bits hold each channel's 4 values exactly,
    # while one range [0, 100] for the layer rounds the two narrow channels to 0.
    x = torch.stack([ramp, 0 * ramp, 10 * ramp, 100 * ramp]).view(1, 4, 1, 4)
    stats = activation_stats(x, bits=2, name="relu")
    assert stats.channel_ranges.tolist() == pytest.approx([1, 0, 10, 100])
    assert stats.dead_channels == 1 and stats.channels == 4
    assert stats.channel_spread == pytest.approx(10.0)  # 100 / median(1, 10, 100)
    energy = 1 + 100 + 10000  # relative to sum(ramp**2)
    assert stats.relative_error["layerwise"] == pytest.approx((1 + 100) / energy)
    assert stats.relative_error["channel"] == pytest.approx(0, abs=1e-12)
    assert stats.relative_error["granq"] == pytest.approx(0, abs=1e-12)


def test_sample_spread_sees_what_channel_ranges_hide():
    # Both samples span the same channel range over the batch, but one sample is 4x narrower.
    x = torch.stack([torch.tensor([0.0, 4.0]), torch.tensor([0.0, 1.0])]).view(2, 1, 1, 2)
    stats = activation_stats(x, bits=2)
    assert stats.channel_spread == pytest.approx(1.0)
    assert stats.sample_channel_spread == pytest.approx(4.0)  # 4 / median(1, 4), torch's lower median
    assert stats.relative_error["granq"] < stats.relative_error["channel"]


def test_every_quantact_position_is_measured_and_hooks_removed():
    torch.manual_seed(0)
    teacher, _ = build_teacher("resnet20a_cifar10", "random")
    stats = measure_activation_ranges(teacher, torch.randn(8, 3, 32, 32), bits=4)
    relus = [name for name, m in teacher.named_modules() if isinstance(m, torch.nn.ReLU)]
    assert [s.name for s in stats] == relus and len(relus) == 19
    assert all(not m._forward_hooks for m in teacher.modules())
    ratios = sorted(s.relative_error["layerwise"] / s.relative_error["granq"] for s in stats)
    assert ratios[len(ratios) // 2] > 1


def test_act_types_choose_the_positions_measured(tmp_path, capsys):
    from .user_models import tiny_hardswish_net

    model = tiny_hardswish_net()
    hardswish = [name for name, m in model.named_modules() if isinstance(m, torch.nn.Hardswish)]
    stats = measure_activation_ranges(model, torch.randn(4, 3, 16, 16), 4, (torch.nn.Hardswish,))
    assert [s.name for s in stats] == hardswish and len(hardswish) == 2
    with pytest.raises(ValueError, match="no ReLU, ReLU6 module"):
        measure_activation_ranges(model, torch.randn(4, 3, 16, 16), 4)
    tool = _tool()
    common = ["--conf_path", CIFAR10_CONF, "--set", "network=tests.e2e.user_models:tiny_hardswish_net",
              "--set", "teacher_weights=random", "--set", "img_size=16", "--source", "noise", "--batch-size", "4",
              "--output-dir", str(tmp_path)]
    assert tool.main(common) == 2
    assert "no ReLU, ReLU6 module" in capsys.readouterr().err
    paths = tool.run(tool.build_parser().parse_args(common + ["--set", "act_types=[hardswish]"]))
    _check_outputs(paths, layers=2)
    with open(paths["table"]) as f:
        assert "act_types = ['hardswish']" in f.read()


def _check_outputs(paths, layers):
    with open(paths["figure"], "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    with Image.open(paths["figure"]) as image:
        image.verify()
    with open(paths["csv"]) as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == layers and float(rows[0]["rel_error_layerwise"]) > 0
    with open(paths["table"]) as f:
        assert f.read().count("\n| ") == layers + 2  # separator, layers, median


def test_tool_on_a_random_teacher_and_noise(tmp_path, capsys):
    tool = _tool()
    args = tool.build_parser().parse_args([
        "--conf_path", CIFAR10A_CONF, "--set", "teacher_weights=random", "--set", f"dataPath={tmp_path / 'none'}",
        "--bits", "3", "--batch-size", "4", "--output-dir", str(tmp_path / "out")])
    paths = tool.run(args)
    assert paths["figure"] == str(tmp_path / "out" / "activation_ranges_resnet20a_cifar10_A3_noise.png")
    _check_outputs(paths, layers=19)
    assert "median over 19 layers" in capsys.readouterr().out


def test_tool_on_real_images(tmp_path, cifar_folder):
    tool = _tool()
    args = tool.build_parser().parse_args([
        "--conf_path", CIFAR10_CONF, "--set", "teacher_weights=random", "--set", f"dataPath={cifar_folder}",
        "--set", "nThreads=0", "--batch-size", "5", "--output-dir", str(tmp_path)])
    paths = tool.run(args)
    assert paths["csv"].endswith("resnet20_cifar10_A3_real.csv")  # qa = 3 from the config
    _check_outputs(paths, layers=19)


def test_tool_on_a_runs_generator(tmp_path):
    options = load_options(CIFAR10A_CONF, ["teacher_weights=random"])
    checkpoint = {"options": options.to_dict(), "meta": {"teacher_weights": "random"}, "student": {},
                  "generator": build_generator(options).state_dict()}
    torch.save(checkpoint, tmp_path / "checkpoint.pt")
    tool = _tool()
    paths = tool.run(tool.build_parser().parse_args(["--run", str(tmp_path), "--batch-size", "4"]))
    assert os.path.dirname(paths["figure"]) == str(tmp_path)
    assert paths["figure"].endswith("activation_ranges_resnet20a_cifar10_A3_generator.png")
    _check_outputs(paths, layers=19)


def test_tool_errors(tmp_path, capsys):
    tool = _tool()
    assert tool.main(["--conf_path", CIFAR10A_CONF, "--source", "generator"]) == 2
    assert "--source generator needs --run" in capsys.readouterr().err
    assert tool.main(["--run", str(tmp_path)]) == 2
    assert "holds no checkpoint.pt" in capsys.readouterr().err
    assert tool.main(["--conf_path", CIFAR10A_CONF, "--bits", "9"]) == 2
    assert "bits must be an integer from 2 to 8" in capsys.readouterr().err
