"""Comparisons paired item by item: eval problems (eval_samples.jsonl) and the training probe (probe.jsonl).

Pairing removes the item-to-item spread, so one seed per arm suffices; the statistics are in rlp_cli/stats.py.
"""

from __future__ import annotations

import math
from typing import Any, Optional

from rlp_cli.report.cells import SubTable, noise_marker, num1, p_text, signed
from rlp_cli.report.records import Ablation, Run
from rlp_cli.stats import (combine_seeds, mcnemar, mean_std, minimum_detectable_difference, paired_bootstrap,
                           paired_differences, paired_t)

BOOTSTRAP_SAMPLES = 10000
PROBE_TABLE_METRICS = ("info_gain", "content_gain", "s_pred")  # the probe table's columns


# --------------------------------------------------------------------------------------------
# Evals, problem by problem


def eval_items_of(runs: list[Run]) -> Optional[dict[str, dict[tuple, float]]]:
    """{run folder: {problem: greedy correct}} for an arm's evaluated runs; None unless every evaluated run
    left per-problem samples (a pairing over part of the seeds would hide the others' noise)."""
    evaluated = [r for r in runs if r.evaluated]
    if not evaluated or not all(r.eval.items for r in evaluated):
        return None
    return {r.folder: r.eval.items for r in evaluated}


def compare_problems(arm_runs: dict[str, dict[tuple, float]], baseline_runs: dict[str, dict[tuple, float]],
                     tasks: list[str]) -> Optional[dict]:
    """An arm against the baseline, problem by problem, over the given tasks.

    Each side's problems are first averaged over its runs (seeds; combine_seeds), then the problems both
    sides have are paired. delta = the mean per-problem difference within each task, macro-averaged over
    tasks (as Overall is); tested with a paired bootstrap resampling problems within each task. Per task:
    the exact McNemar test when each side is a single run (0/1 outcomes), else a paired bootstrap."""
    arm, baseline = combine_seeds(arm_runs), combine_seeds(baseline_runs)
    items, diffs = paired_differences(arm, baseline)
    wanted = set(tasks)
    pairs = [(item, d) for item, d in zip(items, diffs) if item[0] in wanted]
    if not pairs:
        return None
    items, diffs = [p[0] for p in pairs], [p[1] for p in pairs]
    task_of = [item[0] for item in items]
    single_runs = len(arm_runs) == 1 and len(baseline_runs) == 1
    per_task = {}
    for task in tasks:
        members = [item for item in items if item[0] == task]
        if not members:
            continue
        arm_values, base_values = [arm[i] for i in members], [baseline[i] for i in members]
        acc, base_acc = sum(arm_values) / len(members), sum(base_values) / len(members)
        test = mcnemar(base_values, arm_values) if single_runs else \
            paired_bootstrap([a - b for a, b in zip(arm_values, base_values)], BOOTSTRAP_SAMPLES)
        per_task[task] = {"n": len(members), "acc": acc, "baseline_acc": base_acc, "delta": acc - base_acc,
                          "test": test}
    sd = mean_std(diffs)[1]
    baseline_acc = sum(baseline[i] for i in items) / len(items)
    pooled_mcnemar = mcnemar([baseline[i] for i in items], [arm[i] for i in items]) if single_runs else None
    test = paired_bootstrap(diffs, BOOTSTRAP_SAMPLES, strata=task_of)
    if pooled_mcnemar is not None and pooled_mcnemar["p"] > test["p"]:
        # With few discordant problems the bootstrap is bolder than the exact test: mark by the cautious one.
        test = {**test, "p": pooled_mcnemar["p"], "test": "paired bootstrap; p of the exact McNemar test (larger)"}
    return {"n_problems": len(items), "n_runs": len(arm_runs), "n_baseline_runs": len(baseline_runs),
            "test": test, "per_task": per_task,
            "mcnemar_all_problems": pooled_mcnemar,
            "sd_of_diffs": sd, "baseline_acc": baseline_acc,
            "mdd_paired": minimum_detectable_difference(sd, len(items)) if len(items) > 1 else float("nan"),
            "mdd_unpaired": minimum_detectable_difference(baseline_acc, len(items), paired=False)}


def build_paired_eval(comparisons: dict[str, dict], baseline: str, tasks: list[str]) -> Optional[SubTable]:
    if not comparisons:
        return None
    columns = ["Arm", "problems", "Δ Overall (pts)", "95% CI (pts)", "p", "MDD (pts)"] + tasks
    rows, data = [], []
    for arm, c in comparisons.items():
        test = c["test"]
        interval = "—" if not math.isfinite(test["ci_low"]) else \
            f"[{100 * test['ci_low']:+.1f}, {100 * test['ci_high']:+.1f}]"
        cells = [arm, str(c["n_problems"]), signed(test["mean"], 100) + noise_marker(test), interval,
                 p_text(test["p"]), num1(100 * c["mdd_paired"])]
        for task in tasks:
            t = c["per_task"].get(task)
            if t is None:
                cells.append("—")
                continue
            counts = f" ({t['test']['b01']}/{t['test']['b10']})" if t["test"]["test"] == "exact McNemar" else ""
            cells.append(f"{100 * t['delta']:+.1f}{counts}{noise_marker(t['test'])}")
        rows.append(cells)
        data.append({"arm": arm, **c})
    footer = [
        f"Each arm against {baseline} on the same problems (greedy thought, greedy answer: correct or not). Seeds are "
        "combined first: each problem's correctness is averaged over an arm's evaluated runs (problems present in "
        "every run), then problems are paired across the two arms.",
        "Δ Overall: the mean per-problem difference within each task, macro-averaged over tasks (as Overall is), in "
        f"points. 95% CI and p: paired bootstrap ({BOOTSTRAP_SAMPLES:,} resamples of the problems within each task; "
        "percentile interval; p = twice the smaller share of resampled means on either side of 0). `~` = p > 0.05; "
        "`?` = not testable; no mark = p <= 0.05.",
        "Task cells: Δ in points; (a/b) = problems only the arm solved / only the baseline solved, tested with the "
        "exact McNemar test (shown when each side is a single run; otherwise a paired bootstrap over the task's "
        "problems). Tasks are tested one by one, with no correction for multiple comparisons.",
        "MDD: the smallest true Overall difference this pairing detects with 80% power at two-sided 5%, "
        "(z_0.975 + z_0.8) · sd / sqrt(n) with sd the observed standard deviation of the per-problem differences and "
        "n the problems (pooled over tasks: equal to the macro average when every task has as many problems).",
    ]
    return SubTable(f"Problem by problem against {baseline}", columns, rows, data, footer)


# --------------------------------------------------------------------------------------------
# The probe, item by item


def probe_final(run: Run) -> tuple[int, dict[str, dict[str, float]]]:
    step = max(run.probe)
    return step, run.probe[step]


def probe_change(run: Run, metric: str) -> Optional[dict[str, float]]:
    """{item: final value - step-0 value} of one run; None without a step 0 or a later probe."""
    step, final = probe_final(run)
    if 0 not in run.probe or step == 0:
        return None
    items, diffs = paired_differences(final.get(metric, {}), run.probe[0].get(metric, {}))
    return dict(zip(items, diffs))


def _item_mean(values: dict[str, float]) -> float:
    return sum(values.values()) / len(values) if values else float("nan")


def _seed_spread(per_run_means: list[float]) -> Optional[float]:
    """The sample std over seeds of a per-run quantity; None with fewer than 2 runs."""
    finite = [v for v in per_run_means if math.isfinite(v)]
    return mean_std(finite)[1] if len(finite) > 1 else None


def paired_summary(per_item: dict[str, float], per_run_means: list[float]) -> dict:
    """Mean over items of per-item differences, their paired tests, and the spread over seeds."""
    values = list(per_item.values())
    return {"mean": _item_mean(per_item), "n_items": len(values),
            "bootstrap": paired_bootstrap(values, BOOTSTRAP_SAMPLES), "paired_t": paired_t(values),
            "per_seed": per_run_means, "seed_std": _seed_spread(per_run_means)}


def _delta_cell(summary: Optional[dict]) -> str:
    if summary is None or summary["n_items"] == 0:
        return "—"
    spread = summary["seed_std"]
    return (f"{summary['mean']:+.3f}" + (f" ± {spread:.3f}" if spread is not None else "")
            + noise_marker(summary["bootstrap"]))


def pick_probe_baseline(ab: Ablation, arms: list[str], probe_arms: list[str]) -> tuple[Optional[str], str]:
    """The arm the probe compares against, and a note. The base model needs no arm: every run's step 0 is it."""
    wanted = ab.manifest.baseline if ab.manifest else None
    has_base = any(r.is_base for r in ab.runs)
    if wanted == "base" or (wanted is None and has_base):
        return None, ("the baseline is the base model, whose probe is each run's step 0 (before training): "
                      "Δ since step 0 is the change against it")
    if wanted is not None:
        if wanted in probe_arms:
            return wanted, ""
        return None, f"the baseline arm {wanted} has no probe yet"
    return (probe_arms[0], "") if probe_arms else (None, "")


def _versus_baseline(runs: list[Run], base_runs: list[Run], finals: dict, combined: dict, arm: str, baseline: str,
                     metric: str) -> tuple[Optional[dict], bool]:
    """The arm's final values against the baseline's, item by item; and whether they share no item."""
    items, diffs = paired_differences(combined[arm][metric], combined[baseline][metric])
    base_by_seed = {r.seed: finals[baseline][metric][r.folder] for r in base_runs}
    single_base = next(iter(base_by_seed.values())) if len(base_by_seed) == 1 else None
    per_seed = []  # each run against the baseline's run of the same seed (or its only run)
    for r in runs:
        other = base_by_seed.get(r.seed, single_base)
        if other is not None:
            _, seed_diffs = paired_differences(finals[arm][metric][r.folder], other)
            per_seed.append(sum(seed_diffs) / len(seed_diffs) if seed_diffs else float("nan"))
    unpaired = bool(combined[arm][metric] and combined[baseline][metric] and not items)
    return (paired_summary(dict(zip(items, diffs)), per_seed) if items else None), unpaired


def build_probe_table(ab: Ablation, arms: list[str]) -> Optional[SubTable]:
    """Per arm: final probe values, their change since step 0 and their difference from the baseline arm,
    each paired over the probe's items (items averaged over the arm's seeds first)."""
    runs_of = {a: [r for r in ab.trained if r.arm == a and r.probe] for a in arms}
    probe_arms = [a for a in arms if runs_of[a]]
    if not probe_arms:
        return None
    baseline, note = pick_probe_baseline(ab, arms, probe_arms)
    finals = {a: {m: {r.folder: probe_final(r)[1].get(m, {}) for r in runs_of[a]} for m in PROBE_TABLE_METRICS}
              for a in probe_arms}
    combined = {a: {m: combine_seeds(finals[a][m]) for m in PROBE_TABLE_METRICS} for a in probe_arms}
    labels = {"info_gain": "info gain", "content_gain": "content gain", "s_pred": "s_pred"}
    columns = ["Arm", "runs", "step"]
    for m in PROBE_TABLE_METRICS:
        columns += [labels[m], f"Δ {labels[m]} since step 0"] + ([f"Δ {labels[m]} vs {baseline}"] if baseline else [])
    rows, data, unpaired, sensitivity = [], [], [], []
    for arm in probe_arms:
        runs = runs_of[arm]
        steps = sorted({probe_final(r)[0] for r in runs})
        cells = [arm, str(len(runs)), ", ".join(map(str, steps))]
        record: dict[str, Any] = {"arm": arm, "runs": [r.folder for r in runs], "seeds": [r.seed for r in runs],
                                  "final_steps": {r.folder: probe_final(r)[0] for r in runs},
                                  "baseline": arm == baseline}
        for m in PROBE_TABLE_METRICS:
            per_run_final = [_item_mean(v) for v in finals[arm][m].values()]
            spread = _seed_spread(per_run_final)
            level = _item_mean(combined[arm][m])
            if not math.isfinite(level):
                cells.append("—")
            else:
                cells.append(f"{level:.3f}" + (f" ± {spread:.3f}" if spread is not None else ""))
            changes = {r.folder: probe_change(r, m) for r in runs}
            changes = {k: v for k, v in changes.items() if v is not None}
            change = None
            if changes:
                change = paired_summary(combine_seeds(changes), [_item_mean(v) for v in changes.values()])
            cells.append(_delta_cell(change))
            if change is not None and m == "info_gain" and change["n_items"] > 1:
                sd = mean_std(list(combine_seeds(changes).values()))[1]
                sensitivity.append(f"{arm}: p = {p_text(change['bootstrap']['p'])} over {change['n_items']} items, "
                                   f"minimum detectable change {minimum_detectable_difference(sd, change['n_items']):.3f}")
            versus = None
            if baseline and arm == baseline:
                cells.append("ref")
            elif baseline:
                versus, no_shared = _versus_baseline(runs, runs_of[baseline], finals, combined, arm, baseline, m)
                if no_shared:
                    unpaired.append(arm)
                cells.append(_delta_cell(versus))
            record[m] = {"final": None if not math.isfinite(level) else level, "final_seed_std": spread,
                         "n_items": len(combined[arm][m]), "since_step0": change, "vs_baseline": versus}
        rows.append(cells)
        data.append(record)
    footer = [
        "Probe: the same held-out positions scored with the same sampling seeds every few training steps (step 0 = "
        "before training), in nats. A value is the mean over the probe's items of each item's value (the mean over "
        "its G thoughts), each item first averaged over the arm's runs (seeds; items present in every run). step: "
        "the last probe step of each run. With several runs, ± after a value is the sample std over seeds of the "
        "per-run means.",
        "Δ since step 0: each item's final value minus its step-0 value (did the arm learn?)"
        + (f"; Δ vs {baseline}: the arm's final value minus the baseline's, item by item" if baseline else "")
        + f". Tested with a paired bootstrap over items ({BOOTSTRAP_SAMPLES:,} resamples, p = twice the smaller share "
        "of resampled means on either side of 0; a paired t-test is in report.json): `~` = p > 0.05, not "
        "distinguishable from the item-to-item noise; `?` = not testable (fewer than 2 paired items); no mark = "
        "p <= 0.05. With several seeds, ± after a Δ is the sample std over seeds of "
        "the per-seed Δ: seed-to-seed spread, which the test over items does not include.",
    ]
    if sensitivity:
        footer.append("Δ info gain since step 0, " + "; ".join(sensitivity) + " nats (80% power, two-sided 5%, from "
                      "the observed spread of the per-item changes).")
    if note:
        footer.append(f"Note: {note}.")
    final_steps = sorted({step for record in data for step in record["final_steps"].values()})
    if len(final_steps) > 1:
        footer.append(f"Note: the runs' last probes are at different steps ({', '.join(map(str, final_steps))}): "
                      "runs still training are compared at less training.")
    if unpaired:
        footer.append(f"Note: {', '.join(unpaired)} share no probe item with {baseline} (another corpus or probe "
                      "setting?): not compared.")
    return SubTable("Probe: information gain on fixed held-out positions during training", columns, rows, data, footer)
