"""An ablation's tables, from its records: per arm, task accuracy, group averages and Overall, the change
against the baseline with its noise mark, compute totals, and the paired sub-tables (paired.py)."""

from __future__ import annotations

import math
from collections import Counter
from typing import Any, Optional

from rlp_cli.report.cells import NOISE_P, Table, cell, noise_marker, relative_change
from rlp_cli.report.collect import axis_value
from rlp_cli.report.paired import build_paired_eval, build_probe_table, compare_problems, eval_items_of
from rlp_cli.report.paper import add_paper_rows
from rlp_cli.report.records import Ablation, Run
from rlp_cli.stats import mean_std, minimum_detectable_difference, stderr_binary, welch_test


def status_text(run: Run) -> str:
    s = run.status
    if s == "completed":
        if run.evaluated:
            return "done"
        return "eval failed" if run.eval_error else "not evaluated"
    if s == "running":
        return f"running (step {run.step or 0}/{run.total_steps or '?'})"
    return s


def ordered_arms(ab: Ablation, axes: list[str]) -> list[str]:
    """Base model(s) first, then the manifest's order, else sorted by axis values (numbers numerically)."""
    bases = list(dict.fromkeys(r.arm for r in ab.runs if r.is_base))
    runs = ab.trained
    if any(r.manifest_order is not None for r in runs):
        runs.sort(key=lambda r: r.manifest_order if r.manifest_order is not None else 1 << 30)
    else:
        def key(r):
            return tuple((0, v, "") if isinstance(v, (int, float)) and not isinstance(v, bool) else (1, 0, str(v))
                         for v in (axis_value(r, a) for a in axes))
        runs.sort(key=key)
    return bases + list(dict.fromkeys(r.arm for r in runs))


def headline_metric(ab: Ablation) -> str:
    for m in (ab.manifest.metrics if ab.manifest else []):
        if m in ("overall",) or any(r.has_metric(f"acc/{m}") for r in ab.runs):
            return m
    return "overall"


def pick_baseline(ab: Ablation, arms: list[str]) -> tuple[Optional[str], str]:
    """The arm every change is relative to, and a note when the requested one is not available."""
    wanted = ab.manifest.baseline if ab.manifest else None
    bases = [a for a in arms if all(r.is_base for r in ab.runs if r.arm == a)]
    run_arms = [a for a in arms if a not in bases]
    evaluated = {r.arm for r in ab.runs if r.evaluated}
    if wanted == "base" or (wanted is None and bases):
        if bases and bases[0] in evaluated:
            return bases[0], ""
        fallback = next((a for a in run_arms if a in evaluated), None)
        return fallback, "the base model is not evaluated yet" + (f"; changes are against {fallback}" if fallback else "")
    if wanted is not None and wanted in arms:
        if wanted in evaluated:
            return wanted, ""
        return None, f"the baseline arm {wanted} has no evaluated run yet"
    first = next((a for a in run_arms if a in evaluated), None)
    return first, ""


def headline_tasks(headline: str, tasks: list[str], groups_of: dict[str, str]) -> list[str]:
    """The tasks behind the headline metric: all of them (overall), a group's, or the one task."""
    if headline == "overall":
        return tasks
    in_group = [t for t in tasks if groups_of.get(t) == headline]
    return in_group or [t for t in tasks if t == headline]


class ArmValues:
    """An ablation's evaluated numbers, arm by arm."""

    def __init__(self, runs_by_arm: dict[str, list[Run]]):
        self.runs_by_arm = runs_by_arm

    def values(self, arm: str, col: str) -> list[float]:
        return [float(r.value(col)) for r in self.runs_by_arm[arm] if r.evaluated
                and isinstance(r.value(col), (int, float)) and not math.isnan(float(r.value(col)))]

    def task_problems(self, arm: str, task: str) -> Optional[int]:
        counts = [r.eval.task_n[task] for r in self.runs_by_arm[arm] if r.evaluated and task in r.eval.task_n]
        return counts[0] if counts else None

    def task_stderr(self, arm: str, task: str) -> float:
        """lm-eval style stderr of the task's accuracy (at the mean over seeds), over its problems."""
        accs = self.values(arm, f"acc/{task}")
        n = self.task_problems(arm, task)
        if n:
            return stderr_binary(sum(accs) / len(accs), n)
        reported = [r.eval.task_stderr[task] for r in self.runs_by_arm[arm]
                    if r.evaluated and task in r.eval.task_stderr]
        return reported[0] if len(accs) == 1 and reported else float("nan")

    def task_cell(self, arm: str, task: str) -> str:
        accs = self.values(arm, f"acc/{task}")
        if not accs:
            return "—"
        se = self.task_stderr(arm, task)
        return f"{100 * sum(accs) / len(accs):.1f}" + (f" ± {100 * se:.1f}" if math.isfinite(se) else "")


def _comparisons(arms: list[str], runs_by_arm: dict[str, list[Run]], baseline: Optional[str], tasks: list[str],
                 head_tasks: list[str]) -> tuple[dict[str, dict], dict[str, dict]]:
    """Problem-by-problem comparisons against the baseline (all tasks; the headline's tasks), where both sides
    left eval_samples.jsonl."""
    comparisons: dict[str, dict] = {}
    head_comparisons: dict[str, dict] = {}
    baseline_items = eval_items_of(runs_by_arm[baseline]) if baseline else None
    if not baseline_items:
        return comparisons, head_comparisons
    for arm in arms:
        arm_items = eval_items_of(runs_by_arm[arm]) if arm != baseline else None
        if not arm_items:
            continue
        comparison = compare_problems(arm_items, baseline_items, tasks)
        if comparison is None:
            continue
        comparisons[arm] = comparison
        head = comparison if head_tasks == tasks else compare_problems(arm_items, baseline_items, head_tasks)
        if head is not None and head["n_problems"] > 1:
            head_comparisons[arm] = head
    return comparisons, head_comparisons


def build_table(ab: Ablation, paper: bool, paper_frame=None) -> Table:
    axes = ab.axes
    arms = ordered_arms(ab, axes)
    runs_by_arm: dict[str, list[Run]] = {a: [r for r in ab.runs if r.arm == a] for a in arms}
    evaluated = [r for r in ab.runs if r.evaluated]
    groups_of: dict[str, str] = {}
    for r in evaluated:
        for t in r.eval.tasks:
            groups_of.setdefault(t, r.eval.groups.get(t) or "other")
    group_names = list(dict.fromkeys(groups_of.values()))
    tasks = [t for g in group_names for t in groups_of if groups_of[t] == g]
    headline = headline_metric(ab)
    baseline, baseline_note = pick_baseline(ab, arms)
    title = (ab.manifest.title if ab.manifest else None) or f"Ablation {ab.key}"
    nums = ArmValues(runs_by_arm)
    values = nums.values
    comparisons, head_comparisons = _comparisons(arms, runs_by_arm, baseline, tasks,
                                                 headline_tasks(headline, tasks, groups_of))

    head_col = f"acc/{headline}"
    base_values = values(baseline, head_col) if baseline else []
    base_mean = mean_std(base_values)[0]
    ref = baseline or "—"
    columns = ["Arm", "n"] + tasks + [g.capitalize() + " Avg" for g in group_names] + ["Overall"]
    columns += [f"Δ {headline} vs {ref} (pts)", f"Δ rel vs {ref} (%)", "pass@1 Overall", "ppl (held-out)",
                "info gain (nats)", "status"]
    rows, data, tests_used = [], [], set()
    for arm in arms:
        members = runs_by_arm[arm]
        n_eval = sum(1 for r in members if r.evaluated)
        cells = [arm, str(n_eval)]
        cells += [nums.task_cell(arm, t) for t in tasks]
        cells += [cell(values(arm, f"acc/{g}"), 100) for g in group_names]
        cells.append(cell(values(arm, "acc/overall"), 100))
        head = values(arm, head_col)
        record: dict[str, Any] = {"arm": arm, "n": n_eval, "baseline": arm == baseline,
                                  "axis_values": {a: axis_value(members[0], a) for a in axes} if members and
                                  members[0].kind == "run" else {}}
        for col in [f"acc/{x}" for x in tasks + group_names + ["overall"]] + ["pass@1/overall", "ppl", "info_gain"]:
            m, s, n = mean_std(values(arm, col))
            record[col] = {"mean": None if n == 0 else m, "std": None if n < 2 else s, "n": n}
        for t in tasks:
            se = nums.task_stderr(arm, t) if values(arm, f"acc/{t}") else float("nan")
            record[f"acc/{t}"].update(stderr=se if math.isfinite(se) else None, n_problems=nums.task_problems(arm, t))
        if not head or baseline is None:
            cells += ["—", "—"]
        elif arm == baseline:
            cells += ["ref", "ref"]
        else:
            m = mean_std(head)[0]
            if arm in head_comparisons:
                test = {**head_comparisons[arm]["test"], "test": "paired bootstrap over problems"}
            else:
                test = welch_test(head, base_values)
            if test:
                tests_used.add(test["test"])
            marker = noise_marker(test)
            delta, rel = 100 * (m - base_mean), relative_change(m, base_mean)
            cells += [f"{delta:+.1f}{marker}", "—" if math.isnan(rel) else f"{rel:+.1f}%{marker}"]
            record.update(delta_pts=delta, delta_rel_pct=None if math.isnan(rel) else rel,
                          p_value=None if test is None else test["p"], test=None if test is None else test["test"],
                          noise=marker)
        cells.append(cell(values(arm, "pass@1/overall"), 100))
        cells.append(cell(values(arm, "ppl"), 1, 2))
        cells.append(cell(values(arm, "info_gain"), 1, 3))
        statuses = Counter(status_text(r) for r in members)
        cells.append(", ".join(f"{n} {s}" if len(members) > 1 else s for s, n in statuses.items()))
        rows.append(cells)
        data.append(record)

    footer = _main_footer(ab, arms, nums, baseline, baseline_note, comparisons, headline, tests_used)
    compute_columns, compute_rows = compute_table(arms, runs_by_arm)
    table = Table(ablation=ab.key, title=title, columns=columns, rows=rows, data=data, footer=footer,
                  compute_columns=compute_columns, compute_rows=compute_rows,
                  runs=[{"folder": r.folder, "arm": r.arm, "seed": r.seed, "status": status_text(r),
                         "error": r.error or r.eval_error} for r in ab.runs])
    table.paired_eval = build_paired_eval(comparisons, baseline, tasks) if baseline else None
    table.probe = build_probe_table(ab, arms)
    if table.probe is not None and not any(r.kind == "run" for r in evaluated):
        table.headline = "probe"
    if paper and paper_frame is not None:
        add_paper_rows(table, ab, arms, paper_frame)
    return table


def _main_footer(ab: Ablation, arms: list[str], nums: ArmValues, baseline: Optional[str], baseline_note: str,
                 comparisons: dict[str, dict], headline: str, tests_used: set[str]) -> list[str]:
    ref = baseline or "—"
    evaluated = [r for r in ab.runs if r.evaluated]
    suites = sorted({str(r.eval.columns.get("eval_suite")) for r in evaluated if r.eval.columns.get("eval_suite")})
    seeds = sorted({r.seed for r in ab.trained if r.seed is not None})
    scoring = ("lm-evaluation-harness's own metric for each task (exact match, or the likeliest choice)"
               if suites and all(s.startswith("lm-eval") for s in suites) else
               "greedy thought, then a greedy answer scored by each reasoning-gym generator's own checker"
               + ("; lm-eval tasks: the harness's own metric" if any(s.startswith("lm-eval") for s in suites) else ""))
    footer = [
        "Accuracy in % on the `rlp eval` suite " + (", ".join(suites) or "(none yet)") + f": {scoring}. Group "
        "averages and Overall are macro averages over tasks (every task weighs the same, whatever its number of "
        "problems).",
        f"Δ {headline}: the arm's mean {headline} accuracy minus the baseline's ({ref}), in points; Δ rel: that "
        f"difference as a % of the baseline's {headline} (a plain ratio of the two macro averages).",
        f"n: evaluated runs (seeds {', '.join(map(str, seeds)) or '—'}). A task cell is accuracy ± its "
        "lm-evaluation-harness standard error over the task's n problems, sqrt(p(1 - p) / (n - 1)) at the mean "
        "accuracy p over seeds; with n > 1 runs a group or Overall cell is mean ± sample std (ddof=1) over seeds. "
        "Noise: where both sides left per-problem results (eval_samples.jsonl), a paired bootstrap over the same "
        "problems (seeds combined per problem; the table below); otherwise Welch's t-test over seeds (a one-sample "
        f"t-test when one side has a single run, e.g. the base model). `~` = p > {NOISE_P}, not distinguishable "
        "from noise; `?` = not testable (a single run on both sides and no per-problem results); no mark = "
        "p <= 0.05. `ref`: the baseline itself.",
        "ppl: no-think perplexity on the held-out split of the training corpus; info gain: mean log p(x_t | x_<t, "
        "thought) - log p(x_t | x_<t) over sampled thoughts on that split, the no-think baseline being the evaluated "
        "model itself (no EMA teacher exists after training).",
    ]
    mdd_note = minimum_detectable_note(ab, arms, nums.runs_by_arm, baseline, comparisons, nums.values)
    if mdd_note:
        footer.append(mdd_note)
    if len(suites) > 1:
        footer.append("WARNING: the runs were evaluated with different suites; their numbers are not comparable.")
    if tests_used:
        footer.append("Tests used in this table: " + ", ".join(sorted(tests_used)) + ".")
    if baseline_note:
        footer.append(f"Note: {baseline_note}.")
    if ab.axes:
        footer.append("Axes: " + ", ".join(ab.axes) + ("" if ab.manifest else " (inferred: the config keys that "
                                                         "differ between runs; no manifest.json)"))
    return footer


def compute_table(arms: list[str], runs_by_arm: dict[str, list[Run]]) -> tuple[list[str], list[list[str]]]:
    """Training and compute per arm (mean ± std over seeds): steps, tokens, FLOPs, time, final metrics."""
    columns = ["Arm", "steps", "input tokens", "generated tokens", "FLOPs", "wall time (s)",
               "final reward", "final info gain", "final loss"]
    rows = []
    for arm in arms:
        if all(r.is_base for r in runs_by_arm[arm]):
            continue
        runs = [r for r in runs_by_arm[arm] if r.kind == "run" and r.status != "missing"]

        def col(key, digits=0, sci=False):
            vals = [float(r.value(key)) for r in runs if isinstance(r.value(key), (int, float))]
            if not vals:
                return "—"
            m, s, n = mean_std(vals)
            f = (lambda v: f"{v:.2e}") if sci else (lambda v: f"{v:,.{digits}f}")
            return f(m) + (f" ± {f(s)}" if n > 1 and s > 0 else "")
        rows.append([arm, col("step"), col("input_tokens"), col("generated_tokens"), col("flops", sci=True),
                     col("wall_time_s", 1), col("train/reward", 4), col("train/rlp/info_gain", 4),
                     col("train/loss", 4)])
    return columns, rows


def minimum_detectable_note(ab: Ablation, arms: list[str], runs_by_arm: dict[str, list[Run]], baseline: Optional[str],
                            comparisons: dict[str, dict], values) -> str:
    """One line: the smallest Overall difference the suite can detect, from its size and the observed data."""
    evaluated = [r for r in ab.runs if r.evaluated and r.eval.task_n]
    if not evaluated:
        return ""
    problems = sum(evaluated[0].eval.task_n.values())
    reference = baseline if baseline and values(baseline, "acc/overall") else None
    accs = values(reference, "acc/overall") if reference else [v for a in arms for v in values(a, "acc/overall")]
    if not accs or problems < 2:
        return ""
    p = sum(accs) / len(accs)
    unpaired = 100 * minimum_detectable_difference(p, problems, paired=False)
    text = (f"Minimum detectable difference of Overall (80% power, two-sided 5%, normal approximation "
            f"(z_0.975 + z_0.8) · sd / sqrt(n)): the suite has n = {problems} problems; at "
            f"{'the baseline' + chr(39) + 's' if reference else 'the mean'} accuracy {100 * p:.1f}%, two arms scored "
            f"without pairing, sd = sqrt(2 p (1 - p)), must differ by {unpaired:.1f} pts")
    paired = [f"{arm} {100 * c['mdd_paired']:.1f}" for arm, c in comparisons.items() if math.isfinite(c["mdd_paired"])]
    if paired:
        text += ("; paired on the same problems, with the observed sd of the per-problem differences: "
                 + ", ".join(paired) + " pts")
    return text + ". A smaller true difference is more likely missed than found."
