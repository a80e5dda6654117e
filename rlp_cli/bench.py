"""`rlp bench`: time whole RLP steps and show where the time of a step goes.

A step is timed end to end (Trainer.train_step) after warm-up steps, and split two ways:
- by phase, as the trainer records them: rollout, S_pred scoring (naive path only), EMA scoring,
  update, EMA update, and "other" (rewards, metrics, bookkeeping) = step - sum of phases;
- into time inside model calls (forwards of policy / EMA teacher / reference, backward, optimizer
  step) and time outside them: the overhead of the code around the model.
Achieved model FLOP/s (the trainer's own per-step estimate) is set against the FLOP/s of a plain
matrix product of a similar size on the same device, our practical "limit". The process's CPU time
per step is recorded too: on a shared machine, wall time >> CPU time x threads means the step
waited for a core, and its wall time says more about the neighbours than about rlp.

The reference setting (issue 5): G=8 thoughts of up to 32 tokens for each of 4 contexts cut from
windows of 128 tokens, with a tiny learning rate so the weights barely move while timing.

`--eval` times `rlp eval`'s generation instead (bench_eval.py); `--vs-trl` runs the same setting
through Hugging Face TRL's GRPOTrainer as well (bench_trl.py).
"""

from __future__ import annotations

import copy
import os
import statistics
import time
from pathlib import Path
from typing import List, Optional

import typer

from rlp_cli.errors import UserError
from rlp_cli.measure import (cpu_counters, device_info, fmt, machine_info, machine_load, peak_rss_mb, result_path,
                              summarize)

REFERENCE_SETTING = [
    "objective.num_rollouts=8",
    "objective.thought_tokens=32",
    "optim.batch_documents=4",
    "data.max_context_tokens=128",
    "optim.lr=1.0e-9",
]
PHASES = ["rollout", "s_pred_scoring", "s_empty_scoring", "ema_scoring", "update", "ema_update"]


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


def bench_config(model: Optional[str], overrides: list[str], naive: bool, config: str = "default"):
    """The reference setting on top of a run config, then --model, --naive and the user's --set."""
    from rlp_cli.config import load_config

    settings = list(REFERENCE_SETTING)
    if model:
        settings.append(f"model.name={model}")
    if naive:
        settings.append("fast_path=false")
    return load_config(config, settings + list(overrides))


def _check_counts(warmup: int, steps: int) -> None:
    if warmup < 1 or steps < 1:
        raise UserError(f"rlp bench: --warmup {warmup} --steps {steps}: both must be at least 1 (the first step "
                        "builds the EMA teacher and warms the allocator). Fix: pass --warmup 1 --steps 3 or more.")


def run_bench(cfg, warmup: int, steps: int, log=print) -> dict:
    """Warm up, then time `steps` whole training steps of a Trainer built from cfg. Returns the result."""
    import torch

    from rlp_cli import runio
    from rlp_cli.train import Trainer

    _check_counts(warmup, steps)
    if cfg.objective.name == "ntp":
        raise UserError("rlp bench: objective.name=ntp has no thoughts to time. Fix: bench an rlp or rpt config.")
    built = time.perf_counter()
    trainer = Trainer(cfg)
    setup_s = time.perf_counter() - built
    device, threads = trainer.device, trainer.threads
    rss_after_load = peak_rss_mb()
    load_before = [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None
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
    rows, counters_before = [], cpu_counters()
    try:
        for i in range(steps):
            before = dict(trainer.totals)
            clock.take()
            cpu_start = time.process_time()
            metrics, _ = trainer.train_step()
            cpu_s = time.process_time() - cpu_start
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
                "cpu_s": cpu_s, "cpu_utilization": cpu_s / (step_time * threads),
                "num_contexts": metrics.get("num_contexts", 0),
            })
            log(f"  step {i + 1}/{steps}: {step_time:.3f} s ({cpu_s:.3f} s CPU), "
                f"{generated / step_time:.1f} thought tokens/s")
    finally:
        clock.detach()
    counters_after = cpu_counters()

    hidden = getattr(trainer.model.config, "hidden_size", 1024)
    limit = matmul_limit(device, next(trainer.model.parameters()).dtype, hidden)
    summary = {key: summarize([r[key] for r in rows]) for key in rows[0]}
    achieved = summary["flops_per_s"]["median"]
    memory = {"peak_rss_mb": peak_rss_mb(), "rss_peak_after_load_mb": rss_after_load}
    if device.type == "cuda":
        memory["cuda_max_allocated_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
    machine = machine_info(threads)
    machine.update(load_average_before=load_before, during_timed_steps=machine_load(counters_before, counters_after))
    if hasattr(os, "getloadavg"):
        machine["load_average_after"] = [round(x, 2) for x in os.getloadavg()]
    precision = reward_drift_vs_float32(trainer) if next(trainer.model.parameters()).dtype != torch.float32 else None
    return {
        "kind": "rlp bench",
        "precision_vs_float32": precision,
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


def reward_drift_vs_float32(trainer) -> dict | None:
    """What a low-precision policy does to the reward: the last step's thoughts scored both ways.

    The info gain is S_pred - S_ema, and the EMA teacher is float32 in both runs, so the reward's
    difference is S_pred(model.dtype policy) - S_pred(float32 copy of the master weights) on the same
    prompts and thoughts (naive_s_pred: prompt + thought + </think> re-encoded).
    """
    import torch

    batch = getattr(trainer, "last_batch", None)
    if not batch or batch["rollouts"].s_pred is None:
        return None
    reference = copy.deepcopy(trainer.model).float()
    with torch.no_grad():
        for p, master in zip(reference.parameters(), trainer.master.params):
            p.copy_(master)
    drift = info_gain_drift(trainer.model, reference, trainer)
    trainer.model.train()
    return drift


def info_gain_drift(low, reference, trainer) -> dict:
    """S_pred of the trainer's last thoughts under `low` minus under `reference`, set against the spread
    the advantages see (the reward's standard deviation within each context's G thoughts) and the share
    of same-context thought pairs whose order holds. Used by `rlp bench` and bench/bf16_drift.py."""
    from rlp_cli.scoring import naive_s_pred

    batch, g = trainer.last_batch, trainer.cfg.objective.num_rollouts
    scores = [naive_s_pred(m.eval(), batch["contexts"], batch["rollouts"], g, trainer.close_id, trainer.pad_id)[0]
              [:, 0].float().cpu() for m in (low, reference)]
    drift = scores[0] - scores[1]
    return {"dtype": str(next(low.parameters()).dtype).replace("torch.", ""), "thoughts": len(drift),
            "info_gain_difference_mean": float(drift.mean()), "info_gain_difference_mean_abs": float(drift.abs().mean()),
            "info_gain_difference_max_abs": float(drift.abs().max()),
            "reward_std_within_groups": float(batch["rewards"].float().cpu().view(-1, g).std(dim=-1).mean()),
            "advantage_rank_agreement": _rank_agreement(scores[1].view(-1, g), scores[0].view(-1, g))}


def _rank_agreement(a, b) -> float:
    """Fraction of same-context thought pairs that the two scorings order the same way (ties count as agreeing)."""
    agree = total = 0
    for x, y in zip(a.tolist(), b.tolist()):
        for i in range(len(x)):
            for j in range(i + 1, len(x)):
                total += 1
                agree += (x[i] - x[j]) * (y[i] - y[j]) >= 0
    return agree / total if total else 1.0


# --------------------------------------------------------------------------------------------
# Reporting


def render(result: dict, console) -> None:
    from rich.table import Table

    s, threads = result["summary"], result["machine"]["torch_threads"]
    table = Table(title=f"{result['model']}, {result['path']} path, {result['device']['name']}, {threads} threads: "
                        f"{result['timed_steps']} steps", title_justify="left")
    for col in ("", "median", "min", "max", "of step"):
        table.add_column(col, justify="right" if col else "left", no_wrap=True, min_width=None if col else 20)
    step = s["step_time_s"]["median"]

    def row(label, key, unit="", share=False):
        v = s[key]
        table.add_row(label, fmt(v["median"], unit), fmt(v["min"], unit), fmt(v["max"], unit),
                      f"{100 * v['median'] / step:.1f}%" if share else "")

    row("step time", "step_time_s", "s")
    row("  CPU time", "cpu_s", "s")
    row("steps / s", "steps_per_s")
    row("thought tokens / s", "thought_tokens_per_s")
    for p in PHASES + ["other"]:
        if p == "other" or s[f"phase_{p}_s"]["max"] > 0:
            row(f"  {p.replace('_', ' ')}", f"phase_{p}_s", "s", share=True)
    row("model forward", "model_forward_s", "s", share=True)
    row("model backward", "model_backward_s", "s", share=True)
    row("optimizer step", "model_optimizer_s", "s", share=True)
    row("outside model calls", "outside_model_calls_s", "s", share=True)
    row("model FLOP/s", "flops_per_s", "FLOP/s")
    console.print(table)
    f, m = result["flops"], result["memory"]
    console.print(f"matmul limit {f['matmul_limit']['shape']} {f['matmul_limit']['dtype']}: "
                  f"{fmt(f['matmul_limit']['flops_per_s'], 'FLOP/s')}; the steps achieved "
                  f"{100 * f['fraction_of_limit']:.1f}% of it")
    mem = f"peak RSS {m['peak_rss_mb']:.0f} MB (after loading {m['rss_peak_after_load_mb']:.0f} MB)"
    if "cuda_max_allocated_mb" in m:
        mem += f"; CUDA max allocated {m['cuda_max_allocated_mb']:.0f} MB"
    console.print(mem)
    busy = result["machine"].get("during_timed_steps", {})
    if busy:
        console.print(f"while timing, the machine's cores were {100 * busy['busy_fraction']:.0f}% busy "
                      f"({100 * busy['steal_fraction']:.0f}% stolen by the hypervisor); this process used "
                      f"{threads} thread(s) of {result['machine']['cores']} cores")
    if s["cpu_utilization"]["median"] < 0.8:
        console.print(f"[yellow]note[/yellow]: the steps got {100 * s['cpu_utilization']['median']:.0f}% of "
                      f"{threads} core(s); other processes were competing, so wall times are inflated.")
    drift = result.get("precision_vs_float32")
    if drift:
        console.print(f"{drift['dtype']} policy vs float32 on the same {drift['thoughts']} thoughts: info gain differs by "
                      f"{drift['info_gain_difference_mean']:+.4f} on average (mean |difference| "
                      f"{drift['info_gain_difference_mean_abs']:.4f}, max {drift['info_gain_difference_max_abs']:.4f}); "
                      f"the reward's spread within a context's thoughts is {drift['reward_std_within_groups']:.4f}, and "
                      f"{100 * drift['advantage_rank_agreement']:.0f}% of thought pairs keep their order")
    if "trl" in result:
        t = result["trl"]
        console.print(f"TRL {t['trl_version']} GRPOTrainer, same setting: {fmt(t['step_time_s']['median'], 's')} "
                      f"a step, {t['thought_tokens_per_s']['median']:.1f} thought tokens/s, peak RSS "
                      f"{t['peak_rss_mb']:.0f} MB; rlp is {result['vs_trl']['thought_tokens_per_s_ratio']:.2f}x "
                      "its thought tokens/s")


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
                                    "(needs `pip install trl`)."),
        out: Path = typer.Option(Path("bench"), "--out", help="Folder for the JSON result."),
        eval_: bool = typer.Option(False, "--eval", help="Time `rlp eval`'s generation instead of training steps: "
                                   "problems/s and its split (prefill, decoding, scoring; intrinsic metrics apart)."),
        suite: str = typer.Option("quick", "--suite", help="With --eval: the suite (quick | full); --set takes "
                                  "its settings (n_per_task=4, batch_size=32) besides config keys."),
    ):
        """Time whole RLP steps (G=8, 32 thought tokens, 4 contexts of 128 tokens) and show where time goes."""
        from rich.console import Console

        from rlp_cli import runio

        console = Console()
        if eval_:
            from rlp_cli.bench_eval import bench_eval_command

            bench_eval_command(model, config, list(set_ or []), suite, naive or vs_trl, out, console)
            return
        from rlp_cli.bench_trl import check_trl, trl_in_child

        _check_counts(warmup, steps)
        if vs_trl:
            check_trl()  # before minutes of rlp steps, not after
        cfg = bench_config(model, list(set_ or []), naive, config)
        result = run_bench(cfg, warmup, steps, log=lambda msg: console.print(msg, highlight=False))
        path = result_path(out, result)
        runio.write_json(path, result)  # written before TRL runs: a failure there loses nothing
        if vs_trl:
            console.print("running TRL's GRPOTrainer at the same setting (child process) ...")
            result["trl"] = trl_in_child(cfg, warmup, steps)
            ours, theirs = result["summary"], result["trl"]
            result["vs_trl"] = {
                "thought_tokens_per_s_ratio": ours["thought_tokens_per_s"]["median"]
                / theirs["thought_tokens_per_s"]["median"],
                "steps_per_s_ratio": ours["steps_per_s"]["median"] / theirs["steps_per_s"]["median"],
            }
            runio.write_json(path, result)
        render(result, console)
        console.print(f"written {path}")
