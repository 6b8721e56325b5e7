import os
import subprocess
import sys
import textwrap

import pytest

from ..conftest import ROOT

LEFT_RUNNING = textwrap.dedent("""
    import sys
    sys.path.insert(0, {root!r})
    import torch
    from utils.data.workers import WorkerLoader

    loader = WorkerLoader(torch.arange(64), batch_size=4, num_workers=2, persistent_workers={persistent})
    iterator = iter(loader)
    next(iterator)  # two workers started, the pass left unfinished: as when an exception ends an evaluation
    print("started", flush=True)
""")


def run_and_exit(persistent: bool) -> subprocess.CompletedProcess:
    script = LEFT_RUNNING.format(root=ROOT, persistent=persistent)
    return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)


def test_a_process_exits_although_its_loader_workers_ignore_sigterm():
    """multiprocessing ends daemonic children at exit with SIGTERM and waits for them: WorkerLoader's workers,
    which ignore it, must be told to stop first, or the process hangs at exit (the timeout fails the test)."""
    for persistent in (True, False):
        done = run_and_exit(persistent)
        assert done.returncode == 0 and done.stdout == "started\n", done.stderr


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="reads signal dispositions from /proc (Linux)")
def test_loader_workers_leave_the_stop_signals_to_the_main_process():
    script = textwrap.dedent(f"""
        import os, sys
        sys.path.insert(0, {ROOT!r})
        import torch
        from utils.data.workers import WorkerLoader

        class Dispositions(torch.utils.data.Dataset):
            def __len__(self):
                return 1

            def __getitem__(self, index):
                with open("/proc/self/status") as f:
                    return [line.split()[1] for line in f if line.startswith("SigIgn")][0]

        print(next(iter(WorkerLoader(Dispositions(), num_workers=1)))[0])
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    ignored = int(done.stdout.strip(), 16)
    for signum in (1, 2, 15):  # SIGHUP, SIGINT, SIGTERM
        assert ignored >> (signum - 1) & 1, (signum, hex(ignored))


def test_a_worker_that_missed_its_shutdown_is_killed_at_exit():
    """torch's own shutdown sends SIGTERM to a worker that does not stop within its timeout; this one ignores it."""
    script = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {ROOT!r})
        import torch
        from utils.data.workers import WorkerLoader

        loader = WorkerLoader(torch.arange(64), batch_size=4, num_workers=2, persistent_workers=True)
        iterator = iter(loader)
        next(iterator)
        iterator._shutdown = True  # as after a shutdown whose workers did not stop in time
        print("started", flush=True)
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and done.stdout == "started\n", done.stderr
