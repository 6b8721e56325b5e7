"""What the benchmarks and the probes of ``checks/`` share: the machine's description and device
synchronisation."""

from __future__ import annotations

import json
import os
import platform
import time

import torch


def synchronize(device: torch.device) -> None:
    """Wait for queued CUDA work, so that a timer measures it; nothing on the CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(devices) -> dict:
    """Versions, CPU, thread count, load average and CUDA device: recorded with every figure."""
    info = {"torch": torch.__version__, "python": platform.python_version(), "cpu": cpu_name(),
            "cpu_count": os.cpu_count(), "threads": torch.get_num_threads(), "load_average": os.getloadavg()}
    if any(torch.device(d).type == "cuda" for d in devices):
        info["cuda_device"] = torch.cuda.get_device_name()
    return info


def describe(env: dict) -> str:
    """One line about the machine; a warning when other processes already keep its CPUs busy."""
    device = env.get("cuda_device", "no CUDA device")
    text = f"torch {env['torch']}, {env['cpu']}, {env['cpu_count']} CPUs, {env['threads']} threads, {device}"
    load = env["load_average"][0]
    if load > 0.5 * (env["cpu_count"] or 1):
        text += (f"\nWARNING: load average {load:.1f} before starting: other processes compete for the CPUs, "
                 f"so times are inflated and noisy (ratios within a run are fairer, figures across runs are not)")
    return text


def finish(env: dict, started: float, json_path: str | None, payload: dict) -> None:
    """Print the run's duration and load, and write ``{"environment": env, "args": ..., **payload}`` as JSON."""
    env["load_average_end"] = os.getloadavg()
    env["seconds"] = round(time.time() - started, 1)
    print(f"\n{env['seconds']} s; load average {env['load_average'][0]:.2f} at the start, "
          f"{env['load_average_end'][0]:.2f} at the end")
    if json_path:
        with open(json_path, "w") as f:
            json.dump({"environment": env, **payload}, f, indent=1)
