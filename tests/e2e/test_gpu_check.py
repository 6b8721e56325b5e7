"""SLOW (minutes): ``benchmarks/gpu_check.sh --device cpu --quick``, the whole GPU check with every step small,
on the CPU: 69 s on an idle 2-core machine, 7 minutes on a busy one; ``-m "not slow"`` leaves it out."""

import json

import pytest

from ..conftest import run_benchmark_script

STEPS = ("exactness", "cli", "cli_compiled", "graph_probe", "train_step", "quantizer_speed", "eval_throughput",
         "full_run")
FILES = ("exactness_probe", "cli_run", "cli_run_compiled", "graph_probe", "train_step", "quantizer_speed",
         "eval_throughput", "full_run")


@pytest.mark.slow
def test_gpu_check_runs_every_step_on_the_cpu(tmp_path):
    result = run_benchmark_script("gpu_check.sh", tmp_path, "--device", "cpu", "--quick")
    assert result.stdout.rstrip().endswith("all steps passed")
    with open(tmp_path / "gpu_check_quick_cpu.json") as f:
        steps = {step["step"]: step for step in json.load(f)["steps"]}
    assert tuple(steps) == STEPS and all(step["status"] == "ok" for step in steps.values())
    for name in FILES:  # quick figures never replace full ones: their own names
        assert (tmp_path / f"{name}_quick_cpu.json").is_file(), name
    for name in ("cli", "cli_compiled"):
        assert steps[name]["eval_top1"] == steps[name]["student_top1"]
    assert steps["cli_compiled"]["quant_path"] == "compiled"
    assert steps["cli"]["tf32"] == {"conv": False, "matmul": False}
    assert set(steps["eval_throughput"]["images_per_s"]) == {"decode", "cached", "float", "granq"}
    assert steps["eval_throughput"]["exact"] is True
    assert (tmp_path / "gpu_check_quick_cpu.log").stat().st_size > 0
    assert steps["graph_probe"]["graphed"] is False  # no graph without CUDA, and none claimed
    with open(tmp_path / "full_run_quick_cpu.json") as f:
        full = json.load(f)
    assert full["finished"] and full["epochs"] == 2 and full["iters_per_epoch"] == 2
    assert full["cuda_graph"] == "eager: no CUDA device" and full["device"] == "cpu"
    assert {"wall_seconds", "student_top1", "best_top1", "teacher_top1"} <= full.keys()
    # --only runs one step and keeps the others' records
    result = run_benchmark_script("gpu_check.sh", tmp_path, "--device", "cpu", "--quick", "--only", "full_run")
    assert "[1] full_run" in result.stdout and "[2]" not in result.stdout
    with open(tmp_path / "gpu_check_quick_cpu.json") as f:
        assert tuple(step["step"] for step in json.load(f)["steps"]) == STEPS
