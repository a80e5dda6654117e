"""What a benchmark records besides its own timings: the machine, the process's memory, a summary.

Shared by `rlp bench` (training steps), its `--eval` (bench_eval.py) and `--vs-trl` (bench_trl.py).
"""

from __future__ import annotations

import contextlib
import math
import os
import platform
import resource
import statistics
import time
from pathlib import Path


def summarize(values: list[float]) -> dict:
    """Median and spread of a list of per-step values."""
    ordered = sorted(values)
    if len(ordered) >= 4:
        q1, _, q3 = statistics.quantiles(ordered, n=4)
    else:
        q1, q3 = ordered[0], ordered[-1]
    return {"median": statistics.median(ordered), "min": ordered[0], "max": ordered[-1], "q1": q1, "q3": q3,
            "n": len(ordered)}


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far (ru_maxrss is in KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if platform.system() == "Darwin" else peak / 2**10


def cpu_counters() -> list[int] | None:
    """The machine's cumulative CPU time counters (Linux /proc/stat: user nice system idle iowait irq softirq steal)."""
    with contextlib.suppress(OSError, ValueError, IndexError):
        return [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:9]]
    return None


def machine_load(before: list[int] | None, after: list[int] | None) -> dict:
    """How busy the whole machine was between two cpu_counters(): other processes, and a hypervisor's steal."""
    if not before or not after:
        return {}
    delta = [b - a for a, b in zip(before, after)]
    total = sum(delta) or 1
    return {"busy_fraction": 1 - (delta[3] + delta[4]) / total, "steal_fraction": delta[7] / total}


def machine_info(threads: int) -> dict:
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    info = {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": threads, "platform": platform.platform()}
    if hasattr(os, "sched_getaffinity"):
        info["usable_cores"] = len(os.sched_getaffinity(0))
    return info


def device_info(device) -> dict:
    import torch

    info = {"type": device.type, "name": str(device)}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(name=props.name, memory_gb=round(props.total_memory / 2**30, 1))
    return info


def fmt(x: float, unit: str = "") -> str:
    if not math.isfinite(x):
        return str(x)
    if unit == "FLOP/s":
        for scale, prefix in ((1e12, "T"), (1e9, "G"), (1e6, "M")):
            if abs(x) >= scale:
                return f"{x / scale:.2f} {prefix}{unit}"
    text = f"{x:.3f}" if abs(x) < 100 else f"{x:.1f}"
    return f"{text} {unit}".strip()


def result_path(out: Path, result: dict) -> Path:
    model = Path(result["model"]).name.replace(".", "_") or "model"
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return out / f"{model}-{result['path']}-{result['device']['type']}-{stamp}.json"
