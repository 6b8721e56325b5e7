"""SLOW (minutes): ``benchmarks/gpu_verify.sh --device cpu --quick``, the check that settles the CUDA-graph default,
every step small, on the CPU; ``-m "not slow"`` leaves it out."""

import json

import pytest

from ..conftest import run_benchmark_script

STEPS = ("self_check", "fallback", "channel_setup", "graph_probe", "off_vs_on", "step_time")


@pytest.mark.slow
def test_gpu_verify_runs_on_the_cpu_and_says_what_it_skips(tmp_path):
    result = run_benchmark_script("gpu_verify.sh", tmp_path, "--device", "cpu", "--quick")
    assert result.stdout.splitlines()[0].startswith("torch ")  # the versions first
    assert "all steps passed (3 skipped: they need CUDA)" in result.stdout.splitlines()[-1]
    with open(tmp_path / "gpu_verify_quick_cpu.json") as f:
        steps = {step["step"]: step for step in json.load(f)["steps"]}
    assert tuple(steps) == STEPS
    assert {name for name, step in steps.items() if step["status"] == "skipped: needs CUDA"} == {
        "self_check", "fallback", "step_time"}
    assert steps["channel_setup"]["status"] == "ok" and steps["channel_setup"]["cuda_graph"] == "eager: no CUDA device"
    assert steps["graph_probe"]["probes"]["deterministic"] == {"failed": [], "graphed": False}
    summaries = steps["off_vs_on"]["summaries"]
    assert summaries["off"]["cuda_graph"] == "eager: cuda_graph = off"
    assert summaries["auto"]["cuda_graph"] == "eager: no CUDA device"
    # the same eager run either way on the CPU
    assert summaries["off"]["student_sha256"] == summaries["auto"]["student_sha256"]
