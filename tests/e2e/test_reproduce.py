import json
import os
import re
import signal
import stat
import subprocess
import sys
import time

import pytest

from utils.sweeps.plans import load_plan, resolve_plan
from utils.sweeps.reproduce_cli import main

from ..conftest import CIFAR10_CONF, ROOT, make_image_folder

TOOL = os.path.join(ROOT, "tools", "reproduce.py")
CIFAR100_CONF = os.path.join(ROOT, "CIFAR", "cifar100_resnet20.hocon")


def write_plan(folder, name="tiny", **keys) -> str:
    """A plan file (JSON is valid hocon) of one CIFAR-10 cell unless ``keys`` say otherwise. Its default
    ``set`` needs nothing from the network: a random teacher, a small image folder as the test set."""
    images = folder / "images"
    if not images.exists():
        make_image_folder(images, classes=10, per_class=1, size=32)
    values = {"configs": [CIFAR10_CONF], "bits": [4], "act_modes": ["granq"], "seeds": [1],
              "set": ["teacher_weights=random", f"dataPath={images}"], "save_path": str(folder / "runs"), **keys}
    path = folder / f"{name}.hocon"
    path.write_text("".join(f"{key} = {json.dumps(value)}\n" for key, value in values.items()))
    return str(path)


def write_fake_python(folder, body: str) -> str:
    """An executable standing in for the interpreter: main.py is never run, the arguments are echoed."""
    path = folder / "fake_python"
    path.write_text("#!/bin/sh\n" + 'echo "fake run: CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES-unset} $*"\n'
                    + body)
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return str(path)


def cell_lines(out: str, action: str) -> list[str]:
    """Names of the cells of the dry-run listing (or skip lines) with ``action``."""
    return [line.split()[1].rstrip(":") for line in out.splitlines() if line.startswith(f"{action} ")]


def table_row(markdown: str, dataset: str) -> dict:
    lines = markdown.splitlines()
    header = [c.strip() for c in next(line for line in lines if line.startswith("| dataset")).strip("|").split("|")]
    row = [c.strip() for c in next(line for line in lines if line.startswith(f"| {dataset} ")).strip("|").split("|")]
    return dict(zip(header, row))


@pytest.mark.parametrize("name, configs, act_modes", [
    ("cifar", ["CIFAR/cifar10_resnet20.hocon", "CIFAR/cifar100_resnet20.hocon"], ("granq",)),
    ("imagenet", ["ImageNet/imagenet_res18.hocon", "ImageNet/imagenet_res50.hocon", "ImageNet/imagenet_MV2.hocon"],
     ("granq",)),
    ("ablation", ["CIFAR/cifar100_resnet20.hocon"], ("layerwise", "channel", "granq")),
])
def test_shipped_plans_load(name, configs, act_modes):
    plan = load_plan(resolve_plan(name))
    assert plan.name == name and plan.configs == tuple(os.path.join(ROOT, c) for c in configs)
    assert plan.bits == (3, 4, 5) and plan.act_modes == act_modes and plan.seeds == (1, 2, 3)
    assert plan.overrides == () and plan.save_path == "./runs"


def test_cifar_plan_dry_run_lists_18_cells_and_starts_nothing(tmp_path, capsys):
    save_path = tmp_path / "runs"
    assert main(["--plan", "cifar", "--seeds", "1", "2", "3", "--save-path", str(save_path), "--dry-run"]) == 0
    out = capsys.readouterr().out
    expected = {f"{config}_W{b}A{b}_granq_id{seed}" for config in ("cifar10_resnet20", "cifar100_resnet20")
                for b in (3, 4, 5) for seed in (1, 2, 3)}
    listed = cell_lines(out, "run")
    assert len(listed) == 18 and set(listed) == expected
    assert "18 cells in" in out and "18 to run, 0 to resume, 0 done" in out
    command = next(line for line in out.splitlines() if "cifar100_resnet20_W5A5_granq_id2:" in line)
    assert "main.py --conf_path" in command and "cifar100_resnet20.hocon --id 2 --qw 5 --qa 5" in command
    assert f"save_path={save_path}/cifar/cifar100_resnet20_W5A5_granq_id2" in command
    assert not save_path.exists()
    # --seeds replaces the plan's seeds
    assert main(["--plan", "cifar", "--seeds", "7", "--save-path", str(save_path), "--dry-run"]) == 0
    listed = cell_lines(capsys.readouterr().out, "run")
    assert len(listed) == 6 and all(name.endswith("_id7") for name in listed)


def test_dry_run_shows_done_interrupted_and_fresh_cells_and_a_run_resumes(tmp_path, capsys, monkeypatch):
    plan = write_plan(tmp_path, seeds=[1, 2, 3, 4])
    cells = tmp_path / "runs" / "tiny"
    done = cells / "cifar10_resnet20_W4A4_granq_id1" / "run_a"
    old, interrupted = (cells / "cifar10_resnet20_W4A4_granq_id2" / name for name in ("run_a", "run_b"))
    unstarted = cells / "cifar10_resnet20_W4A4_granq_id3" / "run_a"  # stopped before its first checkpoint
    for folder in (done, old, interrupted, unstarted):
        folder.mkdir(parents=True)
    (done / "summary.json").write_text(json.dumps(
        {"dataset": "cifar10", "network": "resnet20_cifar10", "qw": 4, "qa": 4, "act_mode": "granq",
         "weight_granularity": "kernel", "student_top1": 12.5}))
    (old / "checkpoint.pt").write_text("")
    (interrupted / "checkpoint.pt").write_text("")
    os.utime(old / "checkpoint.pt", (1, 1))  # the newer checkpoint is the one to resume

    assert main(["--plan", plan, "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert cell_lines(out, "skip") == ["cifar10_resnet20_W4A4_granq_id1"]
    assert cell_lines(out, "resume") == ["cifar10_resnet20_W4A4_granq_id2"]
    assert cell_lines(out, "run") == ["cifar10_resnet20_W4A4_granq_id3", "cifar10_resnet20_W4A4_granq_id4"]
    resume_line = next(line for line in out.splitlines() if line.startswith("resume "))
    assert resume_line.endswith(f"main.py --resume {interrupted}")
    assert "4 cells in" in out and "2 to run, 1 to resume, 1 done" in out
    assert not (cells / "cifar10_resnet20_W4A4_granq_id4").exists()

    # What runs is what the dry run printed: the fake interpreter records its arguments in cell.log.
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert main(["--plan", plan, "--python", write_fake_python(tmp_path, "exit 3\n")]) == 1
    assert not (done.parent / "cell.log").exists()
    log = (interrupted.parent / "cell.log").read_text()
    assert f"main.py --resume {interrupted}\n" in log and "fake run: CUDA_VISIBLE_DEVICES=unset " in log
    assert "--conf_path" in (unstarted.parent / "cell.log").read_text()
    assert "12.50 (n=1)" in (cells / "results.md").read_text()  # the finished cell is tabulated


@pytest.mark.parametrize("keys, message", [
    ({"bitz": [3]}, r"unknown key\(s\): bitz\. Valid keys: description, configs, bits"),
    ({"configs": ["CIFAR/no_such.hocon"]}, r"config file 'CIFAR/no_such.hocon' does not exist"),
    ({"bits": 4}, r"bits must be a list of integers, got 4"),
    ({"seeds": []}, r"seeds is empty"),
    ({"set": ["nEpoch=1"]}, r"set: unknown config key\(s\): nEpoch"),
    ({"set": ["act_mode=layerwise"]}, r"act_mode is set by each cell; list it in act_modes"),
    ({"bits": [9]}, r"cell cifar10_resnet20_W9A9_granq_id1: qw = 9 is out of range"),
    ({"act_modes": ["granular"]}, r"act_mode = 'granular' is not valid"),
])
def test_bad_plan_is_refused_with_a_clear_error(tmp_path, capsys, keys, message):
    assert main(["--plan", write_plan(tmp_path, **keys), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and len(err.splitlines()) == 1
    assert re.search(message, err), err
    assert not (tmp_path / "runs").exists()


def test_missing_key_and_unknown_plan_name(tmp_path, capsys):
    path = tmp_path / "partial.hocon"
    path.write_text('configs = ["CIFAR/cifar10_resnet20.hocon"]\nbits = [3]\n')
    assert main(["--plan", str(path)]) == 2
    assert "lacks act_modes, seeds: act_modes: activation quantizers" in capsys.readouterr().err
    assert main(["--plan", "cifar10"]) == 2
    assert ("no plan of that name in tools/plans (plans there: ablation, addons_cifar100, addons_cpu, cifar, "
            "imagenet, methods_cpu)") in capsys.readouterr().err


def test_failing_cells_are_reported_and_the_others_go_on(tmp_path, capsys):
    plan = write_plan(tmp_path, seeds=[1, 2])
    fake = write_fake_python(tmp_path, 'echo "error: something broke" >&2\nexit 3\n')
    assert main(["--plan", plan, "--python", fake]) == 1
    captured = capsys.readouterr()
    for seed in (1, 2):
        log = tmp_path / "runs" / "tiny" / f"cifar10_resnet20_W4A4_granq_id{seed}" / "cell.log"
        assert f"--id {seed} " in log.read_text() and "error: something broke" in log.read_text()
        assert f"FAILED {seed}/2 cifar10_resnet20_W4A4_granq_id{seed} after 0:00:0" in captured.out
        assert f"exit code 3; log {log}; last line: error: something broke" in captured.out
    assert "2 of 2 started cell(s) failed" in captured.err
    assert "no cell has finished: no results.md written" in captured.out


def test_gpus_pin_one_gpu_to_each_run(tmp_path, capsys):
    plan = write_plan(tmp_path, seeds=[1, 2, 3])
    fake = write_fake_python(tmp_path, "exit 0\n")  # exits 0 without a summary.json: reported as failed
    assert main(["--plan", plan, "--python", fake, "--gpus", "4,6", "--jobs", "2"]) == 1
    out = capsys.readouterr().out
    logs = [(tmp_path / "runs" / "tiny" / f"cifar10_resnet20_W4A4_granq_id{seed}" / "cell.log").read_text()
            for seed in (1, 2, 3)]
    # Both slots are free at the start, so cells 1 and 2 start at once on different GPUs.
    assert "fake run: CUDA_VISIBLE_DEVICES=4 " in logs[0] and "fake run: CUDA_VISIBLE_DEVICES=6 " in logs[1]
    assert any(f"fake run: CUDA_VISIBLE_DEVICES={gpu} " in logs[2] for gpu in (4, 6))
    assert all("--set GPU=0" in log for log in logs)
    assert "start  1/3 cifar10_resnet20_W4A4_granq_id1 on GPU 4" in out
    assert "exit code 0 but no summary.json" in out


@pytest.mark.parametrize("jobs, given, expected", [(2, None, "1"), (1, None, "unset"), (2, "3", "3")])
def test_cpu_jobs_share_the_cores(tmp_path, monkeypatch, jobs, given, expected):
    import torch

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    if given is None:
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    else:
        monkeypatch.setenv("OMP_NUM_THREADS", given)
    plan = write_plan(tmp_path, seeds=[1, 2])
    fake = write_fake_python(tmp_path, 'echo "threads ${OMP_NUM_THREADS-unset}"\n')
    assert main(["--plan", plan, "--python", fake, "--jobs", str(jobs)]) == 1  # no summary: failed
    for seed in (1, 2):
        log = (tmp_path / "runs" / "tiny" / f"cifar10_resnet20_W4A4_granq_id{seed}" / "cell.log").read_text()
        assert f"threads {expected}\n" in log
        # The command line of cell.log shows the setting the run got from the plan call, to rerun it alike.
        assert (" OMP_NUM_THREADS=1 " in log.splitlines()[0]) == (jobs == 2 and given is None)


def test_sigterm_stops_each_run_with_one_sigterm(tmp_path):
    plan = write_plan(tmp_path, seeds=[1, 2])
    # Stands in for a run that takes a second to checkpoint after SIGTERM (a signal meanwhile is logged too)
    # and exits 143; without the signal it ends after 20 s with exit code 0.
    fake = write_fake_python(tmp_path, 'trap \'echo "got TERM"\' TERM\nsleep 20 & pid=$!\nwait $pid\n'
                                       'if [ $? -gt 128 ]; then sleep 1 & wait $!; kill $pid; exit 143; fi\n')
    process = subprocess.Popen([sys.executable, TOOL, "--plan", plan, "--python", fake, "--jobs", "2"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    logs = [tmp_path / "runs" / "tiny" / f"cifar10_resnet20_W4A4_granq_id{seed}" / "cell.log" for seed in (1, 2)]
    deadline = time.time() + 60
    while not all(log.exists() and "fake run" in log.read_text() for log in logs):
        assert time.time() < deadline and process.poll() is None, process.communicate()
        time.sleep(0.05)
    process.send_signal(signal.SIGTERM)
    out, err = process.communicate(timeout=60)
    assert process.returncode == 130, err
    for seed, log in enumerate(logs, 1):
        assert log.read_text().count("got TERM") == 1
        assert f"stopped {seed}/2 cifar10_resnet20_W4A4_granq_id{seed}" in out
    assert "interrupted: rerun the same command to resume" in err


def test_two_cell_plan_interrupted_then_rerun_and_tabulated(tmp_path, cifar_folder, capsys):
    tiny = [f"dataPath={cifar_folder}", "teacher_weights=random", "nEpochs=1", "iters_per_epoch=2", "batchSize=4",
            "warmup_epochs=0", "nThreads=0", "test_batch_size=8",
            "quant_impl=eager"]  # compiling would take longer than the run
    plan = write_plan(tmp_path, bits=[3, 4], set=tiny)
    cells = tmp_path / "runs" / "tiny"
    first, second = (cells / f"cifar10_resnet20_W{b}A{b}_granq_id1" for b in (3, 4))

    assert main(["--plan", plan, "--max-cells", "1"]) == 0  # stops after the first cell
    out = capsys.readouterr().out
    assert "start  1/1 cifar10_resnet20_W3A3_granq_id1" in out and "done   1/1 cifar10_resnet20_W3A3" in out
    [run_dir] = [p for p in first.iterdir() if p.is_dir()]
    assert (run_dir / "summary.json").exists() and not second.exists()

    assert main(["--plan", plan]) == 0
    out = capsys.readouterr().out
    assert cell_lines(out, "skip") == ["cifar10_resnet20_W3A3_granq_id1"]
    assert "start  1/1 cifar10_resnet20_W4A4_granq_id1" in out and "done   1/1 cifar10_resnet20_W4A4" in out
    assert [p for p in first.iterdir() if p.is_dir()] == [run_dir]  # not run again
    assert "--conf_path" in (second / "cell.log").read_text()

    results = (cells / "results.md").read_text()
    assert results in out
    row = table_row(results, "CIFAR-10")
    for cell in (first, second):
        [summary] = cell.glob("*/summary.json")
        summary = json.loads(summary.read_text())
        assert row[f"W{summary['qw']}A{summary['qa']}"] == f"{summary['student_top1']:.2f} (n=1)"
    assert row["W5A5"] == "–"


@pytest.mark.parametrize("script, cells, main_py", [("run_all_cifar.sh", 18, "CIFAR/main.py"),
                                                    ("run_all_imagenet.sh", 27, "ImageNet/main.py")])
def test_run_all_scripts_run_their_plan_and_pass_arguments_on(tmp_path, script, cells, main_py):
    result = subprocess.run(["bash", os.path.join(ROOT, script), "--dry-run", "--save-path", str(tmp_path)],
                            cwd=tmp_path, env={**os.environ, "PYTHON": sys.executable},
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    listed = [line for line in result.stdout.splitlines() if line.startswith("run ")]
    assert len(listed) == cells and all(main_py in line for line in listed)
    assert {line.split("--id ")[1].split()[0] for line in listed} == {"1", "2", "3"}
    assert list(tmp_path.iterdir()) == []


TINY_RUN = ["teacher_weights=random", "nEpochs=1", "iters_per_epoch=2", "batchSize=4", "warmup_epochs=0",
            "nThreads=0", "test_batch_size=8", "quant_impl=eager"]
# Long enough to be stopped in epoch 2 (as tests/e2e/test_resume.py), deterministic to compare students.
RESUMABLE_RUN = [*TINY_RUN, "nEpochs=3", "iters_per_epoch=5", "batchSize=24", "log_interval=1", "deterministic=true"]


def wait_for(condition, what: str, process=None, timeout: float = 120):
    deadline = time.time() + timeout
    while not condition():
        assert time.time() < deadline, f"timed out waiting for {what}"
        assert process is None or process.poll() is None, (what, process.communicate())
        time.sleep(0.05)


def run_dirs(cell) -> list:
    """The run directories in a cell's folder (not the submitit folder of --launcher slurm)."""
    return sorted(p for p in cell.iterdir() if p.is_dir() and p.name != "submitit") if cell.exists() else []


def test_prefetch_fetches_each_teacher_and_test_set_once_before_any_cell(tmp_path, capsys, monkeypatch):
    from ..unit.test_locks import fake_downloads, install_fake_downloads

    served = fake_downloads(tmp_path)
    urls = install_fake_downloads(served, monkeypatch.setattr)
    plan = write_plan(tmp_path, seeds=[1, 2], set=[f"dataPath={served['data']}"])  # the published teacher
    fake = write_fake_python(tmp_path, "exit 0\n")
    assert main(["--plan", plan, "--python", fake, "--dry-run"]) == 0
    assert urls == [] and "fetch  " not in capsys.readouterr().out  # a dry run fetches nothing

    assert main(["--plan", plan, "--python", fake]) == 1  # the fake runs write no summary
    out = capsys.readouterr().out
    assert sorted(url.rsplit("/", 1)[1] for url in urls) == ["cifar-10-python.tar.gz",
                                                             "resnet20_cifar10-0597-9b0024ac.pth.zip"]
    lines = out.splitlines()
    fetched = [i for i, line in enumerate(lines) if line.startswith("fetch  ")]
    started = [i for i, line in enumerate(lines) if "] start  " in line]
    assert len(fetched) == 2 and len(started) == 2 and max(fetched) < min(started)
    assert "fetch  teacher resnet20_cifar10: " in out and f"fetch  cifar10 test set: {served['data']}" in out
    assert main(["--plan", plan, "--python", fake]) == 1
    assert len(urls) == 2  # found, not fetched again


def test_jobs_spread_over_every_visible_gpu(tmp_path, capsys, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,5")
    plan = write_plan(tmp_path, seeds=[1, 2])
    fake = write_fake_python(tmp_path, "sleep 1\n")  # both run at once
    assert main(["--plan", plan, "--python", fake, "--jobs", "2"]) == 1  # no summary: failed
    out = capsys.readouterr().out
    assert "--jobs 2 and 2 visible GPUs: the cells are spread over GPUs 3,5, each run sees one" in out
    logs = [(tmp_path / "runs" / "tiny" / f"cifar10_resnet20_W4A4_granq_id{seed}" / "cell.log").read_text()
            for seed in (1, 2)]
    assert "fake run: CUDA_VISIBLE_DEVICES=3 " in logs[0] and "fake run: CUDA_VISIBLE_DEVICES=5 " in logs[1]
    assert all("--set GPU=0" in log for log in logs)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)  # one GPU: every run sees it, no spreading
    assert main(["--plan", plan, "--python", fake, "--jobs", "2"]) == 1
    assert "visible GPUs" not in capsys.readouterr().out


def descendants(pid: int) -> list[int]:
    """The processes below ``pid`` (Linux /proc): a launcher's runs, or a SLURM job's tasks and their children."""
    children = {}
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{entry}/stat") as f:
                parent = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(parent, []).append(int(entry))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="finds the run's process in /proc")
def test_two_concurrent_calls_run_each_cell_once(tmp_path, capsys):
    plan = write_plan(tmp_path, seeds=[1, 2], set=[f"dataPath={tmp_path / 'images'}", *TINY_RUN])
    cells = [tmp_path / "runs" / "tiny" / f"cifar10_resnet20_W4A4_granq_id{seed}" for seed in (1, 2)]
    command = [sys.executable, TOOL, "--plan", plan]
    first = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for(lambda: (cells[0] / "cell.log").exists(), "the first call to start cell 1", first)
    # The first call and its run of cell 1 (in a session of its own, once started) pause while the status and the
    # second call run, the call holding cell 1's lock (taken before cell.log is written), so that the calls overlap
    # however fast or loaded the machine: the second finds cell 1 held and runs cell 2; the first, resumed, ends
    # cell 1 and finds cell 2 done.
    os.kill(first.pid, signal.SIGSTOP)
    paused = [first.pid, *descendants(first.pid)]
    for pid in paused[1:]:
        os.kill(pid, signal.SIGSTOP)
    try:
        assert main(["--plan", plan, "--status"]) == 0
        assert f"running  {cells[0].name}: in a local call" in capsys.readouterr().out
        second = subprocess.run(command, capture_output=True, text=True, timeout=300)
    finally:
        for pid in reversed(paused):
            os.kill(pid, signal.SIGCONT)
    out_first = first.communicate(timeout=300)
    assert (first.returncode, second.returncode) == (0, 0), (out_first, second.stdout, second.stderr)
    assert f"skip   {cells[0].name}: running in another call (its lock {cells[0] / 'cell.lock'} is held)" \
           in second.stdout
    assert f"skip   {cells[1].name}: done" in out_first[0]
    for cell in cells:
        [run_dir] = run_dirs(cell)
        assert (run_dir / "summary.json").exists()
    assert main(["--plan", plan, "--status"]) == 0
    out = capsys.readouterr().out
    assert all(f"done     {cell.name}: " in out for cell in cells) and "2 done" in out


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_a_killed_launcher_stops_its_run_at_a_checkpoint(tmp_path, cifar_folder):
    from utils.system.locks import held_elsewhere

    plan = write_plan(tmp_path, set=[f"dataPath={cifar_folder}", *RESUMABLE_RUN])
    cell = tmp_path / "runs" / "tiny" / "cifar10_resnet20_W4A4_granq_id1"
    launcher = subprocess.Popen([sys.executable, TOOL, "--plan", plan], stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
    wait_for(lambda: any((d / "metrics.jsonl").exists() and (d / "metrics.jsonl").read_text()
                         for d in run_dirs(cell)), "epoch 1 of the run", launcher)
    launcher.kill()
    launcher.wait()
    assert held_elsewhere(str(cell / "cell.lock"))  # the run holds the cell until it has ended
    wait_for(lambda: not held_elsewhere(str(cell / "cell.lock")), "the run to end")
    log = (cell / "cell.log").read_text()
    assert "SIGTERM received" in log and "checkpoint written" in log
    [run_dir] = run_dirs(cell)
    assert (run_dir / "checkpoint.pt").exists() and not (run_dir / "summary.json").exists()


ADDON_VARIANTS = ("baseline", "attention", "cam", "reliable_ce", "pseudo_label", "lowpass", "all")
TUNED_VARIANTS = ("cam_reliable_ce", "cam_reliable_ce5", "lowpass160", "cam50_reliable_ce")  # addons_cpu's tuning
# rounds, on the option-A teacher


def test_addons_cpu_plan_lists_every_variant_of_each_teacher(tmp_path, capsys):
    assert main(["--plan", "addons_cpu", "--save-path", str(tmp_path), "--dry-run"]) == 0
    out = capsys.readouterr().out
    option_a = {f"cifar10_resnet20a_W3A3_granq_{v}_id{seed}" for v in ADDON_VARIANTS + TUNED_VARIANTS
                for seed in (1, 2, 3)}
    pytorchcv = {f"cifar10_resnet20_W3A3_granq_{v}_id{seed}" for v in ("baseline", "plus") for seed in (1, 2, 3)}
    assert set(cell_lines(out, "run")) == option_a | pytorchcv and "39 cells in" in out
    commands = {line.split()[1].rstrip(":"): line for line in out.splitlines() if line.startswith("run ")}
    cam = commands["cifar10_resnet20a_W3A3_granq_cam_id2"]
    assert "--set 'student_losses=[kd, cam]'" in cam
    tuned = commands["cifar10_resnet20a_W3A3_granq_cam_reliable_ce5_id3"]
    assert "--set 'student_losses=[kd, cam, reliable_ce]' --set reliable_ce_weight=5" in tuned
    assert "akamaster_resnet20-12fca82f.th" in cam and "--set nEpochs=6 --set iters_per_epoch=200" in cam
    plus = commands["cifar10_resnet20_W3A3_granq_plus_id1"]
    assert "--set recipe=plus" in plus and "resnet20_cifar10_pytorchcv_jpeg.pth" in plus
    assert "student_losses" not in commands["cifar10_resnet20_W3A3_granq_baseline_id1"]
    assert list(tmp_path.iterdir()) == []


METHODS = {"granq": "granq", "adadfq": "layerwise", "gdfq": "layerwise", "synq": "layerwise",
           "synq_granq": "granq", "zeroq": "layerwise"}


def test_methods_plan_takes_each_recipes_quantizer_and_compares_with_granq(tmp_path, capsys):
    plan = load_plan(resolve_plan("methods_cpu"))
    assert plan.act_modes == ("config",) and plan.baseline == "granq"
    assert main(["--plan", "methods_cpu", "--save-path", str(tmp_path), "--dry-run"]) == 0
    out = capsys.readouterr().out
    expected = {f"{stem}_W3A3_{mode}_{variant}_id{seed}" for stem in ("cifar10_resnet20a", "cifar10_resnet20")
                for variant, mode in METHODS.items() for seed in (1, 2, 3)}
    assert set(cell_lines(out, "run")) == expected and "36 cells in" in out
    commands = {line.split()[1].rstrip(":"): line for line in out.splitlines() if line.startswith("run ")}
    gdfq = commands["cifar10_resnet20a_W3A3_layerwise_gdfq_id1"]
    assert "--set recipe=gdfq" in gdfq and "act_mode" not in gdfq  # the recipe names it
    synq = commands["cifar10_resnet20_W3A3_layerwise_synq_id2"]
    assert "--set pool_size=1280 --set pool_iters=250" in synq and "resnet20_cifar10_pytorchcv_jpeg.pth" in synq
    assert "--set nEpochs=0" in commands["cifar10_resnet20a_W3A3_layerwise_zeroq_id3"]
    assert list(tmp_path.iterdir()) == []


def test_variants_flag_runs_only_the_named_variants(tmp_path, capsys):
    args = ["--plan", "addons_cpu", "--save-path", str(tmp_path), "--dry-run"]
    assert main([*args, "--variants", "plus", "baseline"]) == 0
    names = cell_lines(capsys.readouterr().out, "run")
    cells = ("cifar10_resnet20a_W3A3_granq_baseline", "cifar10_resnet20_W3A3_granq_baseline",
             "cifar10_resnet20_W3A3_granq_plus")
    expected = {f"{cell}_id{seed}" for seed in (1, 2, 3) for cell in cells}
    assert set(names) == expected and len(names) == 9
    assert main([*args, "--variants", "baseline", "cam_reliable_ce6"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --variants cam_reliable_ce6: plan addons_cpu has the variants baseline, attention")
    assert main(["--plan", write_plan(tmp_path), "--dry-run", "--variants", "a"]) == 2
    assert "--variants a: plan tiny has no variants" in capsys.readouterr().err


def test_addons_cifar100_plan_runs_every_variant_at_the_official_settings(tmp_path, capsys):
    plan = load_plan(resolve_plan("addons_cifar100"))
    assert [name for name, _ in plan.variants] == [*ADDON_VARIANTS, "plus"] and plan.overrides == ()
    assert main(["--plan", "addons_cifar100", "--save-path", str(tmp_path), "--dry-run"]) == 0
    assert len(cell_lines(capsys.readouterr().out, "run")) == 8 * 3


@pytest.mark.parametrize("keys, message", [
    ({"variants": ["a"]}, r"variants must be a map of name = \[key=value, ...\]"),
    ({"variants": {"a b": []}}, r"variant name 'a b' must be letters, digits, _ or -"),
    ({"variants": {"a": "temperature=5"}}, r"variants.a must be a list of strings"),
    ({"variants": {"a": ["qw=4"]}}, r"variants.a: qw is set by each cell; list the bit-width in bits"),
    ({"variants": {"a": ["temprature=5"]}}, r"variants.a: unknown config key\(s\): temprature"),
    ({"variants": {"a": []}, "per_config": {"cifar100_resnet20": {}}}, r"per_config.cifar100_resnet20 names no "
                                                                        r"config of the plan \(cifar10_resnet20\)"),
    ({"variants": {"a": []}, "per_config": {"cifar10_resnet20": {"variants": ["b"]}}},
     r"per_config.cifar10_resnet20.variants names b, not among the variants \(a\)"),
    ({"per_config": {"cifar10_resnet20": {"sets": []}}}, r"per_config.cifar10_resnet20 must be \{variants"),
    ({"variants": {"a": ["student_losses=[kd, focal]"]}}, r"cell cifar10_resnet20_W4A4_granq_a_id1: student_losses"),
])
def test_bad_variants_are_refused_with_a_clear_error(tmp_path, capsys, keys, message):
    assert main(["--plan", write_plan(tmp_path, **keys), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and len(err.splitlines()) == 1
    assert re.search(message, err), err


def test_variant_names_head_their_tables(tmp_path, capsys):
    plan = write_plan(tmp_path, variants={"plain": [], "warm": ["temperature=5"]},
                      per_config={"cifar10_resnet20": {"set": ["lr_S=0.001"]}})
    cells = tmp_path / "runs" / "tiny"
    for variant, top1, temperature in (("plain", 40.0, 20), ("warm", 50.0, 5)):
        run_dir = cells / f"cifar10_resnet20_W4A4_granq_{variant}_id1" / "run"
        run_dir.mkdir(parents=True)
        (run_dir / "summary.json").write_text(json.dumps(
            {"dataset": "cifar10", "network": "resnet20_cifar10", "qw": 4, "qa": 4, "act_mode": "granq",
             "weight_granularity": "kernel", "student_top1": top1}))
        (run_dir / "config.hocon").write_text(f"temperature = {temperature}\n")
    assert main(["--plan", plan, "--dry-run"]) == 0
    assert cell_lines(capsys.readouterr().out, "skip") == ["cifar10_resnet20_W4A4_granq_plain_id1",
                                                           "cifar10_resnet20_W4A4_granq_warm_id1"]
    assert main(["--plan", plan]) == 0
    results = (cells / "results.md").read_text()
    for variant, top1 in (("plain", "40.00"), ("warm", "50.00")):
        table = results.split(f"### variant {variant}: act_mode = granq")[1].split("###")[0]
        assert f"| {top1} (n=1) |" in table
