"""`rlp bench --eval`: time `rlp eval`'s generation.

Problems/s of a suite on a model, split into prefill, thought decoding, the block after it
(`</think> Answer:`), answer decoding and scoring, with the intrinsic metrics (held-out perplexity
and information gain) timed apart. The same problems, prompts and random stream as `rlp eval`.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Optional

from rlp_cli.measure import cpu_counters, device_info, fmt, machine_info, machine_load, peak_rss_mb, result_path
from rlp_cli.errors import UserError

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
    from rlp_cli import suites as S
    from rlp_cli.models import configure_cpu, load_model, resolve_device
    from rlp_cli.train import PhaseTimer

    threads = configure_cpu(cfg.threads)
    device = resolve_device(cfg.device)
    loaded = load_model(cfg.model.name, cfg.model.dtype, device)
    model, tok = loaded.model.eval(), loaded.tokenizer
    rss_after_load = peak_rss_mb()
    prompt_ids = tok(cfg.objective.thought_prompt, add_special_tokens=False).input_ids if cfg.objective.thought_prompt else []
    ids = dict(prompt_ids=prompt_ids, open_id=loaded.think_open_id, close_id=loaded.think_close_id)
    problems, datasets = S.build_suite(suite, seed, settings)
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
    results, groups = S.aggregate(records, {p.task: p.group for p in problems})
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
    table.add_row("generation + scoring", fmt(seconds, "s"), "100.0%")
    for p in EVAL_PHASES + ["other"]:
        label = {"thought": "decode: thoughts", "block": "decode: </think> Answer:",
                 "answer": "decode: answers"}.get(p, p)
        table.add_row(f"  {label}", fmt(result["phases_s"][p], "s"), f"{100 * result['phases_s'][p] / seconds:.1f}%")
    if result["intrinsic_s"] is not None:
        table.add_row("intrinsic metrics (apart)", fmt(result["intrinsic_s"], "s"), "")
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


def bench_eval_command(model: Optional[str], config: str, overrides: list[str], suite: str, training_flags: bool, out: Path,
                console) -> None:
    """`rlp bench --eval`: the eval suite's settings and the run config from --set, no training reference setting."""
    from rlp_cli import runio
    from rlp_cli import suites as S
    from rlp_cli.config import load_config

    if training_flags:
        raise UserError("rlp bench --eval: --naive and --vs-trl time training steps. Fix: drop them, or drop --eval.")
    if suite not in S.SUITES:
        raise UserError(f"rlp bench --eval --suite {suite}: unknown suite. Fix: use one of {', '.join(S.SUITES)}.")
    settings, config_overrides = S.parse_settings(suite, overrides)
    cfg = load_config(config, ([f"model.name={model}"] if model else []) + config_overrides)
    result = run_eval_bench(cfg, suite, settings, log=lambda msg: console.print(msg, highlight=False))
    path = result_path(out, result)
    runio.write_json(path, result)
    render_eval(result, console)
    console.print(f"written {path}")
