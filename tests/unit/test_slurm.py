import json
import os
import signal
import subprocess
import sys

import pytest

from utils.sweeps.cells import Cell
from utils.sweeps.reproduce_cli import main
from utils.sweeps.slurm import JOBS_FILE, CellJob, cell_status, parse_time, slurm_settings, torchrun_env
from utils.system.errors import UserError

from ..e2e.test_reproduce import write_plan


@pytest.mark.parametrize("text, minutes", [(90, 90), ("90", 90), ("1:30:00", 90), ("2-00:00:00", 2880),
                                           ("0:00:30", 1), ("24:00", 1440)])
def test_time_limits_in_slurm_forms(text, minutes):
    assert parse_time(text) == minutes


@pytest.mark.parametrize("block, flags, message", [
    ({"partitions": "gpu"}, {}, r"unknown key\(s\): partitions\. Valid keys: partition, time, gpus_per_cell"),
    ({"gpus_per_cell": "2"}, {}, r"gpus_per_cell must be an integer, got '2'"),
    ({"time": "a day"}, {}, r"time 'a day': give minutes \(e\.g\. 90\) or \[D-\]HH:MM\[:SS\]"),
    ({}, {"cpus_per_gpu": 0}, r"cpus_per_gpu 1 or more"),
    ({}, {"time": "0"}, r"time '0': give at least one minute"),
])
def test_bad_slurm_settings_are_refused(block, flags, message):
    with pytest.raises(UserError, match=message):
        slurm_settings(block, "plan p.hocon: slurm", **flags)


def test_flags_replace_the_plan_slurm_block(tmp_path, capsys):
    settings = slurm_settings({"partition": "gpu", "time": 600, "account": "lab"}, "here", partition="long",
                              gpus_per_cell=4)
    assert (settings.partition, settings.timeout_min, settings.gpus_per_cell, settings.cpus_per_gpu,
            settings.account) == ("long", 600, 4, 8, "lab")
    plan = write_plan(tmp_path, slurm={"partitoin": "gpu"})
    assert main(["--plan", plan, "--dry-run"]) == 2  # checked whatever the launcher
    assert "slurm: unknown key(s): partitoin. Valid keys: partition, time" in capsys.readouterr().err
    plan = write_plan(tmp_path, slurm={"partition": "gpu", "time": "2:00:00"})
    assert main(["--plan", plan, "--launcher", "slurm", "--cpus-per-gpu", "4", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "a SLURM job: partition gpu, time limit 2:00:00, 1 GPU(s) and 4 CPU(s) per GPU per cell" in out
    assert "run      cifar10_resnet20_W4A4_granq_id1: not started" in out and not (tmp_path / "runs").exists()
    assert main(["--plan", plan, "--partition", "gpu"]) == 2
    assert "error: --partition: only with --launcher slurm" in capsys.readouterr().err


def test_missing_submitit_is_an_error_that_names_it(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "submitit", None)  # import submitit raises ImportError
    assert main(["--plan", write_plan(tmp_path), "--launcher", "slurm"]) == 2
    err = capsys.readouterr().err
    assert err == "error: --launcher slurm needs the submitit package: pip install submitit\n"


def test_tasks_of_a_slurm_job_get_torchrun_variables(monkeypatch):
    from submitit.slurm.slurm import SlurmJobEnvironment

    for name, value in {"SLURM_JOB_ID": "4242", "SLURM_NTASKS": "8", "SLURM_PROCID": "5", "SLURM_LOCALID": "1",
                        "SLURM_JOB_NUM_NODES": "2", "SLURM_NODEID": "1", "SLURM_JOB_NODELIST": "gpu[007-008]"}.items():
        monkeypatch.setenv(name, value)
    assert torchrun_env(SlurmJobEnvironment()) == {
        "RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "4", "GROUP_RANK": "1",
        "MASTER_ADDR": "gpu007", "MASTER_PORT": str(20000 + 4242)}
    monkeypatch.setenv("SLURM_NTASKS", "1")
    assert torchrun_env(SlurmJobEnvironment()) == {}  # one task: a plain run


def a_cell(folder) -> Cell:
    return Cell("c_W4A4_granq_id1", "c.hocon", 4, "granq", 1, str(folder), "CIFAR/main.py", ())


def test_cell_states_from_its_folder_and_the_scheduler(tmp_path):
    cell = a_cell(tmp_path / "cell")
    assert cell_status(cell, None) == ("run", "not started")
    os.makedirs(cell.folder)
    with open(os.path.join(cell.folder, JOBS_FILE), "w") as f:
        f.write(json.dumps({"job_id": "77", "cluster": "slurm", "action": "run"}) + "\n")
    with open(cell.log_path, "w") as f:
        f.write("=== command\nerror: CUDA out of memory\n\n")
    assert cell_status(cell, "PENDING") == ("queued", "job 77 (PENDING)")
    assert cell_status(cell, "RUNNING") == ("running", "job 77")
    assert cell_status(cell, "OUT_OF_MEMORY") == ("failed", "job 77 OUT_OF_MEMORY; last line: error: CUDA out of "
                                                            "memory")
    assert cell_status(cell, "UNKNOWN")[0] == "unknown"  # never taken for failed: that would submit it twice
    run_dir = tmp_path / "cell" / "run_a"
    run_dir.mkdir()
    (run_dir / "summary.json").write_text("{}")
    assert cell_status(cell, "FAILED") == ("done", str(run_dir / "summary.json"))


CHILD = """
import signal, sys, time
count = 0
def note(signum, frame):
    global count
    count += 1
signal.signal(signal.SIGTERM, note)
print("ready", flush=True)
while not count:
    time.sleep(0.01)
time.sleep(2)  # writing its checkpoint
open(sys.argv[1], "w").write(str(count))
sys.exit(143)
"""


@pytest.mark.parametrize("slurm_sent_sigterm", [False, True])
def test_requeue_signal_stops_the_run_with_one_sigterm_then_requeues(tmp_path, slurm_sent_sigterm):
    """The time limit (requeue signal only) and a preemption (SLURM's SIGTERM to the run first): the run gets
    exactly one SIGTERM either way, and the job is resubmitted once it has ended."""
    job = CellJob(a_cell(tmp_path), sys.executable)
    count = tmp_path / "count"
    job._child = subprocess.Popen([sys.executable, "-c", CHILD, str(count)], stdout=subprocess.PIPE, text=True)
    assert job._child.stdout.readline() == "ready\n"
    if slurm_sent_sigterm:
        job._child.send_signal(signal.SIGTERM)
        job._note_sigterm(signal.SIGTERM, None)
    delayed = job.checkpoint()
    assert count.read_text() == "1"  # written by the run as it ended: checkpoint() waited for it
    assert job._child.wait() == 143
    assert isinstance(delayed.function, CellJob) and delayed.function.cell == job.cell
    assert delayed.function._child is None
