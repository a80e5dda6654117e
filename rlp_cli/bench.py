"""`rlp bench`: time whole RLP steps and show where the time of a step goes.

A step is timed end to end (Trainer.train_step) after warm-up steps, and split two ways:
- by phase, as the trainer records them: EMA scoring, rollout, S_pred scoring (naive path only),
  update, EMA update, and "other" (rewards, metrics, bookkeeping) = step - sum of phases;
- into time inside model calls (forwards of policy / EMA teacher / reference, backward, optimizer
  step) and time outside them: the overhead of the code around the model.
Achieved model FLOP/s (the trainer's own per-step estimate) is set against the FLOP/s of a plain
matrix product of a similar size on the same device, our practical "limit".

The reference setting (issue 5): G=8 thoughts of up to 32 tokens for each of 4 contexts cut from
windows of 128 tokens, with a tiny learning rate so the weights barely move while timing.
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
from typing import List, Optional

import typer

from rlp_cli.errors import UserError

REFERENCE_SETTING = [
    "objective.num_rollouts=8",
    "objective.thought_tokens=32",
    "optim.batch_documents=4",
    "data.max_context_tokens=128",
    "optim.lr=1.0e-9",
]
PHASES = ["rollout", "s_pred_scoring", "ema_scoring", "update", "ema_update"]


# --------------------------------------------------------------------------------------------
# Measuring


class ModelCallClock:
    """Wall time spent inside model calls: top-level forwards (hooks), backward, optimizer steps.

    Everything else in a step is overhead of the code around the model. On CUDA each boundary
    synchronises so that queued kernels are billed to the call that launched them.
    """

    def __init__(self, device):
        import torch

        self.torch, self.cuda = torch, device.type == "cuda"
        self.seconds = {"forward": 0.0, "backward": 0.0, "optimizer": 0.0}
        self._handles, self._started = [], {}
        self._original_backward = None

    def _now(self) -> float:
        if self.cuda:
            self.torch.cuda.synchronize()
        return time.perf_counter()

    def _start(self, key):
        self._started[key] = self._now()

    def _stop(self, key, bucket):
        self.seconds[bucket] += self._now() - self._started.pop(key)

    def attach(self, models, optimizer) -> None:
        for model in models:
            key = ("forward", id(model))
            self._handles.append(model.register_forward_pre_hook(lambda *a, k=key: self._start(k)))
            self._handles.append(model.register_forward_hook(lambda *a, k=key: self._stop(k, "forward")))
        self._handles.append(optimizer.register_step_pre_hook(lambda *a: self._start("optimizer")))
        self._handles.append(optimizer.register_step_post_hook(lambda *a: self._stop("optimizer", "optimizer")))
        # The trainer calls loss.backward(); Tensor.backward looks torch.autograd.backward up at call time.
        self._original_backward = original = self.torch.autograd.backward

        def timed_backward(*args, **kwargs):
            start = self._now()
            try:
                return original(*args, **kwargs)
            finally:
                self.seconds["backward"] += self._now() - start

        self.torch.autograd.backward = timed_backward

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        if self._original_backward is not None:
            self.torch.autograd.backward = self._original_backward
            self._original_backward = None

    def take(self) -> dict:
        """Seconds per kind of call since the last take()."""
        out = dict(self.seconds)
        self.seconds = {k: 0.0 for k in self.seconds}
        return out


def matmul_limit(device, dtype, hidden: int, rows: int = 4096, min_seconds: float = 0.3) -> dict:
    """FLOP/s of torch.matmul [rows x hidden] @ [hidden x 4*hidden] on this device: the practical ceiling."""
    import torch

    a = torch.randn(rows, hidden, device=device, dtype=dtype)
    b = torch.randn(hidden, 4 * hidden, device=device, dtype=dtype)
    flops = 2.0 * rows * hidden * 4 * hidden

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for _ in range(3):
        torch.matmul(a, b)
    sync()
    times, total = [], 0.0
    while total < min_seconds or len(times) < 5:
        start = time.perf_counter()
        torch.matmul(a, b)
        sync()
        times.append(time.perf_counter() - start)
        total += times[-1]
    return {"shape": f"[{rows} x {hidden}] @ [{hidden} x {4 * hidden}]", "dtype": str(dtype).replace("torch.", ""),
            "repeats": len(times), "flops_per_s": flops / statistics.median(times),
            "best_flops_per_s": flops / min(times)}


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


def machine_info(threads: int) -> dict:
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    info = {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": threads,
            "platform": platform.platform()}
    if hasattr(os, "sched_getaffinity"):
        info["usable_cores"] = len(os.sched_getaffinity(0))
    if hasattr(os, "getloadavg"):
        info["load_average_at_start"] = [round(x, 2) for x in os.getloadavg()]
    return info


def device_info(device) -> dict:
    import torch

    info = {"type": device.type, "name": str(device)}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(name=props.name, memory_gb=round(props.total_memory / 2**30, 1))
    return info


def bench_config(model: Optional[str], overrides: list[str], naive: bool, config: str = "default"):
    from rlp_cli.config import load_config

    settings = list(REFERENCE_SETTING)
    if model:
        settings.append(f"model.name={model}")
    if naive:
        settings.append("fast_path=false")
    return load_config(config, settings + list(overrides))


def run_bench(cfg, warmup: int, steps: int, log=print) -> dict:
    """Warm up, then time `steps` whole training steps of a Trainer built from cfg. Returns the result."""
    import torch

    from rlp_cli import runio
    from rlp_cli.train import Trainer

    if warmup < 1 or steps < 1:
        raise UserError(f"rlp bench: --warmup {warmup} --steps {steps}: both must be at least 1 (the first step "
                        "builds the EMA teacher and warms the allocator). Fix: pass --warmup 1 --steps 3 or more.")
    if cfg.objective.name == "ntp":
        raise UserError("rlp bench: objective.name=ntp has no thoughts to time. Fix: bench an rlp or rpt config.")
    built = time.perf_counter()
    trainer = Trainer(cfg)
    setup_s = time.perf_counter() - built
    device, threads = trainer.device, trainer.threads
    rss_after_load = peak_rss_mb()
    log(f"rlp bench: {cfg.model.name} on {device} ({threads} threads), "
        f"{'fast' if cfg.fast_path else 'naive'} path, G={cfg.objective.num_rollouts}, "
        f"thought tokens={cfg.objective.thought_tokens}, {cfg.optim.batch_documents} documents x "
        f"{cfg.data.max_context_tokens} tokens; setup {setup_s:.1f} s")

    for i in range(warmup):
        metrics, _ = trainer.train_step()
        log(f"  warm-up {i + 1}/{warmup}: {metrics['step_time']:.3f} s")

    clock = ModelCallClock(device)
    clock.attach([m for m in (trainer.model, trainer.teacher, trainer.reference) if m is not None], trainer.optimizer)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    rows = []
    try:
        for i in range(steps):
            before = dict(trainer.totals)
            clock.take()
            metrics, _ = trainer.train_step()
            calls = clock.take()
            step_time = metrics["step_time"]
            phases = {p: metrics.get(f"time/{p}", 0.0) for p in PHASES}
            generated = trainer.totals["generated_tokens"] - before["generated_tokens"]
            flops = trainer.totals["flops"] - before["flops"]
            model_calls = sum(calls.values())
            rows.append({
                "step_time_s": step_time, "steps_per_s": 1.0 / step_time,
                "thought_tokens": generated, "thought_tokens_per_s": generated / step_time,
                "flops": flops, "flops_per_s": flops / step_time,
                **{f"phase_{p}_s": v for p, v in phases.items()},
                "phase_other_s": step_time - sum(phases.values()),
                **{f"model_{k}_s": v for k, v in calls.items()},
                "outside_model_calls_s": step_time - model_calls,
                "outside_model_calls_fraction": (step_time - model_calls) / step_time,
                "num_contexts": metrics.get("num_contexts", 0),
            })
            log(f"  step {i + 1}/{steps}: {step_time:.3f} s, {generated / step_time:.1f} thought tokens/s")
    finally:
        clock.detach()

    hidden = getattr(trainer.model.config, "hidden_size", 1024)
    limit = matmul_limit(device, next(trainer.model.parameters()).dtype, hidden)
    summary = {key: summarize([r[key] for r in rows]) for key in rows[0]}
    achieved = summary["flops_per_s"]["median"]
    memory = {"peak_rss_mb": peak_rss_mb(), "rss_peak_after_load_mb": rss_after_load}
    if device.type == "cuda":
        memory["cuda_max_allocated_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
    machine = machine_info(threads)
    if hasattr(os, "getloadavg"):
        machine["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    return {
        "kind": "rlp bench",
        "path": "fast" if cfg.fast_path else "naive",
        "model": cfg.model.name,
        "warmup_steps": warmup, "timed_steps": steps, "setup_s": setup_s,
        "summary": summary, "steps": rows, "memory": memory,
        "flops": {"per_token": trainer.flops_per_token, "achieved_flops_per_s": achieved,
                  "matmul_limit": limit, "fraction_of_limit": achieved / limit["flops_per_s"]},
        "machine": machine, "device": device_info(device),
        "provenance": runio.provenance(n_params=sum(p.numel() for p in trainer.model.parameters()),
                                       model_source=trainer.model_source),
        "config": cfg.to_dict(),
    }


# --------------------------------------------------------------------------------------------
# Reporting


def _fmt(x: float, unit: str = "") -> str:
    if not math.isfinite(x):
        return str(x)
    for scale, prefix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= scale and unit in ("FLOP/s", "FLOP"):
            return f"{x / scale:.2f} {prefix}{unit}"
    return f"{x:.3f}{(' ' + unit) if unit else ''}" if abs(x) < 100 else f"{x:.1f}{(' ' + unit) if unit else ''}"


def render(result: dict, console) -> None:
    from rich.table import Table

    s = result["summary"]
    table = Table(title=f"rlp bench: {result['model']}, {result['path']} path, {result['timed_steps']} timed steps "
                        f"(device {result['device']['name']}, {result['machine']['torch_threads']} threads)",
                  title_justify="left")
    for col in ("", "median", "min", "max", "share of step"):
        table.add_column(col, justify="right" if col else "left")
    step = s["step_time_s"]["median"]

    def row(label, key, unit="", share=False):
        v = s[key]
        table.add_row(label, _fmt(v["median"], unit), _fmt(v["min"], unit), _fmt(v["max"], unit),
                      f"{100 * v['median'] / step:.1f}%" if share else "")

    row("step time", "step_time_s", "s")
    row("steps / s", "steps_per_s")
    row("thought tokens / s", "thought_tokens_per_s")
    for p in PHASES + ["other"]:
        if p == "other" or s[f"phase_{p}_s"]["max"] > 0:
            row(f"  {p.replace('_', ' ')}", f"phase_{p}_s", "s", share=True)
    row("inside model calls: forward", "model_forward_s", "s", share=True)
    row("inside model calls: backward", "model_backward_s", "s", share=True)
    row("inside model calls: optimizer", "model_optimizer_s", "s", share=True)
    row("outside model calls", "outside_model_calls_s", "s", share=True)
    row("achieved model FLOP/s", "flops_per_s", "FLOP/s")
    console.print(table)
    f, m = result["flops"], result["memory"]
    console.print(f"matmul limit {f['matmul_limit']['shape']} {f['matmul_limit']['dtype']}: "
                  f"{_fmt(f['matmul_limit']['flops_per_s'], 'FLOP/s')}; achieved {100 * f['fraction_of_limit']:.1f}% of it")
    mem = f"peak RSS {m['peak_rss_mb']:.0f} MB (after model load {m['rss_peak_after_load_mb']:.0f} MB)"
    if "cuda_max_allocated_mb" in m:
        mem += f"; CUDA max allocated {m['cuda_max_allocated_mb']:.0f} MB"
    console.print(mem)


def result_path(out: Path, result: dict) -> Path:
    model = Path(result["model"]).name.replace(".", "_") or "model"
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return out / f"{model}-{result['path']}-{result['device']['type']}-{stamp}.json"


# --------------------------------------------------------------------------------------------
# TRL comparison (optional)


def check_trl() -> None:
    """TRL is an optional extra, never in the default install; say how to get it when it is missing."""
    import importlib.util

    if importlib.util.find_spec("trl") is None:
        raise UserError("rlp bench --vs-trl: the comparison runs Hugging Face TRL's GRPOTrainer, and the package "
                        "`trl` is not installed (it is not part of rlp's default install). Fix: `pip install trl` "
                        "into a separate environment that keeps this torch and transformers, or drop --vs-trl.")


# --------------------------------------------------------------------------------------------
# The command


def register(app: typer.Typer) -> None:
    @app.command()
    def bench(
        model: Optional[str] = typer.Option(None, "--model", help="tiny | smollm2-135m | a local model path "
                                            "(default: the config's model)."),
        config: str = typer.Option("default", "--config", help="Base run config (built-in name or YAML)."),
        set_: Optional[List[str]] = typer.Option(None, "--set", help="Override a config key after the reference "
                                                 "setting, e.g. --set objective.num_rollouts=4 (repeatable)."),
        naive: bool = typer.Option(False, "--naive", help="Time the naive reference path (fast_path=false)."),
        steps: int = typer.Option(3, "--steps", help="Timed steps."),
        warmup: int = typer.Option(1, "--warmup", help="Untimed warm-up steps before them."),
        vs_trl: bool = typer.Option(False, "--vs-trl", help="Also run TRL's GRPOTrainer at the same setting "
                                    "(needs `trl`)."),
        out: Path = typer.Option(Path("bench"), "--out", help="Folder for the JSON result."),
    ):
        """Time whole RLP steps (G=8, 32 thought tokens, 4 contexts of 128 tokens) and show where time goes."""
        from rich.console import Console

        from rlp_cli import runio

        console = Console()
        if vs_trl:
            check_trl()
        cfg = bench_config(model, list(set_ or []), naive, config)
        result = run_bench(cfg, warmup, steps, log=lambda msg: console.print(msg, highlight=False))
        render(result, console)
        path = result_path(out, result)
        runio.write_json(path, result)
        console.print(f"written {path}")
