import json
import os
import subprocess
import sys

import pytest

from ..conftest import ROOT, tiny_run_args

# every student term and the low-pass filter: a second forward pass of each network and Grad-CAM's gradients
ALL_PARTS = ("--set", "student_losses=[kd, attention, cam, reliable_ce, pseudo_label]", "--set",
             "student_input_filter=lowpass")


# a pool of synthetic images: rank 0 synthesises it into the cache while rank 1 waits, then both read it
ON_A_POOL = ("--set", "image_source=pool", "--set", "pool_size=16", "--set", "pool_batch=8", "--set", "pool_iters=2")


@pytest.mark.parametrize("extra", [(), ALL_PARTS, ON_A_POOL], ids=["default", "all_student_terms", "pool"])
def test_torchrun_two_processes_on_cpu(tmp_path, cifar_folder, extra):
    save_path = tmp_path / "runs"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               os.path.join(ROOT, "CIFAR", "main.py"), *tiny_run_args(save_path, cifar_folder, *extra)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    summaries = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    assert len(summaries) == 1  # only rank 0 reports
    summary = summaries[0]
    assert summary["world_size"] == 2 and summary["epochs"] == 1
    # after 2 iterations of DDP training both ranks hold the same student
    assert len(summary["student_sha256"]) == 2 and len(set(summary["student_sha256"])) == 1
    (run_dir,) = os.listdir(save_path)
    with open(os.path.join(save_path, run_dir, "summary.json")) as f:
        assert json.load(f) == summary
    with open(os.path.join(save_path, run_dir, "metrics.jsonl")) as f:
        assert len(f.readlines()) == 1


@pytest.mark.parametrize("act_mode, sets", [
    ("layerwise", ["nEpochs=0"]),  # post-training: ranges calibrated without gradients
    ("layerwise", ["nEpochs=1", "warmup_epochs=1"]),  # ends inside warm-up: ranges tracked under no_sync
    ("channel", ["nEpochs=0"]),
])
def test_torchrun_tracked_ranges_agree_across_processes(tmp_path, cifar_folder, act_mode, sets):
    # DDP broadcasts buffers only before a forward with gradients; the ranges must agree without that.
    extra = [arg for s in [f"act_mode={act_mode}", *sets] for arg in ("--set", s)]
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               os.path.join(ROOT, "CIFAR", "main.py"), *tiny_run_args(tmp_path / "runs", cifar_folder, *extra)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    summaries = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    assert len(summaries) == 1
    (summary,) = summaries
    assert (summary["act_mode"], summary["world_size"]) == (act_mode, 2)
    assert len(summary["student_sha256"]) == 2 and len(set(summary["student_sha256"])) == 1


def fetch_in_turn(rank: int, store_file: str, log_file: str) -> None:
    import time

    import torch.distributed as dist

    from utils.system import distributed

    dist.init_process_group("gloo", init_method=f"file://{store_file}", rank=rank, world_size=2)
    try:
        with distributed.rank_zero_first():
            with open(log_file, "a") as f:
                f.write(f"enter {rank}\n")
            time.sleep(1.0 if rank == 0 else 0)  # rank 0 downloads; the others then find the file
            with open(log_file, "a") as f:
                f.write(f"leave {rank}\n")
    finally:
        dist.destroy_process_group()


def test_rank_zero_fetches_first_and_the_others_after_it(tmp_path):
    import torch.multiprocessing

    log = tmp_path / "log"
    torch.multiprocessing.spawn(fetch_in_turn, args=(str(tmp_path / "store"), str(log)), nprocs=2)
    assert log.read_text().splitlines() == ["enter 0", "leave 0", "enter 1", "leave 1"]
