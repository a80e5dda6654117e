"""Reading a results folder into typed records (records.py): run folders, base-model evaluations, manifests.

A file that cannot be read is skipped with a warning (appended to `warnings`); partial results are normal.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path
from typing import Any, Optional

import yaml

from rlp_cli import runio
from rlp_cli.config import flatten
from rlp_cli.errors import UserError
from rlp_cli.report.records import (Ablation, EvalResult, Manifest, Probe, Run, Sample, Thought,
                                    is_number)
from rlp_cli.runfolder import MANIFEST_FILE, RunFolder

IGNORED_AXIS_KEYS = ("name", "seed", "device", "threads")  # and log.*: they do not change what is learnt
PROBE_VERSION = 1
PROBE_METRICS = ("info_gain", "content_gain", "s_pred", "s_ema", "s_empty", "frac_positive")
SKIP_DIRS = {RunFolder.FINAL, RunFolder.CHECKPOINT, "plots", RunFolder.FINAL_TMP, "__pycache__", RunFolder.MLRUNS}


def read_json_file(path: Path, warnings: list[str], what: str) -> Optional[dict]:
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


# --------------------------------------------------------------------------------------------
# The files of one run


def eval_columns(ev: dict, path: Path, warnings: list[str]) -> Optional[EvalResult]:
    """An eval.json's flat metric columns (acc/<task|group>, pass@1/<...>, ppl, info_gain) and per-task facts."""
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
    tasks = [t for t in results if isinstance(results[t], dict)]
    return EvalResult(columns=cols, tasks=tasks, groups={t: results[t].get("group") for t in tasks},
                      task_n={t: results[t]["n"] for t in tasks if isinstance(results[t].get("n"), int)},
                      task_stderr={t: float(results[t]["acc_stderr"]) for t in tasks
                                   if is_number(results[t].get("acc_stderr"))})


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
        vals = [float(r[metric]) for r in rows if is_number(r.get(metric))]
        tail = vals[-max(1, len(vals) // 10):]
        cols[f"train/{metric}"] = sum(tail) / len(tail) if tail else None
    for metric in PROBE_METRICS:  # the last probe's mean over its items
        vals = [float(r[f"probe/{metric}"]) for r in rows if is_number(r.get(f"probe/{metric}"))]
        cols[f"probe/{metric}"] = vals[-1] if vals else None
    for key in ("input_tokens", "generated_tokens", "flops"):
        value = status.get(key, last_value(rows, key))
        cols[key] = value if isinstance(value, (int, float)) else None
    cols["wall_time_s"] = status.get("wall_time_s")
    if cols["wall_time_s"] is None and rows:
        cols["wall_time_s"] = sum(r.get("step_time", 0.0) for r in rows if isinstance(r.get("step_time"), (int, float)))
    return cols


def read_probe(path: Path, warnings: list[str]) -> Probe:
    """probe.jsonl -> {step: {metric: {item id: value}}}, non-finite values left out.

    Each line: {"step", "probe_version": 1, "items": [ids], <metric>: [one value per item], ...} for the
    metrics in PROBE_METRICS (a line may lack some). A torn last line is skipped; a step logged twice (a
    resumed run) keeps its last line; lines of another probe_version are skipped with a warning."""
    by_step: Probe = {}
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
            metrics[metric] = {str(i): float(v) for i, v in zip(items, values) if is_number(v)}
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


def _optional_float(v: Any) -> Optional[float]:
    return float(v) if is_number(v) else None


def read_samples(path: Path) -> list[Sample]:
    """samples.jsonl -> the logged thoughts, by step. Lines that are not such records are left out quietly:
    they only feed the examples of report.html."""
    samples = []
    for rec in runio.read_jsonl(path):
        if not isinstance(rec, dict) or not isinstance(rec.get("thoughts"), list) or not is_number(rec.get("step")):
            continue
        thoughts = [Thought(text=str(t.get("thought", "")),
                            tokens=t.get("tokens") if is_number(t.get("tokens")) else None,
                            closed=t.get("closed") if isinstance(t.get("closed"), bool) else None,
                            reward=_optional_float(t.get("reward")), s_pred=_optional_float(t.get("s_pred")),
                            prediction=None if t.get("prediction") is None else str(t["prediction"]))
                    for t in rec["thoughts"] if isinstance(t, dict)]
        samples.append(Sample(step=int(rec["step"]), context_tail=str(rec.get("context_tail") or ""),
                              target=str(rec.get("target") if rec.get("target") is not None else ""),
                              position=rec.get("position") if is_number(rec.get("position")) else None,
                              s_ema=_optional_float(rec.get("s_ema")), s_empty=_optional_float(rec.get("s_empty")),
                              thoughts=thoughts))
    return sorted(samples, key=lambda s: s.step)


def read_run(folder: Path, root: Path, warnings: list[str]) -> Optional[Run]:
    files = RunFolder(folder)
    try:
        config = yaml.safe_load(files.config.read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        warnings.append(f"{files.config}: skipped, unreadable YAML ({type(e).__name__})")
        return None
    if not isinstance(config, dict) or not isinstance(config.get("objective", {}), dict):
        warnings.append(f"{files.config}: skipped, not an rlp run config")
        return None
    status = read_json_file(files.status_file, warnings, "status file")
    if status is None:
        status = {"status": "unknown"}
    metrics = [r for r in runio.read_jsonl(files.metrics) if isinstance(r, dict)]
    run = Run(kind="run", folder=os.path.relpath(folder, root), name=folder.name,
              status=str(status.get("status", "unknown")), step=status.get("step"), error=status.get("error"),
              seed=config.get("seed"), total_steps=(config.get("budget") or {}).get("steps"),
              model=(config.get("model") or {}).get("name"), config=flatten(config), metrics=metrics,
              probe=read_probe(files.probe, warnings), training=training_columns(metrics, status),
              samples=read_samples(files.samples))
    ev = read_json_file(files.eval_json, warnings, "eval file")
    if ev is not None:
        run.eval = eval_columns(ev, files.eval_json, warnings)
        if run.eval is not None:
            run.eval.items = read_eval_items(files.eval_samples, warnings)
    eval_status = read_json_file(files.eval_status_file, warnings, "eval status file") or {}
    run.eval_error = eval_status.get("error") if eval_status.get("status") == "failed" and not run.evaluated else None
    return run


def read_model_eval(folder: Path, root: Path, warnings: list[str]) -> Optional[Run]:
    """A stand-alone `rlp eval MODEL` result, e.g. the base model of an ablation in base/."""
    files = RunFolder(folder)
    ev = read_json_file(files.eval_json, warnings, "eval file")
    result = None if ev is None else eval_columns(ev, files.eval_json, warnings)
    if result is None:
        # `rlp ablate` records a failed evaluation in eval_status.json: show it instead of hiding the base row.
        status = read_json_file(files.eval_status_file, warnings, "eval status file") or {}
        if status.get("status") != "failed":
            return None
        return Run(kind="base", folder=os.path.relpath(folder, root), name=folder.name, status="eval failed",
                   error=status.get("error"), arm=f"base ({folder.name})")
    model = (ev.get("model") or {}).get("target") or folder.name
    result.items = read_eval_items(files.eval_samples, warnings)
    return Run(kind="base", folder=os.path.relpath(folder, root), name=folder.name, status="completed", model=model,
               arm=f"base ({model})", eval=result)


# --------------------------------------------------------------------------------------------
# The folder


def scan(results_dir: Path, warnings: list[str]) -> dict[str, Ablation]:
    """Find run folders, stand-alone evals (base models) and manifests; group them by parent folder."""
    root = Path(results_dir)
    ablations: dict[str, Ablation] = {}

    def ablation_for(folder: Path) -> Ablation:
        key = os.path.relpath(folder, root) if folder != root else root.resolve().name  # named, never "."
        if key not in ablations:
            raw = read_json_file(folder / MANIFEST_FILE, warnings, "manifest")
            manifest = None if raw is None else Manifest.parse(raw, folder / MANIFEST_FILE, warnings)
            ablations[key] = Ablation(key, folder, manifest)
        return ablations[key]

    for dirpath, dirnames, filenames in os.walk(root):
        folder = Path(dirpath)
        dirnames[:] = sorted(d for d in dirnames if d not in SKIP_DIRS and not d.startswith(".") and not d.endswith(".tmp"))
        if RunFolder.CONFIG in filenames and RunFolder.STATUS in filenames:
            dirnames[:] = []  # a run folder holds no further runs
            run = read_run(folder, root, warnings)
            if run is not None:
                ablation_for(folder.parent if folder != root else folder).runs.append(run)
        elif RunFolder.EVAL in filenames or RunFolder.EVAL_STATUS in filenames:
            run = read_model_eval(folder, root, warnings)
            if run is not None:
                ablation_for(folder.parent if folder != root else folder).runs.append(run)
        elif MANIFEST_FILE in filenames:
            ablation_for(folder)
    for ab in ablations.values():
        if ab.manifest:
            add_manifest_rows(ab, root, warnings)
    return {k: ab for k, ab in sorted(ablations.items()) if ab.runs}


def add_manifest_rows(ab: Ablation, root: Path, warnings: list[str]) -> None:
    """Arms and seeds from the manifest; runs it lists that have no folder yet appear as `missing`."""
    by_dir = {r.name: r for r in ab.trained}
    for entry in ab.manifest.runs:
        run = by_dir.get(entry.dir)
        if run is None:
            run = Run(kind="run", folder=os.path.relpath(ab.folder / entry.dir, root), name=entry.dir,
                      status="missing", seed=entry.seed, listed_only=True, config=flatten(entry.config))
            ab.runs.append(run)
        run.arm = entry.arm if entry.arm is not None else str(run.arm)
        run.axis_values = entry.axis_values
        run.manifest_order = entry.order
    base_dirs = ab.manifest.base_models
    found = set()
    for run in ab.runs:
        if run.is_base and run.name in base_dirs:
            run.arm = f"base ({base_dirs[run.name]})"
            found.add(run.name)
    for d, model in base_dirs.items():
        if d and d not in found and ab.manifest.eval_suite != "none":
            ab.runs.append(Run(kind="base", folder=os.path.relpath(ab.folder / d, root), name=d, status="missing",
                               model=model, arm=f"base ({model})", listed_only=True))
    for run in ab.trained:
        if run.manifest_order is None:
            warnings.append(f"{ab.folder / run.name}: a run folder that {ab.folder / MANIFEST_FILE} does not list "
                            "(retired or foreign); shown under its own name")
            run.arm = run.name


# --------------------------------------------------------------------------------------------
# Arms and axes


def infer_axes(runs: list[Run]) -> list[str]:
    """Config keys that differ between the runs, seed and bookkeeping keys excluded."""
    configs = [r.config for r in runs if r.kind == "run" and r.config]
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


def fmt_value(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:g}"
    if isinstance(v, list):
        return "+".join(map(str, v))
    return str(v)


def assign_arms(ab: Ablation) -> list[str]:
    """Give each run an arm (from the manifest, or from the differing config keys); return the axes."""
    if ab.manifest:
        return list(ab.manifest.axes)
    axes = infer_axes(ab.runs)
    names = short_keys(axes)
    for run in ab.trained:
        values = {k: run.config.get(k) for k in axes}
        run.axis_values = values
        run.arm = ", ".join(f"{names[k]}={fmt_value(v)}" for k, v in values.items()) or "run"
    return axes


def axis_value(run: Run, axis: str) -> Any:
    if axis == "arm":
        return run.arm
    if axis in run.axis_values:
        return run.axis_values[axis]
    return run.config.get(axis)


def collect(results_dir: str | Path) -> tuple[Any, dict[str, Ablation], list[str]]:
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
        for run in ab.runs:
            rec = {"ablation": ab.key, **run.record()}
            for k in axes:
                rec[f"axis:{k}"] = axis_value(run, k) if run.kind == "run" else None
            records.append(rec)
    frame = pd.DataFrame.from_records(records)
    return frame, ablations, warnings
