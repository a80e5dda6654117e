"""The report's tables as text cells (what every renderer draws), the noise marks, and number formatting."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

from rlp_cli.report.records import is_number
from rlp_cli.stats import mean_std

NOISE_P = 0.05

# The marks after a change, explained once in every rendering.
MARKS_LEGEND = (("~", f"p > {NOISE_P}: the difference is within noise (not distinguishable from it)"),
                ("?", "not testable (a single run on each side and no paired items)"),
                ("no mark", f"p <= {NOISE_P}: a difference beyond noise"),
                ("ref", "the baseline itself"))


def noise_marker(test: Optional[dict]) -> str:
    """The report's marks: `?` not testable (no test, or a p that is None / nan), `~` p > NOISE_P, none otherwise."""
    if test is None or not is_number(test.get("p")):
        return "?"
    return "~" if test["p"] > NOISE_P else ""


def relative_change(value: float, baseline: float) -> float:
    """value / baseline - 1, in percent (nan when the baseline is 0)."""
    if baseline == 0 or math.isnan(baseline) or math.isnan(value):
        return float("nan")
    return (value / baseline - 1.0) * 100.0


def cell(values: list[float], scale: float = 1.0, digits: int = 1) -> str:
    """mean (± sample std over seeds when there are several), or — without values."""
    m, s, n = mean_std(values)
    if n == 0:
        return "—"
    text = f"{m * scale:.{digits}f}"
    return text + (f" ± {s * scale:.{digits}f}" if n > 1 else "")


def signed(value: Optional[float], scale: float = 1.0, digits: int = 1) -> str:
    return "—" if value is None or not math.isfinite(value) else f"{value * scale:+.{digits}f}"


def p_text(p: Optional[float]) -> str:
    if p is None or not math.isfinite(p):
        return "—"
    return "<0.001" if p < 0.001 else f"{p:.3f}"


def num1(v: Optional[float]) -> str:
    return "—" if v is None or not math.isfinite(v) else f"{v:.1f}"


def num2(v) -> str:
    """Two decimals of anything float() reads (the paper's csv cells), else —."""
    try:
        f = float(v)
    except (TypeError, ValueError):
        return "—"
    return "—" if math.isnan(f) else f"{f:.2f}"


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
    """An ablation's tables, ready to render."""
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
    plots: list[str] = field(default_factory=list)  # relative to the results folder
    paired_eval: Optional[SubTable] = None  # each arm against the baseline, problem by problem
    probe: Optional[SubTable] = None  # the training-time probe, when the runs wrote probe.jsonl
    headline: str = "eval"  # "probe" when no run is evaluated yet but the runs have a probe
