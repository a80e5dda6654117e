"""The typed records `rlp report` reads a results folder into (collect.py fills them).

    Ablation  one folder of runs: its Manifest (optional) and its Runs
    Run       a training run folder (kind "run") or a stand-alone model evaluation (kind "base"): its status,
              flattened config, metrics.jsonl rows, probe.jsonl, samples.jsonl and EvalResult
    Manifest  what `rlp ablate` planned: arms, seeds, axes, baseline, base models, the report layout
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional


def is_number(v: Any) -> bool:
    """A finite int or float (not a bool, not None, nan or inf)."""
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


# probe.jsonl read: {step: {metric: {item id: value}}}
Probe = dict[int, dict[str, dict[str, float]]]


@dataclass
class EvalResult:
    """One eval.json, with the per-problem results of its eval_samples.jsonl."""
    columns: dict[str, Any]  # acc/<task|group>, pass@1/<task|group>, ppl, info_gain, eval_suite, eval_seed, eval_time_s
    tasks: list[str]
    groups: dict[str, Optional[str]]  # task -> its group
    task_n: dict[str, int]  # task -> problems
    task_stderr: dict[str, float]  # task -> the stderr eval.json reports
    items: dict[tuple, float] = field(default_factory=dict)  # (task, dataset_seed, doc_id) -> greedy correct 1.0 / 0.0


@dataclass
class Thought:
    """One sampled thought of a samples.jsonl record."""
    text: str
    tokens: Optional[int] = None
    closed: Optional[bool] = None
    reward: Optional[float] = None
    s_pred: Optional[float] = None  # log p(target | context, thought), dense rewards
    prediction: Optional[str] = None  # the word written after the thought, sparse (rpt) rewards


@dataclass
class Sample:
    """One samples.jsonl line: a context, its true next token and the G thoughts sampled for it at one step."""
    step: int
    context_tail: str
    target: str
    position: Optional[int]
    s_ema: Optional[float]
    s_empty: Optional[float]
    thoughts: list[Thought]


@dataclass
class Run:
    kind: str  # "run": a training run folder; "base": an evaluation of a model that was not trained here
    folder: str  # relative to the results folder
    name: str
    status: str
    seed: Any = None
    model: Optional[str] = None
    arm: Optional[str] = None
    step: Any = None
    error: Any = None
    total_steps: Any = None
    listed_only: bool = False  # in the manifest, but no folder (yet): status "missing"
    config: dict[str, Any] = field(default_factory=dict)  # config.yaml, flattened (objective.num_rollouts: 4)
    metrics: list[dict] = field(default_factory=list)  # metrics.jsonl rows
    training: dict[str, Any] = field(default_factory=dict)  # final metrics and compute totals (training_columns)
    probe: Probe = field(default_factory=dict)
    samples: list[Sample] = field(default_factory=list)
    eval: Optional[EvalResult] = None
    eval_error: Any = None  # a failed `rlp eval` of a completed run
    axis_values: dict[str, Any] = field(default_factory=dict)
    manifest_order: Optional[int] = None

    @property
    def evaluated(self) -> bool:
        return self.eval is not None

    @property
    def is_base(self) -> bool:
        return self.kind == "base"

    def value(self, key: str) -> Any:
        """A flat column (acc/overall, ppl, train/reward, input_tokens, step, ...), None when absent."""
        if key == "step":
            return self.step
        if self.eval is not None and key in self.eval.columns:
            return self.eval.columns[key]
        return self.training.get(key)

    def has_metric(self, key: str) -> bool:
        return self.eval is not None and key in self.eval.columns

    def record(self) -> dict[str, Any]:
        """The public columns of report.csv and report.json's `runs`, in their order."""
        head = {"kind": self.kind, "folder": self.folder, "name": self.name, "status": self.status}
        if self.is_base:
            error = {"error": self.error} if self.status == "eval failed" else {}
            columns = self.eval.columns if self.eval is not None else {}
            return {**head, **error, "seed": self.seed, "model": self.model, "arm": self.arm,
                    "evaluated": self.evaluated, **columns}
        if self.listed_only:
            return {**head, "seed": self.seed, "evaluated": False, "arm": self.arm}
        return {**head, "step": self.step, "error": self.error, "seed": self.seed, "total_steps": self.total_steps,
                "model": self.model, "evaluated": self.evaluated, **self.training,
                **(self.eval.columns if self.eval is not None else {}), "eval_error": self.eval_error, "arm": self.arm}


@dataclass
class ManifestRun:
    dir: Any
    arm: Optional[str]  # None when the manifest names none
    seed: Any
    axis_values: dict[str, Any]
    config: dict[str, Any]
    order: int  # its place in the manifest's list of runs


@dataclass
class Manifest:
    """manifest.json, written by `rlp ablate`."""
    runs: list[ManifestRun]
    axes: list[str]
    baseline: Optional[str]
    base_models: dict[Any, Any]  # folder -> model
    eval_suite: Any
    title: Optional[str] = None  # report.title, and the report layout below
    axis: Optional[str] = None  # the plots' x axis
    x_scale: Optional[str] = None  # log, category
    metrics: list[str] = field(default_factory=list)  # the first is the headline
    curves: list[str] = field(default_factory=list)  # metrics.jsonl keys to plot
    paper: Any = None  # {"axis", "values": {arm: the paper's value}}

    @classmethod
    def parse(cls, data: dict, path: Path, warnings: list[str]) -> Optional["Manifest"]:
        """None (a warning) when `runs` is not a list; None for an empty manifest (as if there were none)."""
        raw_runs = data.get("runs", [])
        if not isinstance(raw_runs, list):
            warnings.append(f"{path}: 'runs' is not a list; the manifest is ignored")
            return None
        if not data:
            return None
        runs = []
        for entry in raw_runs:
            if not isinstance(entry, dict) or "dir" not in entry:
                continue
            runs.append(ManifestRun(dir=entry["dir"], arm=str(entry["arm"]) if "arm" in entry else None,
                                    seed=entry.get("seed"), axis_values=entry.get("axis_values") or {},
                                    config=entry.get("config") or {}, order=raw_runs.index(entry)))
        layout = data.get("report") if isinstance(data.get("report"), dict) else {}
        bases = data.get("base_models") if isinstance(data.get("base_models"), list) else []
        axes = data.get("axes") if isinstance(data.get("axes"), dict) else {}
        return cls(runs=runs, axes=list(axes.keys()), baseline=data.get("baseline"),
                   base_models={b.get("dir"): b.get("model") for b in bases if isinstance(b, dict)},
                   eval_suite=data.get("eval_suite"), title=layout.get("title"), axis=layout.get("axis"),
                   x_scale=layout.get("x_scale"), metrics=list(layout.get("metrics") or []),
                   curves=list(layout.get("curves") or []), paper=layout.get("paper"))


@dataclass
class Ablation:
    key: str  # the folder relative to the results folder (its own name for the results folder itself)
    folder: Path
    manifest: Optional[Manifest] = None
    runs: list[Run] = field(default_factory=list)  # its runs and base-model evaluations
    axes: list[str] = field(default_factory=list)  # config keys (or `arm`) that tell the arms apart

    @property
    def trained(self) -> list[Run]:
        """The training runs (not the base models)."""
        return [r for r in self.runs if r.kind == "run"]
