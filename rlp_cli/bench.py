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

`--eval` times `rlp eval`'s generation instead (run_eval_bench): problems/s of a suite on a model,
split into prefill, thought decoding, the block after it, answer decoding and scoring, with the intrinsic metrics
(held-out perplexity and information gain) timed apart.

`--vs-trl` runs the same setting through Hugging Face TRL's GRPOTrainer (an optional extra, never
a dependency of rlp): the same prompts (x_<t + <think>), an information-gain reward that re-encodes
prompt + thought with the policy and x_<t with an EMA teacher, and a callback that updates the
teacher after each step. It runs in a child process so that its peak memory is its own.
"""

from __future__ import annotations

import contextlib
import copy
import math
import os
import platform
import resource
import statistics
import tempfile
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
PHASES = ["rollout", "s_pred_scoring", "s_empty_scoring", "ema_scoring", "update", "ema_update"]
TRL_MISSING = ("rlp bench --vs-trl: the comparison runs Hugging Face TRL's GRPOTrainer, and the package `trl` is not "
               "installed (it is not part of rlp's install). Fix: `pip install trl` (into a separate environment if "
               "you want to keep this one as it is), or drop --vs-trl.")


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
    from rlp_cli.rollout import naive_s_pred

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
# `rlp bench --eval`: the generation of `rlp eval`

EVAL_PHASES = ["prefill", "thought", "block", "answer", "scoring"]  # evaluate.generate / run_suite's phases


def run_eval_bench(cfg, suite: str, settings, seed: int = 0, log=print) -> dict:
    """Time `rlp eval MODEL --suite SUITE`'s generation and scoring, by phase; the intrinsic metrics apart.

    The same problems, prompts, settings and random stream as `rlp eval` with that seed (nothing is
    written but the result); an untimed generation of one problem warms the model up first.
    """
    import dataclasses

    import torch

    from rlp_cli import evaluate as E
    from rlp_cli import runio
    from rlp_cli.models import configure_cpu, load_model, resolve_device
    from rlp_cli.train import PhaseTimer

    threads = configure_cpu(cfg.threads)
    device = resolve_device(cfg.device)
    loaded = load_model(cfg.model.name, cfg.model.dtype, device)
    model, tok = loaded.model.eval(), loaded.tokenizer
    rss_after_load = peak_rss_mb()
    prompt_ids = tok(cfg.objective.thought_prompt, add_special_tokens=False).input_ids if cfg.objective.thought_prompt else []
    ids = dict(prompt_ids=prompt_ids, open_id=loaded.think_open_id, close_id=loaded.think_close_id)
    problems, datasets = E.build_suite(suite, seed, settings)
    warm = dataclasses.replace(settings, thought_tokens=2, answer_tokens=2)
    E.run_suite(model, tok, problems[:1], datasets, warm, generator=torch.Generator(device=device).manual_seed(seed), **ids)
    log(f"rlp bench --eval: {cfg.model.name} on {device} ({threads} threads), suite {suite}: {len(problems)} problems "
        f"x (1 greedy + {settings.samples} sampled) rows, {settings.thought_tokens}-token thoughts, batches of "
        f"{settings.batch_size} problems")

    generator = torch.Generator(device=device).manual_seed(seed)
    torch.manual_seed(seed)
    clock = PhaseTimer(device)
    load_before = [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None
    counters_before, cpu_start, start = cpu_counters(), time.process_time(), time.perf_counter()
    records = E.run_suite(model, tok, problems, datasets, settings, generator=generator, clock=clock, **ids)
    seconds, cpu_s = time.perf_counter() - start, time.process_time() - cpu_start
    counters_after = cpu_counters()
    phases = {p: clock.seconds.get(p, 0.0) for p in EVAL_PHASES}
    phases["other"] = seconds - sum(phases.values())
    results, groups = E.aggregate(records, {p.task: p.group for p in problems})
    intrinsic, intrinsic_s = {}, None
    if settings.heldout_windows > 0:
        begin = time.perf_counter()
        intrinsic = E.intrinsic_metrics(model, tok, cfg, settings, generator=generator, seed=seed, **ids)
        intrinsic_s = time.perf_counter() - begin
    machine = machine_info(threads)
    machine.update(load_average_before=load_before, during_generation=machine_load(counters_before, counters_after))
    if hasattr(os, "getloadavg"):
        machine["load_average_after"] = [round(x, 2) for x in os.getloadavg()]
    generated = clock.counts.get("generated_tokens", 0)
    return {
        "kind": "rlp bench --eval", "path": "eval", "model": cfg.model.name, "suite": suite, "seed": seed,
        "settings": dataclasses.asdict(settings), "problems": len(problems), "rows": len(records),
        "generation_s": seconds, "problems_per_s": len(problems) / seconds, "cpu_s": cpu_s,
        "cpu_utilization": cpu_s / (seconds * threads),
        "phases_s": phases, "decode_s": phases["thought"] + phases["block"] + phases["answer"],
        "tokens": {"generated": generated, "generated_per_s": generated / seconds,
                   "forward_slots": clock.counts.get("forward_tokens", 0)},
        "accuracy": {"acc": groups["overall"]["acc"], "pass@1": groups["overall"]["pass@1"]},
        "intrinsic_s": intrinsic_s,
        "intrinsic": {k: intrinsic.get(k) for k in ("heldout_perplexity", "heldout_info_gain")} if intrinsic else {},
        "memory": {"peak_rss_mb": peak_rss_mb(), "rss_peak_after_load_mb": rss_after_load},
        "machine": machine, "device": device_info(device),
        "provenance": runio.provenance(n_params=sum(p.numel() for p in model.parameters()), model_source=loaded.source),
        "config": cfg.to_dict(),
    }


def render_eval(result: dict, console) -> None:
    from rich.table import Table

    seconds, threads = result["generation_s"], result["machine"]["torch_threads"]
    table = Table(title=f"{result['model']}, rlp eval --suite {result['suite']}, {result['device']['name']}, "
                        f"{threads} threads: {result['problems']} problems", title_justify="left")
    for col in ("", "seconds", "of generation"):
        table.add_column(col, justify="right" if col else "left", no_wrap=True)
    table.add_row("generation + scoring", _fmt(seconds, "s"), "100.0%")
    for p in EVAL_PHASES + ["other"]:
        label = {"thought": "decode: thoughts", "block": "decode: </think> Answer:",
                 "answer": "decode: answers"}.get(p, p)
        table.add_row(f"  {label}", _fmt(result["phases_s"][p], "s"), f"{100 * result['phases_s'][p] / seconds:.1f}%")
    if result["intrinsic_s"] is not None:
        table.add_row("intrinsic metrics (apart)", _fmt(result["intrinsic_s"], "s"), "")
    console.print(table)
    tokens = result["tokens"]
    console.print(f"{result['problems_per_s']:.2f} problems/s; {tokens['generated']} tokens generated "
                  f"({tokens['generated_per_s']:.1f}/s), {tokens['forward_slots']} token slots forwarded; "
                  f"acc {100 * result['accuracy']['acc']:.1f}%, pass@1 {100 * result['accuracy']['pass@1']:.1f}%")
    busy = result["machine"].get("during_generation", {})
    if busy:
        console.print(f"while generating, the machine's cores were {100 * busy['busy_fraction']:.0f}% busy; load "
                      f"average before {result['machine']['load_average_before']}")
    if result["cpu_utilization"] < 0.8:
        console.print(f"[yellow]note[/yellow]: generation got {100 * result['cpu_utilization']:.0f}% of {threads} "
                      "core(s); other processes were competing, so wall times are inflated.")


# --------------------------------------------------------------------------------------------
# The same setting through TRL's GRPOTrainer (optional)


def check_trl() -> None:
    """TRL is an optional extra, never in rlp's install: say how to get it when it is missing."""
    import importlib.util

    if importlib.util.find_spec("trl") is None or importlib.util.find_spec("datasets") is None:
        raise UserError(TRL_MISSING)


def run_trl(config: dict, warmup: int, steps: int) -> dict:
    """Time GRPOTrainer steps doing RLP at the same setting (runs in a child process; see trl_in_child)."""
    import torch
    from datasets import Dataset
    from transformers import PrinterCallback, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from rlp_cli.config import TrainConfig
    from rlp_cli.models import forward
    from rlp_cli.rollout import _positions, _right_pad, _token_logp
    from rlp_cli.train import Trainer

    cfg = TrainConfig.model_validate(config)
    rlp = Trainer(cfg)  # only for its model, tokenizer, thread setting and the same windows and positions
    obj, g = cfg.objective, cfg.objective.num_rollouts
    prompts, per_step = [], None
    for _ in range(warmup + steps):
        windows = rlp.stream.next_batch(cfg.optim.batch_documents)
        contexts = rlp.contexts_for(windows, None)
        if per_step is not None and len(contexts) != per_step:
            raise UserError("rlp bench --vs-trl: GRPOTrainer needs the same number of prompts at every step, and "
                            f"data.positions={cfg.data.positions} gives {per_step}, then {len(contexts)}. "
                            "Fix: compare with data.positions=random_one (the reference setting).")
        per_step = len(contexts)
        prompts += [{"prompt": rlp.tok.decode(c.prompt), "rlp_prompt": c.prompt,
                     "rlp_prefix": windows[c.doc_index][:c.position], "rlp_target": c.targets[0]} for c in contexts]
    teacher = copy.deepcopy(rlp.model).eval().requires_grad_(False)
    grpo_holder = {}

    @torch.no_grad()
    def last_token_logp(model, rows, targets):
        ids, mask = _right_pad(rows, rlp.pad_id, rlp.device)
        logits, _ = forward(model, ids, mask, _positions(mask))
        last = logits[torch.arange(len(rows)), mask.sum(1) - 1]
        return _token_logp(last, torch.tensor(targets, device=rlp.device))

    def info_gain(prompts, completions, completion_ids, rlp_prompt, rlp_prefix, rlp_target, **kwargs):
        # S_pred re-encodes prompt + thought + </think> with the policy; S_ema scores x_<t once per prompt.
        policy = grpo_holder["trainer"].model
        rows = [p + list(c) + ([] if c and c[-1] == rlp.close_id else [rlp.close_id])
                for p, c in zip(rlp_prompt, completion_ids)]
        s_pred = last_token_logp(policy, rows, rlp_target)
        unique = list(dict.fromkeys((tuple(p), t) for p, t in zip(rlp_prefix, rlp_target)))
        s_ema = dict(zip(unique, last_token_logp(teacher, [list(p) for p, _ in unique], [t for _, t in unique])))
        return (s_pred - torch.stack([s_ema[(tuple(p), t)] for p, t in zip(rlp_prefix, rlp_target)])).tolist()

    class EmaAndClock(TrainerCallback):
        def __init__(self):
            self.ends = []

        def on_step_end(self, args, state, control, **kwargs):
            with torch.no_grad():
                for t, s in zip(teacher.parameters(), grpo_holder["trainer"].model.parameters()):
                    t.lerp_(s.detach(), 1.0 - obj.ema_tau)
            if rlp.device.type == "cuda":
                torch.cuda.synchronize()
            self.ends.append(time.perf_counter())
            last = self.ends[-1] - (self.ends[-2] if len(self.ends) > 1 else start)
            kind = "warm-up" if len(self.ends) <= warmup else "step"
            print(f"  TRL {kind} {len(self.ends)}/{warmup + steps}: {last:.3f} s", flush=True)

    clock = EmaAndClock()
    with tempfile.TemporaryDirectory(prefix="rlp-bench-trl-") as out_dir:
        args = GRPOConfig(output_dir=out_dir, per_device_train_batch_size=per_step * g, num_generations=g,
                          max_completion_length=obj.thought_tokens, temperature=obj.temperature,
                          learning_rate=cfg.optim.lr, beta=0.0, epsilon=obj.clip_eps_low,
                          epsilon_high=obj.clip_eps_high, scale_rewards="none", loss_type="grpo",
                          num_iterations=1, steps_per_generation=1, max_steps=warmup + steps,
                          shuffle_dataset=False, disable_dropout=True, report_to="none", save_strategy="no",
                          logging_steps=1, disable_tqdm=True, use_cpu=rlp.device.type == "cpu",
                          generation_kwargs={"eos_token_id": [rlp.close_id]},
                          # like for like with rlp: float32 compute, activations kept (TRL's defaults are
                          # bf16 autocast and gradient checkpointing)
                          bf16=False, fp16=False, gradient_checkpointing=False)
        trainer = GRPOTrainer(model=copy.deepcopy(rlp.model), reward_funcs=info_gain, args=args,
                              train_dataset=Dataset.from_list(prompts), processing_class=rlp.tok, callbacks=[clock])
        trainer.remove_callback(PrinterCallback)  # its per-step log lines would bury rlp's table
        grpo_holder["trainer"] = trainer
        start = time.perf_counter()
        trainer.train()
    step_times = [b - a for a, b in zip([start] + clock.ends, clock.ends)][warmup:]
    logged = [r for r in trainer.state.log_history if "completions/mean_length" in r][warmup:]
    tokens = [r["completions/mean_length"] * per_step * g for r in logged]
    return {"trl_version": __import__("trl").__version__,
            "settings": {k: getattr(args, k) for k in ("per_device_train_batch_size", "num_generations",
                                                       "max_completion_length", "bf16", "gradient_checkpointing",
                                                       "loss_type", "scale_rewards", "beta")},
            "step_time_s": summarize(step_times),
            "thought_tokens_per_s": summarize([n / t for n, t in zip(tokens, step_times)]),
            "steps_per_s": summarize([1.0 / t for t in step_times]), "peak_rss_mb": peak_rss_mb(),
            "prompts_per_step": per_step}


def _trl_child(config: dict, warmup: int, steps: int, queue) -> None:
    try:
        queue.put(("ok", run_trl(config, warmup, steps)))
    except UserError as e:
        queue.put(("user", str(e)))
    except Exception as e:  # reported by the parent with its type; the rlp result is kept either way
        queue.put(("error", f"{type(e).__name__}: {e}"))


def _give_memory_back() -> None:
    """Return freed heap to the OS (glibc keeps it), so the TRL child does not compete with rlp's leftovers."""
    import ctypes
    import gc

    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def trl_in_child(cfg, warmup: int, steps: int) -> dict:
    """run_trl in a fresh process, so its peak RSS is not mixed with rlp's."""
    import multiprocessing

    _give_memory_back()
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    child = ctx.Process(target=_trl_child, args=(cfg.to_dict(), warmup, steps, queue))
    child.start()
    import queue as queues

    while True:
        try:
            status, payload = queue.get(timeout=5)
            break
        except queues.Empty:
            if not child.is_alive():  # killed before it could report
                status, payload = "error", f"the child process died with exit code {child.exitcode}"
                if child.exitcode == -9:
                    payload += (" (SIGKILL: usually the kernel's out-of-memory killer; TRL's GRPOTrainer needed "
                                "over 13 GB for SmolLM2 at the reference setting)")
                break
    child.join()
    if status == "user":
        raise UserError(payload)
    if status == "error":
        raise UserError(f"rlp bench --vs-trl: TRL's GRPOTrainer failed: {payload}. The rlp numbers above were "
                        "written. Fix: free memory (or use a smaller model), and check that the installed trl works "
                        "with this transformers version.")
    return payload


# --------------------------------------------------------------------------------------------
# Reporting


def _fmt(x: float, unit: str = "") -> str:
    if not math.isfinite(x):
        return str(x)
    if unit == "FLOP/s":
        for scale, prefix in ((1e12, "T"), (1e9, "G"), (1e6, "M")):
            if abs(x) >= scale:
                return f"{x / scale:.2f} {prefix}{unit}"
    text = f"{x:.3f}" if abs(x) < 100 else f"{x:.1f}"
    return f"{text} {unit}".strip()


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
        table.add_row(label, _fmt(v["median"], unit), _fmt(v["min"], unit), _fmt(v["max"], unit),
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
                  f"{_fmt(f['matmul_limit']['flops_per_s'], 'FLOP/s')}; the steps achieved "
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
        console.print(f"TRL {t['trl_version']} GRPOTrainer, same setting: {_fmt(t['step_time_s']['median'], 's')} "
                      f"a step, {t['thought_tokens_per_s']['median']:.1f} thought tokens/s, peak RSS "
                      f"{t['peak_rss_mb']:.0f} MB; rlp is {result['vs_trl']['thought_tokens_per_s_ratio']:.2f}x "
                      "its thought tokens/s")


def result_path(out: Path, result: dict) -> Path:
    model = Path(result["model"]).name.replace(".", "_") or "model"
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return out / f"{model}-{result['path']}-{result['device']['type']}-{stamp}.json"


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
            _bench_eval(model, config, list(set_ or []), suite, naive or vs_trl, out, console)
            return
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


def _bench_eval(model: Optional[str], config: str, overrides: list[str], suite: str, training_flags: bool, out: Path,
                console) -> None:
    """`rlp bench --eval`: the eval suite's settings and the run config from --set, no training reference setting."""
    from rlp_cli import evaluate as E
    from rlp_cli import runio
    from rlp_cli.config import load_config

    if training_flags:
        raise UserError("rlp bench --eval: --naive and --vs-trl time training steps. Fix: drop them, or drop --eval.")
    if suite not in E.SUITES:
        raise UserError(f"rlp bench --eval --suite {suite}: unknown suite. Fix: use one of {', '.join(E.SUITES)}.")
    settings, config_overrides = E.parse_settings(suite, overrides)
    cfg = load_config(config, ([f"model.name={model}"] if model else []) + config_overrides)
    result = run_eval_bench(cfg, suite, settings, log=lambda msg: console.print(msg, highlight=False))
    path = result_path(out, result)
    runio.write_json(path, result)
    render_eval(result, console)
    console.print(f"written {path}")
