"""tools/reproduce.py --launcher slurm through submitit's local executor, which runs each job's tasks as local
processes through the same code (pickled CellJob, signal handlers, requeue) as on SLURM."""

import json
import os
import signal

import pytest
import torch

from utils.sweeps.reproduce_cli import main
from utils.sweeps.slurm import _local_state

from ..conftest import CIFAR10_CONF
from .test_reproduce import RESUMABLE_RUN, TINY_RUN, descendants, run_dirs, wait_for, write_plan

pytest.importorskip("submitit")

LOCAL = ["--launcher", "slurm", "--submitit-cluster", "local", "--time", "15"]


def job_id(cell) -> str:
    with open(cell / "slurm_jobs.jsonl") as f:
        return [json.loads(line)["job_id"] for line in f]


def summary(cell) -> dict:
    [run_dir] = run_dirs(cell)
    return json.loads((run_dir / "summary.json").read_text())


@pytest.mark.skipif(not os.path.isdir("/proc"), reason="finds the job's processes in /proc")
def test_two_cells_as_jobs_one_preempted_and_requeued_ends_as_its_uninterrupted_twin(tmp_path, cifar_folder,
                                                                                      capsys, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # both jobs share two cores
    # Two cells that differ only in their config file's name, and so in nothing the run draws from.
    twin = tmp_path / "twin.hocon"
    twin.write_text(f"include {json.dumps(CIFAR10_CONF)}\n")
    plan = write_plan(tmp_path, configs=[CIFAR10_CONF, str(twin)], set=[f"dataPath={cifar_folder}", *RESUMABLE_RUN])
    cells = [tmp_path / "runs" / "tiny" / name for name in ("cifar10_resnet20_W4A4_granq_id1", "twin_W4A4_granq_id1")]

    assert main(["--plan", plan, *LOCAL]) == 0
    out = capsys.readouterr().out
    assert all(f"submit {cell.name}: job " in out for cell in cells)
    assert main(["--plan", plan, *LOCAL]) == 0  # a second call submits nothing
    out = capsys.readouterr().out
    assert "0 job(s) submitted, 2 cell(s) skipped" in out and f"skip   {cells[0].name}: running, job " in out

    # Preemption as SLURM does it: SIGTERM to every process of the job, at once followed by submitit's signal,
    # SIGUSR2, which the run, still busy with its checkpoint, must survive.
    wait_for(lambda: any((d / "metrics.jsonl").exists() and (d / "metrics.jsonl").read_text()
                         for d in run_dirs(cells[0])), "epoch 1 of the first cell")
    [controller] = job_id(cells[0])
    processes = descendants(int(controller))
    for signum in (signal.SIGTERM, signal.SIGUSR2):
        for pid in processes:
            os.kill(pid, signum)

    wait_for(lambda: all(list(cell.glob("*/summary.json")) for cell in cells), "both cells to finish", timeout=400)
    wait_for(lambda: all(_local_state(job_id(cell)[-1]) == "ENDED" for cell in cells), "both jobs to end")
    assert job_id(cells[0]) == [controller]  # requeued, not submitted again
    log = (cells[0] / "cell.log").read_text()
    # One SIGTERM reached the run (a second one would stop it before its checkpoint); then the requeued job resumed.
    assert log.count("received: finishing the current step") == 1 and "checkpoint written" in log
    assert log.count("=== ") == 2 and "main.py --resume " in log.split("=== ")[2]
    assert "Requeued job" in (cells[0] / "submitit" / f"{controller}_0_log.out").read_text()
    interrupted, straight = summary(cells[0]), summary(cells[1])
    assert interrupted["student_sha256"] == straight["student_sha256"]
    assert interrupted["student_top1"] == straight["student_top1"]
    assert main(["--plan", plan, *LOCAL, "--status"]) == 0
    assert "2 done" in capsys.readouterr().out
    assert main(["--plan", plan, *LOCAL]) == 0
    assert "0 job(s) submitted" in capsys.readouterr().out and (tmp_path / "runs" / "tiny" / "results.md").exists()


@pytest.mark.skipif(0 < torch.cuda.device_count() < 2, reason="a cell of 2 GPUs needs 2 GPUs, or none (CPU, Gloo)")
def test_a_cell_of_two_gpus_runs_two_processes_that_meet_as_torchrun_would(tmp_path, cifar_folder, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    plan = write_plan(tmp_path, set=[f"dataPath={cifar_folder}", *TINY_RUN])
    cell = tmp_path / "runs" / "tiny" / "cifar10_resnet20_W4A4_granq_id1"
    # On a CPU the two tasks meet over Gloo; CUDA_VISIBLE_DEVICES=0,1 (the executor's) is then ignored.
    assert main(["--plan", plan, *LOCAL, "--gpus-per-cell", "2"]) == 0
    wait_for(lambda: list(cell.glob("*/summary.json")), "the cell to finish", timeout=300)
    result = summary(cell)
    assert result["world_size"] == 2 and len(set(result["student_sha256"])) == 1
