"""`rlp report`: every run under a results folder, gathered into paper-style tables and plots.

What it reads (written by `rlp train`, `rlp eval` and `rlp ablate`):

    RESULTS_DIR/<ablation>/manifest.json          optional: arms, seeds, axes, baseline, report layout
    RESULTS_DIR/<ablation>/<run>/config.yaml      a run folder = config.yaml + status.json,
                                 status.json      plus metrics.jsonl (training curves), probe.jsonl
                                 probe.jsonl      (fixed held-out items scored every few steps), eval.json
                                 eval.json        and eval_samples.jsonl (one record per problem and sample)
    RESULTS_DIR/<ablation>/base/eval.json         the untrained model, evaluated once per ablation

Ablations may nest; the runs of one folder form one table. Without a manifest the axes are the config
keys that differ between the runs, and an arm is the set of runs that differ only by seed.

Each table: rows are the arms (the base model first), columns the tasks (accuracy ± lm-eval stderr),
the group averages and Overall (macro averages over tasks, accuracy in %; with several seeds mean ±
sample std over seeds), and the change of Overall against the baseline, absolute (points) and
relative (% of the baseline's Overall). The change is tested by pairing where the data allow it, so
one seed suffices: problem by problem (eval_samples.jsonl: a paired bootstrap over problems, McNemar
per task; the table "Problem by problem"), else with Welch's t-test over seeds (a one-sample t-test
when one side has a single run). `~` marks p > 0.05, a difference that noise explains; `?` marks a
change that cannot be tested. Runs with probe.jsonl get a probe table: the change of information gain
on the same items since step 0 and against the baseline arm, paired over items; it is the headline
while no run is evaluated. The statistics are in rlp_cli/stats.py.
Partial results are normal: running, failed and missing runs appear as such; a file that cannot be
read is skipped with a warning.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml

from rlp_cli import runio
from rlp_cli.config import flatten
from rlp_cli.errors import UserError
# betainc and t_two_sided_p are not used here: they stay importable from rlp_cli.report, where they used to live.
from rlp_cli.stats import (betainc, combine_seeds, mcnemar, mean_std, minimum_detectable_difference,  # noqa: F401
                           paired_bootstrap, paired_differences, paired_t, stderr_binary, t_two_sided_p, welch_test)

FORMATS = ("md", "csv", "tex", "json")
NOISE_P = 0.05
IGNORED_AXIS_KEYS = ("name", "seed", "device", "threads")  # and log.*: they do not change what is learnt
PROBE_VERSION = 1
PROBE_METRICS = ("info_gain", "content_gain", "s_pred", "s_ema", "s_empty", "frac_positive")
PROBE_TABLE_METRICS = ("info_gain", "content_gain", "s_pred")  # the probe table's columns
BOOTSTRAP_SAMPLES = 10000
SKIP_DIRS = {"final", "checkpoint", "plots", "final.tmp", "__pycache__"}
# Our config keys -> the `axis` column of the paper's results (when the manifest does not say).
PAPER_AXES = {"objective.num_rollouts": "rollouts", "objective.thought_tokens": "completion_length",
              "objective.kl_beta": "kl_beta", "objective.ema_tau": "ema_tau", "data.corpus": "corpus",
              "objective.reward": "reward", "budget.input_tokens": "token_budget"}
PAPER_SOURCE = "Hatamizadeh et al., RLP (arXiv 2510.01265), Qwen3-1.7B-Base unless noted"


# --------------------------------------------------------------------------------------------
# Markers


def _is_number(v: Any) -> bool:
    """A finite int or float (not a bool, not None, nan or inf)."""
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def noise_marker(test: Optional[dict]) -> str:
    """The report's marks: `?` not testable (no test, or a p that is None / nan), `~` p > NOISE_P, none otherwise."""
    if test is None or not _is_number(test.get("p")):
        return "?"
    return "~" if test["p"] > NOISE_P else ""


def relative_change(value: float, baseline: float) -> float:
    """value / baseline - 1, in percent (nan when the baseline is 0)."""
    if baseline == 0 or math.isnan(baseline) or math.isnan(value):
        return float("nan")
    return (value / baseline - 1.0) * 100.0


# --------------------------------------------------------------------------------------------
# Reading the results folder


def _read_json_file(path: Path, warnings: list[str], what: str) -> Optional[dict]:
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        warnings.append(f"{path}: skipped, not readable as JSON ({type(e).__name__}); a half-written or foreign {what}?")
        return None
    if not isinstance(data, dict):
        warnings.append(f"{path}: skipped, a {what} must be a JSON object")
        return None
    return data


def eval_columns(ev: dict, path: Path, warnings: list[str]) -> Optional[dict]:
    """The flat metric columns of an eval.json: acc/<task|group>, pass@1/<...>, ppl, info_gain."""
    results, groups = ev.get("results"), ev.get("groups")
    if not isinstance(results, dict) or not isinstance(groups, dict):
        warnings.append(f"{path}: skipped, no 'results' / 'groups' (not an `rlp eval` file?)")
        return None
    cols: dict[str, Any] = {}
    for name, r in list(results.items()) + list(groups.items()):
        if not isinstance(r, dict):
            continue
        for metric in ("acc", "pass@1"):
            if isinstance(r.get(metric), (int, float)):
                cols[f"{metric}/{name}"] = float(r[metric])
    intrinsic = ev.get("intrinsic") or {}
    for key, col in (("heldout_perplexity", "ppl"), ("heldout_info_gain", "info_gain")):
        if isinstance(intrinsic.get(key), (int, float)):
            cols[col] = float(intrinsic[key])
    suite = ev.get("suite") or {}
    cols["eval_suite"] = f"{suite.get('name')} v{suite.get('version')}" if suite else None
    cols["eval_seed"] = suite.get("seed")
    cols["eval_time_s"] = ev.get("total_evaluation_time_seconds")
    cols["_tasks"] = [t for t in results if isinstance(results[t], dict)]
    cols["_groups"] = {t: results[t].get("group") for t in cols["_tasks"]}
    cols["_task_n"] = {t: results[t]["n"] for t in cols["_tasks"] if isinstance(results[t].get("n"), int)}
    cols["_task_stderr"] = {t: float(results[t]["acc_stderr"]) for t in cols["_tasks"]
                            if _is_number(results[t].get("acc_stderr"))}
    return cols


def last_value(rows: list[dict], key: str) -> Any:
    """The value of `key` in the last row that has it (rows may lack keys: the step-0 probe row has only probes)."""
    for row in reversed(rows):
        if row.get(key) is not None:
            return row[key]
    return None


def is_training_row(row: dict) -> bool:
    """A metrics.jsonl row written by a training step (not a probe-only row, such as the one at step 0)."""
    return any(k != "step" and not k.startswith("probe/") for k in row)


def training_columns(rows: list[dict], status: dict) -> dict:
    """Final training metrics (mean over the last 10% of the steps that logged each one), final probe means
    and compute totals. Rows may lack any key; each value comes from the rows that have it."""
    cols: dict[str, Any] = {"steps_logged": sum(1 for r in rows if is_training_row(r))}
    for metric in ("reward", "rlp/info_gain", "loss", "completions/mean_length"):
        vals = [float(r[metric]) for r in rows if _is_number(r.get(metric))]
        tail = vals[-max(1, len(vals) // 10):]
        cols[f"train/{metric}"] = sum(tail) / len(tail) if tail else None
    for metric in PROBE_METRICS:  # the last probe's mean over its items
        vals = [float(r[f"probe/{metric}"]) for r in rows if _is_number(r.get(f"probe/{metric}"))]
        cols[f"probe/{metric}"] = vals[-1] if vals else None
    for key in ("input_tokens", "generated_tokens", "flops"):
        value = status.get(key, last_value(rows, key))
        cols[key] = value if isinstance(value, (int, float)) else None
    cols["wall_time_s"] = status.get("wall_time_s")
    if cols["wall_time_s"] is None and rows:
        cols["wall_time_s"] = sum(r.get("step_time", 0.0) for r in rows if isinstance(r.get("step_time"), (int, float)))
    return cols


def read_probe(path: Path, warnings: list[str]) -> dict[int, dict[str, dict[str, float]]]:
    """probe.jsonl -> {step: {metric: {item id: value}}}, non-finite values left out.

    Each line: {"step", "probe_version": 1, "items": [ids], <metric>: [one value per item], ...} for the
    metrics in PROBE_METRICS (a line may lack some). A torn last line is skipped; a step logged twice (a
    resumed run) keeps its last line; lines of another probe_version are skipped with a warning."""
    by_step: dict[int, dict[str, dict[str, float]]] = {}
    skipped = Counter()
    for line in runio.read_jsonl(path):
        if not isinstance(line, dict):
            skipped["not a JSON object"] += 1
            continue
        if line.get("probe_version", PROBE_VERSION) != PROBE_VERSION:
            skipped[f"probe_version {line.get('probe_version')!r} (this report reads {PROBE_VERSION})"] += 1
            continue
        step, items = line.get("step"), line.get("items")
        if not isinstance(step, int) or isinstance(step, bool) or not isinstance(items, list):
            skipped["no integer 'step' or no 'items' list"] += 1
            continue
        metrics = {}
        for metric in PROBE_METRICS:
            values = line.get(metric)
            if values is None:
                continue
            if not isinstance(values, list) or len(values) != len(items):
                skipped[f"'{metric}' is not a list with one value per item"] += 1
                continue
            metrics[metric] = {str(i): float(v) for i, v in zip(items, values) if _is_number(v)}
        by_step[step] = metrics
    for why, count in skipped.items():
        warnings.append(f"{path}: {count} line(s) skipped: {why}")
    return by_step


def read_eval_items(path: Path, warnings: list[str]) -> dict[tuple, float]:
    """eval_samples.jsonl -> {(task, dataset_seed, doc_id): 1.0 | 0.0}, the greedy answer's correctness per problem.

    Records without a greedy `correct` (sampled thoughts, lm-evaluation-harness samples) are not used."""
    items: dict[tuple, float] = {}
    for rec in runio.read_jsonl(path):
        if not isinstance(rec, dict) or rec.get("sample") != "greedy" or rec.get("task") is None \
                or rec.get("doc_id") is None or not isinstance(rec.get("correct"), (bool, int, float)):
            continue
        items[(str(rec["task"]), rec.get("dataset_seed"), rec["doc_id"])] = float(rec["correct"])
    if path.is_file() and not items:
        warnings.append(f"{path}: no greedy records with 'correct'; the paired comparison skips this run")
    return items


@dataclass
class Ablation:
    key: str  # the folder relative to the results folder (its own name for the results folder itself)
    folder: Path
    manifest: Optional[dict] = None
    rows: list[dict] = field(default_factory=list)
    axes: list[str] = field(default_factory=list)  # config keys (or `arm`) that tell the arms apart


def scan(results_dir: Path, warnings: list[str]) -> dict[str, Ablation]:
    """Find run folders, stand-alone evals (base models) and manifests; group them by parent folder."""
    root = Path(results_dir)
    ablations: dict[str, Ablation] = {}

    def ablation_for(folder: Path) -> Ablation:
        key = os.path.relpath(folder, root) if folder != root else root.resolve().name  # named, never "."
        if key not in ablations:
            manifest = _read_json_file(folder / "manifest.json", warnings, "manifest")
            if manifest is not None and not isinstance(manifest.get("runs", []), list):
                warnings.append(f"{folder / 'manifest.json'}: 'runs' is not a list; the manifest is ignored")
                manifest = None
            ablations[key] = Ablation(key, folder, manifest)
        return ablations[key]

    for dirpath, dirnames, filenames in os.walk(root):
        folder = Path(dirpath)
        dirnames[:] = sorted(d for d in dirnames if d not in SKIP_DIRS and not d.startswith(".") and not d.endswith(".tmp"))
        if "config.yaml" in filenames and "status.json" in filenames:
            dirnames[:] = []  # a run folder holds no further runs
            row = read_run(folder, root, warnings)
            if row is not None:
                ablation_for(folder.parent if folder != root else folder).rows.append(row)
        elif "eval.json" in filenames or "eval_status.json" in filenames:
            row = read_model_eval(folder, root, warnings)
            if row is not None:
                ablation_for(folder.parent if folder != root else folder).rows.append(row)
        elif "manifest.json" in filenames:
            ablation_for(folder)
    for ab in ablations.values():
        if ab.manifest:
            add_manifest_rows(ab, root, warnings)
    return {k: ab for k, ab in sorted(ablations.items()) if ab.rows}


def read_run(folder: Path, root: Path, warnings: list[str]) -> Optional[dict]:
    try:
        config = yaml.safe_load((folder / "config.yaml").read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        warnings.append(f"{folder / 'config.yaml'}: skipped, unreadable YAML ({type(e).__name__})")
        return None
    if not isinstance(config, dict) or not isinstance(config.get("objective", {}), dict):
        warnings.append(f"{folder / 'config.yaml'}: skipped, not an rlp run config")
        return None
    status = _read_json_file(folder / "status.json", warnings, "status file")
    if status is None:
        status = {"status": "unknown"}
    metrics = [r for r in runio.read_jsonl(folder / "metrics.jsonl") if isinstance(r, dict)]
    row: dict[str, Any] = {"kind": "run", "folder": os.path.relpath(folder, root), "name": folder.name,
                           "status": str(status.get("status", "unknown")), "step": status.get("step"),
                           "error": status.get("error"), "seed": config.get("seed"),
                           "total_steps": (config.get("budget") or {}).get("steps"),
                           "model": (config.get("model") or {}).get("name"), "_config": flatten(config),
                           "_metrics": metrics, "evaluated": False,
                           "_probe": read_probe(folder / "probe.jsonl", warnings)}
    row.update(training_columns(metrics, status))
    ev = _read_json_file(folder / "eval.json", warnings, "eval file")
    if ev is not None:
        cols = eval_columns(ev, folder / "eval.json", warnings)
        if cols is not None:
            row.update(cols)
            row["evaluated"] = True
            row["_eval_items"] = read_eval_items(folder / "eval_samples.jsonl", warnings)
    eval_status = _read_json_file(folder / "eval_status.json", warnings, "eval status file") or {}
    row["eval_error"] = eval_status.get("error") if eval_status.get("status") == "failed" and not row["evaluated"] else None
    return row


def read_model_eval(folder: Path, root: Path, warnings: list[str]) -> Optional[dict]:
    """A stand-alone `rlp eval MODEL` result, e.g. the base model of an ablation in base/."""
    ev = _read_json_file(folder / "eval.json", warnings, "eval file")
    cols = None if ev is None else eval_columns(ev, folder / "eval.json", warnings)
    if cols is None:
        # `rlp ablate` records a failed evaluation in eval_status.json: show it instead of hiding the base row.
        status = _read_json_file(folder / "eval_status.json", warnings, "eval status file") or {}
        if status.get("status") != "failed":
            return None
        return {"kind": "base", "folder": os.path.relpath(folder, root), "name": folder.name, "status": "eval failed",
                "error": status.get("error"), "seed": None, "model": None, "arm": f"base ({folder.name})",
                "evaluated": False, "_config": {}, "_metrics": []}
    model = (ev.get("model") or {}).get("target") or folder.name
    return {"kind": "base", "folder": os.path.relpath(folder, root), "name": folder.name, "status": "completed",
            "seed": None, "model": model, "arm": f"base ({model})", "evaluated": True, "_config": {},
            "_metrics": [], "_eval_items": read_eval_items(folder / "eval_samples.jsonl", warnings), **cols}


def add_manifest_rows(ab: Ablation, root: Path, warnings: list[str]) -> None:
    """Arms and seeds from the manifest; runs it lists that have no folder yet appear as `missing`."""
    by_dir = {r["name"]: r for r in ab.rows if r["kind"] == "run"}
    for entry in ab.manifest.get("runs", []):
        if not isinstance(entry, dict) or "dir" not in entry:
            continue
        row = by_dir.get(entry["dir"])
        if row is None:
            row = {"kind": "run", "folder": os.path.relpath(ab.folder / entry["dir"], root), "name": entry["dir"],
                   "status": "missing", "seed": entry.get("seed"), "evaluated": False, "_metrics": [],
                   "_config": flatten(entry.get("config") or {})}
            ab.rows.append(row)
        row["arm"] = str(entry.get("arm", row.get("arm")))
        row["_axis_values"] = entry.get("axis_values") or {}
        row["_manifest_order"] = ab.manifest["runs"].index(entry)
    base_dirs = {b.get("dir"): b.get("model") for b in ab.manifest.get("base_models", []) if isinstance(b, dict)}
    found = set()
    for row in ab.rows:
        if row["kind"] == "base" and row["name"] in base_dirs:
            row["arm"] = f"base ({base_dirs[row['name']]})"
            found.add(row["name"])
    for d, model in base_dirs.items():
        if d and d not in found and ab.manifest.get("eval_suite") != "none":
            ab.rows.append({"kind": "base", "folder": os.path.relpath(ab.folder / d, root), "name": d,
                            "status": "missing", "seed": None, "model": model, "arm": f"base ({model})",
                            "evaluated": False, "_config": {}, "_metrics": []})
    for row in ab.rows:
        if row["kind"] == "run" and "_manifest_order" not in row:
            warnings.append(f"{ab.folder / row['name']}: a run folder that {ab.folder / 'manifest.json'} does not list "
                            "(retired or foreign); shown under its own name")
            row["arm"] = row["name"]


def infer_axes(rows: list[dict]) -> list[str]:
    """Config keys that differ between the runs, seed and bookkeeping keys excluded."""
    configs = [r["_config"] for r in rows if r["kind"] == "run" and r["_config"]]
    keys = sorted({k for c in configs for k in c})
    axes = []
    for k in keys:
        if k in IGNORED_AXIS_KEYS or k.startswith("log."):
            continue
        if len({json.dumps(c.get(k), sort_keys=True, default=str) for c in configs}) > 1:
            axes.append(k)
    return axes


def short_keys(keys: list[str]) -> dict[str, str]:
    """The shortest dotted suffix that still tells the keys apart: objective.num_rollouts -> num_rollouts."""
    out = {}
    for k in keys:
        parts = k.split(".")
        for i in range(len(parts) - 1, -1, -1):
            cand = ".".join(parts[i:])
            if sum(1 for other in keys if other == cand or other.endswith("." + cand)) == 1:
                out[k] = cand
                break
        else:
            out[k] = k
    return out


def assign_arms(ab: Ablation) -> list[str]:
    """Give each run an arm (from the manifest, or from the differing config keys); return the axes."""
    if ab.manifest:
        axes = list((ab.manifest.get("axes") or {}).keys())
        return axes
    axes = infer_axes(ab.rows)
    names = short_keys(axes)
    for row in ab.rows:
        if row["kind"] != "run":
            continue
        values = {k: row["_config"].get(k) for k in axes}
        row["_axis_values"] = values
        row["arm"] = ", ".join(f"{names[k]}={_fmt_value(v)}" for k, v in values.items()) or "run"
    return axes


def _fmt_value(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:g}"
    if isinstance(v, list):
        return "+".join(map(str, v))
    return str(v)


def axis_value(row: dict, axis: str) -> Any:
    if axis == "arm":
        return row.get("arm")
    values = row.get("_axis_values") or {}
    if axis in values:
        return values[axis]
    return row["_config"].get(axis)


def collect(results_dir: str | Path) -> tuple["Any", dict[str, Ablation], list[str]]:
    """One pandas DataFrame with a row per run (or base-model eval), the ablations, and the warnings."""
    import pandas as pd

    root = Path(results_dir)
    if not root.is_dir():
        raise UserError(f"{root}: no such results folder. Fix: pass the folder `rlp ablate` or `rlp train` wrote "
                        "(default: results/).")
    warnings: list[str] = []
    ablations = scan(root, warnings)
    records = []
    for ab in ablations.values():
        axes = ab.axes = assign_arms(ab)
        for row in ab.rows:
            rec = {"ablation": ab.key, **{k: v for k, v in row.items() if not k.startswith("_")}}
            for k in axes:
                rec[f"axis:{k}"] = axis_value(row, k) if row["kind"] == "run" else None
            records.append(rec)
    frame = pd.DataFrame.from_records(records)
    return frame, ablations, warnings


# --------------------------------------------------------------------------------------------
# Paper-style tables


def _status_text(row: dict) -> str:
    s = row.get("status", "unknown")
    if s == "completed":
        if row.get("evaluated"):
            return "done"
        return "eval failed" if row.get("eval_error") else "not evaluated"
    if s == "running":
        return f"running (step {row.get('step') or 0}/{row.get('total_steps') or '?'})"
    return s


@dataclass
class SubTable:
    """A table that goes with an ablation's main table: the probe, or the problem-by-problem comparison."""
    title: str
    columns: list[str]
    rows: list[list[str]]  # formatted cells
    data: list[dict]  # the numbers behind each row
    footer: list[str]


@dataclass
class Table:
    ablation: str
    title: str
    columns: list[str]
    rows: list[list[str]]  # formatted cells
    data: list[dict]  # the numbers behind each row
    footer: list[str]
    compute_columns: list[str] = field(default_factory=list)
    compute_rows: list[list[str]] = field(default_factory=list)
    paper_columns: list[str] = field(default_factory=list)
    paper_rows: list[list[str]] = field(default_factory=list)
    paper_caption: str = ""
    runs: list[dict] = field(default_factory=list)  # per run: folder, arm, seed, status, error
    plots: list[str] = field(default_factory=list)
    paired_eval: Optional[SubTable] = None  # each arm against the baseline, problem by problem
    probe: Optional[SubTable] = None  # the training-time probe, when the runs wrote probe.jsonl
    headline: str = "eval"  # "probe" when no run is evaluated yet but the runs have a probe


def _cell(values: list[float], scale: float = 1.0, digits: int = 1) -> str:
    m, s, n = mean_std(values)
    if n == 0:
        return "—"
    text = f"{m * scale:.{digits}f}"
    return text + (f" ± {s * scale:.{digits}f}" if n > 1 else "")


def _signed(value: Optional[float], scale: float = 1.0, digits: int = 1) -> str:
    return "—" if value is None or not math.isfinite(value) else f"{value * scale:+.{digits}f}"


def ordered_arms(ab: Ablation, axes: list[str]) -> list[str]:
    """Base model(s) first, then the manifest's order, else sorted by axis values (numbers numerically)."""
    bases = list(dict.fromkeys(r["arm"] for r in ab.rows if r["kind"] == "base"))
    runs = [r for r in ab.rows if r["kind"] == "run"]
    if any("_manifest_order" in r for r in runs):
        runs.sort(key=lambda r: r.get("_manifest_order", 1 << 30))
    else:
        def key(r):
            return tuple((0, v, "") if isinstance(v, (int, float)) and not isinstance(v, bool) else (1, 0, str(v))
                         for v in (axis_value(r, a) for a in axes))
        runs.sort(key=key)
    return bases + list(dict.fromkeys(r["arm"] for r in runs))


def headline_metric(ab: Ablation) -> str:
    metrics = ((ab.manifest or {}).get("report") or {}).get("metrics") or []
    for m in metrics:
        if m in ("overall",) or any(f"acc/{m}" in r for r in ab.rows):
            return m
    return "overall"


def pick_baseline(ab: Ablation, arms: list[str]) -> tuple[Optional[str], str]:
    """The arm every change is relative to, and a note when the requested one is not available."""
    wanted = (ab.manifest or {}).get("baseline")
    bases = [a for a in arms if all(r["kind"] == "base" for r in ab.rows if r.get("arm") == a)]
    run_arms = [a for a in arms if a not in bases]
    evaluated = {r["arm"] for r in ab.rows if r.get("evaluated")}
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


# --------------------------------------------------------------------------------------------
# Paired comparisons: evals problem by problem, the probe item by item


def eval_items_of(runs: list[dict]) -> Optional[dict[str, dict[tuple, float]]]:
    """{run folder: {problem: greedy correct}} for an arm's evaluated runs; None unless every evaluated run
    left per-problem samples (a pairing over part of the seeds would hide the others' noise)."""
    evaluated = [r for r in runs if r.get("evaluated")]
    if not evaluated or not all(r.get("_eval_items") for r in evaluated):
        return None
    return {r["folder"]: r["_eval_items"] for r in evaluated}


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
        cells = [arm, str(c["n_problems"]), _signed(test["mean"], 100) + noise_marker(test), interval,
                 _p_text(test["p"]), _num1(100 * c["mdd_paired"])]
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


def probe_final(run: dict) -> tuple[int, dict[str, dict[str, float]]]:
    step = max(run["_probe"])
    return step, run["_probe"][step]


def probe_change(run: dict, metric: str) -> Optional[dict[str, float]]:
    """{item: final value - step-0 value} of one run; None without a step 0 or a later probe."""
    probe = run["_probe"]
    step, final = probe_final(run)
    if 0 not in probe or step == 0:
        return None
    items, diffs = paired_differences(final.get(metric, {}), probe[0].get(metric, {}))
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
    wanted = (ab.manifest or {}).get("baseline")
    has_base = any(r["kind"] == "base" for r in ab.rows)
    if wanted == "base" or (wanted is None and has_base):
        return None, ("the baseline is the base model, whose probe is each run's step 0 (before training): "
                      "Δ since step 0 is the change against it")
    if wanted is not None:
        if wanted in probe_arms:
            return wanted, ""
        return None, f"the baseline arm {wanted} has no probe yet"
    return (probe_arms[0], "") if probe_arms else (None, "")


def build_probe_table(ab: Ablation, arms: list[str]) -> Optional[SubTable]:
    """Per arm: final probe values, their change since step 0 and their difference from the baseline arm,
    each paired over the probe's items (items averaged over the arm's seeds first)."""
    runs_of = {a: [r for r in ab.rows if r.get("arm") == a and r["kind"] == "run" and r.get("_probe")] for a in arms}
    probe_arms = [a for a in arms if runs_of[a]]
    if not probe_arms:
        return None
    baseline, note = pick_probe_baseline(ab, arms, probe_arms)
    finals = {a: {m: {r["folder"]: probe_final(r)[1].get(m, {}) for r in runs_of[a]} for m in PROBE_TABLE_METRICS}
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
        record: dict[str, Any] = {"arm": arm, "runs": [r["folder"] for r in runs],
                                  "seeds": [r.get("seed") for r in runs],
                                  "final_steps": {r["folder"]: probe_final(r)[0] for r in runs},
                                  "baseline": arm == baseline}
        for m in PROBE_TABLE_METRICS:
            per_run_final = [_item_mean(v) for v in finals[arm][m].values()]
            spread = _seed_spread(per_run_final)
            level = _item_mean(combined[arm][m])
            if not math.isfinite(level):
                cells.append("—")
            else:
                cells.append(f"{level:.3f}" + (f" ± {spread:.3f}" if spread is not None else ""))
            changes = {r["folder"]: probe_change(r, m) for r in runs}
            changes = {k: v for k, v in changes.items() if v is not None}
            change = None
            if changes:
                change = paired_summary(combine_seeds(changes), [_item_mean(v) for v in changes.values()])
            cells.append(_delta_cell(change))
            if change is not None and m == "info_gain" and change["n_items"] > 1:
                sd = mean_std(list(combine_seeds(changes).values()))[1]
                sensitivity.append(f"{arm}: p = {_p_text(change['bootstrap']['p'])} over {change['n_items']} items, "
                                   f"minimum detectable change {minimum_detectable_difference(sd, change['n_items']):.3f}")
            versus = None
            if baseline and arm == baseline:
                cells.append("ref")
            elif baseline:
                items, diffs = paired_differences(combined[arm][m], combined[baseline][m])
                base_by_seed = {r.get("seed"): finals[baseline][m][r["folder"]] for r in runs_of[baseline]}
                single_base = next(iter(base_by_seed.values())) if len(base_by_seed) == 1 else None
                per_seed = []  # each run against the baseline's run of the same seed (or its only run)
                for r in runs:
                    other = base_by_seed.get(r.get("seed"), single_base)
                    if other is not None:
                        _, seed_diffs = paired_differences(finals[arm][m][r["folder"]], other)
                        per_seed.append(sum(seed_diffs) / len(seed_diffs) if seed_diffs else float("nan"))
                if combined[arm][m] and combined[baseline][m] and not items:
                    unpaired.append(arm)
                versus = paired_summary(dict(zip(items, diffs)), per_seed) if items else None
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


def _p_text(p: Optional[float]) -> str:
    if p is None or not math.isfinite(p):
        return "—"
    return "<0.001" if p < 0.001 else f"{p:.3f}"


def _num1(v: Optional[float]) -> str:
    return "—" if v is None or not math.isfinite(v) else f"{v:.1f}"


# --------------------------------------------------------------------------------------------
# The main table


def headline_tasks(headline: str, tasks: list[str], groups_of: dict[str, str]) -> list[str]:
    """The tasks behind the headline metric: all of them (overall), a group's, or the one task."""
    if headline == "overall":
        return tasks
    in_group = [t for t in tasks if groups_of.get(t) == headline]
    return in_group or [t for t in tasks if t == headline]


def build_table(ab: Ablation, paper: bool, paper_frame=None) -> Table:
    axes = ab.axes
    arms = ordered_arms(ab, axes)
    rows_by_arm: dict[str, list[dict]] = {a: [r for r in ab.rows if r.get("arm") == a] for a in arms}
    evaluated = [r for r in ab.rows if r.get("evaluated")]
    groups_of: dict[str, str] = {}
    for r in evaluated:
        for t in r.get("_tasks") or []:
            groups_of.setdefault(t, (r.get("_groups") or {}).get(t) or "other")
    group_names = list(dict.fromkeys(groups_of.values()))
    tasks = [t for g in group_names for t in groups_of if groups_of[t] == g]
    headline = headline_metric(ab)
    baseline, baseline_note = pick_baseline(ab, arms)
    manifest = ab.manifest or {}
    title = ((manifest.get("report") or {}).get("title")) or f"Ablation {ab.key}"

    def values(arm: str, col: str) -> list[float]:
        return [float(r[col]) for r in rows_by_arm[arm] if r.get("evaluated") and isinstance(r.get(col), (int, float))
                and not math.isnan(float(r[col]))]

    def task_problems(arm: str, task: str) -> Optional[int]:
        counts = [r["_task_n"][task] for r in rows_by_arm[arm]
                  if r.get("evaluated") and task in (r.get("_task_n") or {})]
        return counts[0] if counts else None

    def task_stderr(arm: str, task: str) -> float:
        """lm-eval style stderr of the task's accuracy (at the mean over seeds), over its problems."""
        accs = values(arm, f"acc/{task}")
        n = task_problems(arm, task)
        if n:
            return stderr_binary(sum(accs) / len(accs), n)
        reported = [r["_task_stderr"][task] for r in rows_by_arm[arm]
                    if r.get("evaluated") and task in (r.get("_task_stderr") or {})]
        return reported[0] if len(accs) == 1 and reported else float("nan")

    def task_cell(arm: str, task: str) -> str:
        accs = values(arm, f"acc/{task}")
        if not accs:
            return "—"
        se = task_stderr(arm, task)
        return f"{100 * sum(accs) / len(accs):.1f}" + (f" ± {100 * se:.1f}" if math.isfinite(se) else "")

    # Problem-by-problem comparisons against the baseline, where both sides left eval_samples.jsonl.
    comparisons: dict[str, dict] = {}
    head_comparisons: dict[str, dict] = {}
    head_tasks = headline_tasks(headline, tasks, groups_of)
    baseline_items = eval_items_of(rows_by_arm[baseline]) if baseline else None
    if baseline_items:
        for arm in arms:
            arm_items = eval_items_of(rows_by_arm[arm]) if arm != baseline else None
            if not arm_items:
                continue
            comparison = compare_problems(arm_items, baseline_items, tasks)
            if comparison is None:
                continue
            comparisons[arm] = comparison
            head = comparison if head_tasks == tasks else compare_problems(arm_items, baseline_items, head_tasks)
            if head is not None and head["n_problems"] > 1:
                head_comparisons[arm] = head

    head_col = f"acc/{headline}"
    base_values = values(baseline, head_col) if baseline else []
    base_mean = mean_std(base_values)[0]
    ref = baseline or "—"
    columns = ["Arm", "n"] + tasks + [g.capitalize() + " Avg" for g in group_names] + ["Overall"]
    columns += [f"Δ {headline} vs {ref} (pts)", f"Δ rel vs {ref} (%)", "pass@1 Overall", "ppl (held-out)",
                "info gain (nats)", "status"]
    rows, data, tests_used = [], [], set()
    for arm in arms:
        members = rows_by_arm[arm]
        n_eval = sum(1 for r in members if r.get("evaluated"))
        cells = [arm, str(n_eval)]
        cells += [task_cell(arm, t) for t in tasks]
        cells += [_cell(values(arm, f"acc/{g}"), 100) for g in group_names]
        cells.append(_cell(values(arm, "acc/overall"), 100))
        head = values(arm, head_col)
        record: dict[str, Any] = {"arm": arm, "n": n_eval, "baseline": arm == baseline,
                                  "axis_values": {a: axis_value(members[0], a) for a in axes} if members and
                                  members[0]["kind"] == "run" else {}}
        for col in [f"acc/{x}" for x in tasks + group_names + ["overall"]] + ["pass@1/overall", "ppl", "info_gain"]:
            m, s, n = mean_std(values(arm, col))
            record[col] = {"mean": None if n == 0 else m, "std": None if n < 2 else s, "n": n}
        for t in tasks:
            se = task_stderr(arm, t) if values(arm, f"acc/{t}") else float("nan")
            record[f"acc/{t}"].update(stderr=se if math.isfinite(se) else None, n_problems=task_problems(arm, t))
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
        cells.append(_cell(values(arm, "pass@1/overall"), 100))
        cells.append(_cell(values(arm, "ppl"), 1, 2))
        cells.append(_cell(values(arm, "info_gain"), 1, 3))
        statuses = Counter(_status_text(r) for r in members)
        cells.append(", ".join(f"{n} {s}" if len(members) > 1 else s for s, n in statuses.items()))
        rows.append(cells)
        data.append(record)

    suites = sorted({str(r.get("eval_suite")) for r in evaluated if r.get("eval_suite")})
    seeds = sorted({r.get("seed") for r in ab.rows if r["kind"] == "run" and r.get("seed") is not None})
    footer = [
        "Accuracy in % on the `rlp eval` suite " + (", ".join(suites) or "(none yet)") + ": greedy thought, then a "
        "greedy answer scored by each reasoning-gym generator's own checker. Group averages and Overall are macro "
        "averages over tasks (every task weighs the same, whatever its number of problems).",
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
    mdd_note = minimum_detectable_note(ab, arms, rows_by_arm, baseline, comparisons, values)
    if mdd_note:
        footer.append(mdd_note)
    if len(suites) > 1:
        footer.append("WARNING: the runs were evaluated with different suites; their numbers are not comparable.")
    if tests_used:
        footer.append("Tests used in this table: " + ", ".join(sorted(tests_used)) + ".")
    if baseline_note:
        footer.append(f"Note: {baseline_note}.")
    if axes:
        footer.append("Axes: " + ", ".join(axes) + ("" if manifest else " (inferred: the config keys that differ "
                                                      "between runs; no manifest.json)"))

    compute_columns = ["Arm", "steps", "input tokens", "generated tokens", "FLOPs", "wall time (s)",
                       "final reward", "final info gain", "final loss"]
    compute_rows = []
    for arm in arms:
        if all(r["kind"] == "base" for r in rows_by_arm[arm]):
            continue
        runs = [r for r in rows_by_arm[arm] if r["kind"] == "run" and r.get("status") != "missing"]

        def col(key, digits=0, sci=False):
            vals = [float(r[key]) for r in runs if isinstance(r.get(key), (int, float))]
            if not vals:
                return "—"
            m, s, n = mean_std(vals)
            f = (lambda v: f"{v:.2e}") if sci else (lambda v: f"{v:,.{digits}f}")
            return f(m) + (f" ± {f(s)}" if n > 1 and s > 0 else "")
        compute_rows.append([arm, col("step"), col("input_tokens"), col("generated_tokens"), col("flops", sci=True),
                             col("wall_time_s", 1), col("train/reward", 4), col("train/rlp/info_gain", 4),
                             col("train/loss", 4)])

    table = Table(ablation=ab.key, title=title, columns=columns, rows=rows, data=data, footer=footer,
                  compute_columns=compute_columns, compute_rows=compute_rows,
                  runs=[{"folder": r["folder"], "arm": r.get("arm"), "seed": r.get("seed"), "status": _status_text(r),
                         "error": r.get("error") or r.get("eval_error")} for r in ab.rows])
    table.paired_eval = build_paired_eval(comparisons, baseline, tasks) if baseline else None
    table.probe = build_probe_table(ab, arms)
    if table.probe is not None and not any(r["kind"] == "run" for r in evaluated):
        table.headline = "probe"
    if paper and paper_frame is not None:
        add_paper_rows(table, ab, arms, paper_frame)
    return table


def minimum_detectable_note(ab: Ablation, arms: list[str], rows_by_arm: dict[str, list[dict]], baseline: Optional[str],
                            comparisons: dict[str, dict], values) -> str:
    """One line: the smallest Overall difference the suite can detect, from its size and the observed data."""
    evaluated = [r for r in ab.rows if r.get("evaluated") and r.get("_task_n")]
    if not evaluated:
        return ""
    problems = sum(evaluated[0]["_task_n"].values())
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


def load_paper_results():
    import importlib.resources

    import pandas as pd

    with importlib.resources.files("rlp_cli").joinpath("paper/rlp_paper_results.csv").open() as fh:
        return pd.read_csv(fh, dtype={"value": str, "table": str})


def paper_axis_for(ab: Ablation) -> tuple[Optional[str], dict]:
    link = ((ab.manifest or {}).get("report") or {}).get("paper")
    if isinstance(link, dict) and link.get("axis"):
        return str(link["axis"]), {str(k): str(v) for k, v in (link.get("values") or {}).items()}
    keys = set(ab.axes) | set(infer_axes(ab.rows))  # a manifest's `arm` axis hides which config keys differ
    if "objective.name" in keys:  # thought vs next-token training (Table 1), or sparse vs dense rewards (Table 3)
        names = {r["_config"].get("objective.name") for r in ab.rows if r["kind"] == "run"}
        return ("objective" if "ntp" in names else "reward"), {}
    for key in PAPER_AXES:
        if key in keys:
            return PAPER_AXES[key], {}
    return None, {}


def add_paper_rows(table: Table, ab: Ablation, arms: list[str], frame) -> None:
    """The paper's published rows for the same axis, with each row's change against its table's base row."""
    axis, values = paper_axis_for(ab)
    if axis is None:
        table.paper_caption = "The paper reports no ablation for these axes."
        return
    rows = frame[frame["axis"] == axis]
    if rows.empty:
        table.paper_caption = f"The paper reports no ablation on the axis '{axis}'."
        return
    table.paper_columns = ["Table", "Variant", "Value", "Math Avg", "Science Avg", "Overall", "Δ rel vs paper base (%)",
                           "our arm"]
    ours_for = {}
    for arm in arms:
        value = values.get(arm)
        members = [r for r in ab.rows if r.get("arm") == arm]
        if value is None and members and members[0]["kind"] == "base":
            value = "base"  # matched to the paper's base rows below, whatever their `value`
        elif value is None and len(ab.axes) == 1 and members:
            value = _fmt_value(axis_value(members[0], ab.axes[0]))
            if ab.axes[0] == "arm" or axis == "objective":
                value = {"ntp": "cpt"}.get(value, value)  # the paper calls next-token training CPT
        if value is not None:
            ours_for.setdefault(str(value), []).append(arm)
    for _, r in rows.iterrows():
        # Each row against its table's base row ("+post" rows against "base+post", as the paper pairs them).
        suffix = "+post" if str(r["variant"]).endswith("+post") else ""
        same_table = frame[frame["table"] == r["table"]]
        base = same_table[same_table["variant"].str.fullmatch("base" + re.escape(suffix)) |
                          (same_table["variant"].str.startswith("base (") if not suffix else False)]
        base_overall = float(base["overall"].iloc[0]) if not base.empty else float("nan")
        rel = relative_change(float(r["overall"]), base_overall)
        rel_text = "—" if math.isnan(rel) or r["variant"].startswith("base") else f"{rel:+.1f}%"
        table.paper_rows.append([str(r["table"]), str(r["variant"]), str(r["value"]), _num(r["math_avg"]),
                                 _num(r["science_avg"]), _num(r["overall"]), rel_text,
                                 ", ".join(ours_for.get("base" if r["variant"] == "base" else str(r["value"]), []))])
    table.paper_caption = (f"Published numbers for the same axis ('{axis}'), {PAPER_SOURCE}: different model, "
                           "benchmarks (math: GSM8K, MATH-500, Minerva, AMC23; science: MMLU, MMLU-Pro, GPQA) and "
                           "scale, so compare directions, not levels. Δ rel: plain ratio of the overall averages "
                           "against the base row of the same paper table.")


def _num(v) -> str:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return "—"
    return "—" if math.isnan(f) else f"{f:.2f}"


# --------------------------------------------------------------------------------------------
# Renderers


def _md_table(columns: list[str], rows: list[list[str]]) -> str:
    def esc(s: str) -> str:
        return str(s).replace("|", "\\|").replace("\n", " ")
    lines = ["| " + " | ".join(esc(c) for c in columns) + " |",
             "|" + "|".join("---" if i == 0 else "---:" for i in range(len(columns))) + "|"]
    lines += ["| " + " | ".join(esc(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def render_markdown(tables: list[Table], warnings: list[str], results_dir: Path) -> str:
    out = [f"# rlp report: {results_dir}", "", f"Generated {runio.now()} by `rlp report` (rlp-cli, git "
           f"{runio.git_commit()}).", ""]
    def sub_table(sub: SubTable, heading: str) -> list[str]:
        return [heading, "", _md_table(sub.columns, sub.rows), ""] + [f"- {line}" for line in sub.footer] + [""]

    for t in tables:
        out += [f"## {t.title}", "", f"Folder: `{t.ablation}`", ""]
        if t.probe is not None and t.headline == "probe":
            out += sub_table(t.probe, f"### {t.probe.title} (the headline: no run is evaluated yet)")
            out += ["### Evaluation", ""]
        out += [_md_table(t.columns, t.rows), ""]
        out += [f"- {line}" for line in t.footer] + [""]
        if t.paired_eval is not None:
            out += sub_table(t.paired_eval, f"### {t.paired_eval.title}")
        if t.probe is not None and t.headline != "probe":
            out += sub_table(t.probe, f"### {t.probe.title}")
        if t.compute_rows:
            out += ["Training and compute (mean over seeds; final = mean over the last 10% of logged steps):", "",
                    _md_table(t.compute_columns, t.compute_rows), ""]
        if t.paper_rows:
            out += ["Paper:", "", _md_table(t.paper_columns, t.paper_rows), "", t.paper_caption, ""]
        elif t.paper_caption:
            out += [t.paper_caption, ""]
        problems = [r for r in t.runs if r["status"] not in ("done",)]
        if problems:
            out += ["Runs not (yet) in the table:", ""]
            out += [f"- `{r['folder']}` ({r['arm']}, seed {r['seed']}): {r['status']}"
                    + (f": {str(r['error']).splitlines()[0][:200]}" if r.get("error") else "") for r in problems]
            out.append("")
        for p in t.plots:
            out += [f"![{Path(p).stem}]({p})", ""]
    if warnings:
        out += ["## Skipped files", ""] + [f"- {w}" for w in warnings] + [""]
    return "\n".join(out)


def _tex_escape(s: str) -> str:
    s = str(s)
    for a, b in (("\\", r"\textbackslash{}"), ("&", r"\&"), ("%", r"\%"), ("$", r"\$"), ("#", r"\#"),
                 ("_", r"\_"), ("{", r"\{"), ("}", r"\}"), ("~", r"\textasciitilde{}"), ("^", r"\^{}"), ("<", r"$<$"), (">", r"$>$")):
        s = s.replace(a, b)
    return s.replace("±", r"$\pm$").replace("Δ", r"$\Delta$").replace("—", "--")


def _latex_table(title: str, columns: list[str], rows: list[list[str]], footer: list[str]) -> list[str]:
    return [r"\begin{table}[t]", r"\centering", r"\small", r"\resizebox{\linewidth}{!}{%",
            r"\begin{tabular}{l" + "r" * (len(columns) - 1) + "}", r"\toprule",
            " & ".join(_tex_escape(c) for c in columns) + r" \\", r"\midrule",
            *(" & ".join(_tex_escape(c) for c in row) + r" \\" for row in rows),
            r"\bottomrule", r"\end{tabular}}",
            r"\caption{" + _tex_escape(title) + ". " + " ".join(_tex_escape(f) for f in footer) + "}",
            r"\end{table}", ""]


def render_latex(tables: list[Table]) -> str:
    out = ["% Generated by `rlp report`; needs \\usepackage{booktabs}.", ""]
    for t in tables:
        out += _latex_table(t.title, t.columns, t.rows, t.footer)
        for sub in (t.paired_eval, t.probe):
            if sub is not None:
                out += _latex_table(f"{t.title}: {sub.title}", sub.columns, sub.rows, sub.footer)
    return "\n".join(out)


def render_rich(tables: list[Table], console) -> None:
    from rich.table import Table as RichTable

    # The terminal gets the compact view (no per-task columns) with short headers; the files have everything.
    short = {"pass@1 Overall": "pass@1", "ppl (held-out)": "ppl", "info gain (nats)": "info gain"}
    def print_probe(t: Table) -> None:
        """The probe's information gain only (content gain and s_pred are in the files), with short headers."""
        keep = [i for i, c in enumerate(t.probe.columns)
                if c in ("Arm", "step") or c.startswith(("info gain", "Δ info gain"))]
        probe = RichTable(title=f"Probe  [dim]({t.ablation})[/dim]", title_justify="left")
        for i in keep:
            name = t.probe.columns[i].replace("Δ info gain", "Δ")
            probe.add_column(name, overflow="fold", no_wrap=i == 0, justify="left" if i == 0 else "right")
        for row in t.probe.rows:
            probe.add_row(*[row[i] for i in keep])
        console.print(probe)
        console.print("[dim]Probe info gain (nats) on fixed held-out items, paired over items; content gain and "
                      "s_pred: report.md.[/dim]", highlight=False)

    for t in tables:
        if t.probe is not None and t.headline == "probe":
            print_probe(t)
        keep = [i for i, c in enumerate(t.columns) if c in ("Arm", "n", "Overall", "status", *short)
                or c.endswith(" Avg") or c.startswith("Δ")]
        table = RichTable(title=f"{t.title}  [dim]({t.ablation})[/dim]", title_justify="left")
        for i in keep:
            name = t.columns[i]
            if name.startswith("Δ rel"):
                name = "Δ rel %"
            elif name.startswith("Δ"):
                name = "Δ pts"
            table.add_column(short.get(name, name.replace(" Avg", "")), overflow="fold", no_wrap=i == 0,
                             justify="left" if i == 0 or name == "status" else "right")
        for row in t.rows:
            table.add_row(*[row[i] for i in keep])
        console.print(table)
        console.print(f"[dim]{t.footer[1]} {t.footer[2]} Per-task columns and the full notes: report.md.[/dim]",
                      highlight=False)
        if t.probe is not None and t.headline != "probe":
            print_probe(t)


def render_json(tables: list[Table], frame, warnings: list[str], results_dir: Path) -> dict:
    import numpy as np

    def clean(v):
        if isinstance(v, float) and not math.isfinite(v):
            return None
        if isinstance(v, np.generic):
            return clean(v.item())
        if isinstance(v, dict):
            return {(k if isinstance(k, str) else "/".join(map(str, k)) if isinstance(k, tuple) else str(k)): clean(x)
                    for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [clean(x) for x in v]
        return v

    def sub(table: Optional[SubTable]) -> Optional[dict]:
        return None if table is None else {"title": table.title, "columns": table.columns, "rows": table.rows,
                                           "data": clean(table.data), "footer": table.footer}

    runs = [{k: clean(v) for k, v in rec.items()} for rec in frame.to_dict(orient="records")] if len(frame) else []
    return {"results_dir": str(results_dir), "generated": runio.now(), "git_commit": runio.git_commit(),
            "tables": [{"ablation": t.ablation, "title": t.title, "columns": t.columns, "rows": t.rows,
                        "data": clean(t.data),
                        "footer": t.footer, "headline": t.headline, "paired_eval": sub(t.paired_eval),
                        "probe": sub(t.probe), "compute": {"columns": t.compute_columns, "rows": t.compute_rows},
                        "paper": {"columns": t.paper_columns, "rows": t.paper_rows, "caption": t.paper_caption},
                        "runs": t.runs, "plots": t.plots} for t in tables],
            "runs": runs, "warnings": warnings}


# --------------------------------------------------------------------------------------------
# Plots


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_") or "results"


def plot_metrics(ab: Ablation, table: Table, path: Path) -> bool:
    """Each metric against the axis value (mean ± std over seeds, seeds as dots), the base model dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layout = (ab.manifest or {}).get("report") or {}
    axis = layout.get("axis") or (ab.axes[0] if len(ab.axes) == 1 else "arm")
    scale = layout.get("x_scale")
    runs = [r for r in ab.rows if r["kind"] == "run" and r.get("evaluated")]
    if not runs:
        return False
    groups = [c[4:] for c in runs[0] if c.startswith("acc/")]
    wanted = list(layout.get("metrics") or [])
    metrics = [m for m in dict.fromkeys(wanted + ["overall"] + [g for g in ("math", "logic") if g in groups])
               if any(f"acc/{m}" in r for r in runs)]
    panels = [(f"acc/{m}", f"{m} accuracy (%)", 100.0) for m in metrics]
    panels += [(c, label, 1.0) for c, label in (("ppl", "held-out perplexity"), ("info_gain", "held-out info gain (nats)"))
               if any(isinstance(r.get(c), (int, float)) for r in runs)]
    numeric = scale != "category" and all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                          for v in (axis_value(r, axis) for r in runs))
    arms = [a for a in ordered_arms(ab, ab.axes) if any(r["arm"] == a for r in runs)]
    if numeric:
        position = {a: float(axis_value(next(r for r in runs if r["arm"] == a), axis)) for a in arms}
    else:
        position = {a: float(i) for i, a in enumerate(arms)}
    bases = [r for r in ab.rows if r["kind"] == "base" and r.get("evaluated")]

    ncols = min(3, len(panels))
    nrows = math.ceil(len(panels) / ncols)
    fig, axs = plt.subplots(nrows, ncols, figsize=(4.4 * ncols, 3.4 * nrows), squeeze=False)
    for ax in axs.flat[len(panels):]:
        ax.set_visible(False)
    for ax, (col, label, mult) in zip(axs.flat, panels):
        xs, means, stds = [], [], []
        for a in arms:
            vals = [float(r[col]) * mult for r in runs if r["arm"] == a and isinstance(r.get(col), (int, float))]
            if not vals:
                continue
            m, s, n = mean_std(vals)
            xs.append(position[a])
            means.append(m)
            stds.append(s if n > 1 else 0.0)
            ax.scatter([position[a]] * len(vals), vals, s=12, color="tab:blue", alpha=0.4, zorder=3)
        ax.errorbar(xs, means, yerr=stds, marker="o", color="tab:blue", capsize=3, ls="-" if numeric else "none",
                    label="runs: mean ± std over seeds (dots: seeds)")
        for i, b in enumerate(bases):
            if isinstance(b.get(col), (int, float)):
                ax.axhline(float(b[col]) * mult, ls="--", color=f"C{i + 1}", label=b["arm"])
        ax.set_ylabel(label)
        ax.set_xlabel(axis)
        if numeric and scale == "log":
            ax.set_xscale("log")
            ax.minorticks_off()
        if numeric:  # ticks at the values that were run, written plainly (not 2x10^0)
            ax.set_xticks(sorted(set(position.values())))
            ax.set_xticklabels([f"{v:g}" for v in sorted(set(position.values()))])
        else:
            ax.set_xticks([position[a] for a in arms])
            ax.set_xticklabels(arms, rotation=30, ha="right", fontsize=8)
        ax.grid(alpha=0.3)
    axs.flat[0].legend(fontsize=7)
    fig.suptitle(table.title, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


PROBE_CURVES = ("probe/info_gain", "probe/content_gain")  # added to the training plot when the runs logged them


def training_curve_names(ab: Ablation) -> list[str]:
    """The metrics.jsonl keys the training plot shows: the manifest's curves (default: reward and info gain),
    then the probe's, each only when some run logged it."""
    layout = (ab.manifest or {}).get("report") or {}
    curves = list(dict.fromkeys(list(layout.get("curves") or ["reward", "rlp/info_gain"]) + list(PROBE_CURVES)))
    runs = [r for r in ab.rows if r["kind"] == "run" and r.get("_metrics")]
    return [c for c in curves if any(any(_is_number(m.get(c)) for m in r["_metrics"]) for r in runs)]


def plot_training(ab: Ablation, table: Table, path: Path) -> bool:
    """Training curves, one colour per arm (each seed a line): against input tokens (against the step where a
    row lacks them), and the probe's curves against the step, step 0 (before training) included."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [r for r in ab.rows if r["kind"] == "run" and r.get("_metrics")]
    curves = training_curve_names(ab)
    if not curves:
        return False
    arms = [a for a in ordered_arms(ab, ab.axes) if any(r["arm"] == a for r in runs)]
    fig, axs = plt.subplots(1, len(curves), figsize=(4.8 * len(curves), 3.4), squeeze=False)
    for ax, curve in zip(axs[0], curves):
        is_probe = curve.startswith("probe/")
        rows_with = [[m for m in r["_metrics"] if _is_number(m.get(curve))] for r in runs]
        by_tokens = not is_probe and all(_is_number(m.get("input_tokens")) for rows in rows_with for m in rows)
        x_key = "input_tokens" if by_tokens else "step"
        for i, arm in enumerate(arms):
            labelled = False
            for r, rows in zip(runs, rows_with):
                pts = [(m.get(x_key), m[curve]) for m in rows if r["arm"] == arm and _is_number(m.get(x_key))]
                if not pts:
                    continue
                x, y = zip(*pts)
                label = None if labelled else arm
                labelled = True
                if is_probe:  # the same items at every probe step: already paired, so no smoothing
                    ax.plot(x, y, color=f"C{i}", lw=1.4, marker="o", ms=3, label=label)
                    continue
                window = max(1, len(y) // 10)  # a trailing mean over ~10% of the steps: per-step rewards are noisy
                smooth = [sum(y[max(0, j - window + 1):j + 1]) / len(y[max(0, j - window + 1):j + 1]) for j in range(len(y))]
                ax.plot(x, y, color=f"C{i}", alpha=0.2, lw=0.8)
                ax.plot(x, smooth, color=f"C{i}", lw=1.6, label=label)
        ax.set_xlabel("input tokens" if by_tokens else "step")
        ax.set_ylabel(curve + (" (probe: fixed items)" if is_probe else ""))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(f"{table.title}: training curves (faint: per step; solid: trailing mean; dots: probe steps)",
                 fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


# --------------------------------------------------------------------------------------------
# The command


def parse_formats(spec: str) -> list[str]:
    formats = [f.strip().lower() for f in spec.split(",") if f.strip()]
    unknown = [f for f in formats if f not in FORMATS]
    if unknown or not formats:
        raise UserError(f"--format {spec}: unknown format(s) {', '.join(unknown) or '(none)'}. Fix: a comma-separated "
                        f"list of {', '.join(FORMATS)}.")
    return formats


def make_report(results_dir: str | Path = "results", formats: str | list[str] = "md,csv,tex,json", plots: bool = True,
                paper: bool = False, console=None) -> dict:
    """Gather, tabulate, write. Returns {"tables", "frame", "warnings", "written": [paths]}."""
    root = Path(results_dir)
    formats = parse_formats(formats) if isinstance(formats, str) else list(formats)
    frame, ablations, warnings = collect(root)
    paper_frame = load_paper_results() if paper else None
    tables = []
    written: list[Path] = []
    for ab in ablations.values():
        table = build_table(ab, paper, paper_frame)
        if plots:
            slug = _slug(ab.key)
            for kind, fn in (("metrics", plot_metrics), ("training", plot_training)):
                path = root / "plots" / f"{slug}-{kind}.png"
                try:
                    if fn(ab, table, path):
                        table.plots.append(os.path.relpath(path, root))
                        written.append(path)
                except Exception as e:  # a plot must never cost the tables
                    warnings.append(f"{path}: plot not written ({type(e).__name__}: {e})")
        tables.append(table)
    if not tables:
        warnings.append(f"{root}: no run folder (config.yaml + status.json) or eval.json found")
    public = frame.drop(columns=[c for c in frame.columns if c.startswith("_")], errors="ignore")
    if "md" in formats:
        runio.atomic_write_text(root / "report.md", render_markdown(tables, warnings, root))
        written.append(root / "report.md")
    if "csv" in formats:
        runio.atomic_write_text(root / "report.csv", public.to_csv(index=False))
        written.append(root / "report.csv")
    if "tex" in formats:
        runio.atomic_write_text(root / "report.tex", render_latex(tables))
        written.append(root / "report.tex")
    if "json" in formats:
        runio.write_json(root / "report.json", render_json(tables, public, warnings, root))
        written.append(root / "report.json")
    if console is not None:
        for w in warnings:
            console.print(f"[yellow]warning[/yellow]: {w}", highlight=False)
        render_rich(tables, console)
        if written:
            console.print("wrote " + ", ".join(str(p) for p in written), highlight=False)
    return {"tables": tables, "frame": public, "warnings": warnings, "written": written}


def register(app) -> None:
    import typer

    @app.command("report")
    def report_command(
        results_dir: Path = typer.Argument(Path("results"), help="A results folder (searched recursively)."),
        format_: str = typer.Option("md,csv,tex,json", "--format", help="Comma-separated: md, csv, tex, json."),
        plots: bool = typer.Option(True, "--plots/--no-plots", help="Write PNG plots under RESULTS_DIR/plots/."),
        paper: bool = typer.Option(False, "--paper", help="Show the paper's published numbers for the same axis."),
    ):
        """Tables (per-task accuracy, group averages, Overall, change vs the baseline tested problem by problem or
        over seeds; the training probe, paired over items) and plots."""
        from rich.console import Console

        make_report(results_dir, format_, plots, paper, console=Console())
