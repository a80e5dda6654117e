"""The paper's published numbers (rlp_cli/paper/rlp_paper_results.csv) for the axis an ablation varies."""

from __future__ import annotations

import math
import re
from typing import Optional

from rlp_cli.report.cells import Table, num2, relative_change
from rlp_cli.report.collect import axis_value, fmt_value, infer_axes
from rlp_cli.report.records import Ablation

# Our config keys -> the `axis` column of the paper's results (when the manifest does not say).
PAPER_AXES = {"objective.num_rollouts": "rollouts", "objective.thought_tokens": "completion_length",
              "objective.kl_beta": "kl_beta", "objective.ema_tau": "ema_tau", "data.corpus": "corpus",
              "objective.reward": "reward", "budget.input_tokens": "token_budget"}
PAPER_SOURCE = "Hatamizadeh et al., RLP (arXiv 2510.01265), Qwen3-1.7B-Base unless noted"


def load_paper_results():
    import importlib.resources

    import pandas as pd

    with importlib.resources.files("rlp_cli").joinpath("paper/rlp_paper_results.csv").open() as fh:
        return pd.read_csv(fh, dtype={"value": str, "table": str})


def paper_axis_for(ab: Ablation) -> tuple[Optional[str], dict]:
    link = ab.manifest.paper if ab.manifest else None
    if isinstance(link, dict) and link.get("axis"):
        return str(link["axis"]), {str(k): str(v) for k, v in (link.get("values") or {}).items()}
    keys = set(ab.axes) | set(infer_axes(ab.runs))  # a manifest's `arm` axis hides which config keys differ
    if "objective.name" in keys:  # thought vs next-token training (Table 1), or sparse vs dense rewards (Table 3)
        names = {r.config.get("objective.name") for r in ab.trained}
        return ("objective" if "ntp" in names else "reward"), {}
    for key in PAPER_AXES:
        if key in keys:
            return PAPER_AXES[key], {}
    return None, {}


def _our_arms_by_value(ab: Ablation, arms: list[str], axis: str, values: dict) -> dict[str, list[str]]:
    """The paper's `value` -> our arms that match it ("base" for the base models)."""
    ours_for: dict[str, list[str]] = {}
    for arm in arms:
        value = values.get(arm)
        members = [r for r in ab.runs if r.arm == arm]
        if value is None and members and members[0].is_base:
            value = "base"  # matched to the paper's base rows below, whatever their `value`
        elif value is None and len(ab.axes) == 1 and members:
            value = fmt_value(axis_value(members[0], ab.axes[0]))
            if ab.axes[0] == "arm" or axis == "objective":
                value = {"ntp": "cpt"}.get(value, value)  # the paper calls next-token training CPT
        if value is not None:
            ours_for.setdefault(str(value), []).append(arm)
    return ours_for


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
    ours_for = _our_arms_by_value(ab, arms, axis, values)
    for _, r in rows.iterrows():
        # Each row against its table's base row ("+post" rows against "base+post", as the paper pairs them).
        suffix = "+post" if str(r["variant"]).endswith("+post") else ""
        same_table = frame[frame["table"] == r["table"]]
        base = same_table[same_table["variant"].str.fullmatch("base" + re.escape(suffix)) |
                          (same_table["variant"].str.startswith("base (") if not suffix else False)]
        base_overall = float(base["overall"].iloc[0]) if not base.empty else float("nan")
        rel = relative_change(float(r["overall"]), base_overall)
        rel_text = "—" if math.isnan(rel) or r["variant"].startswith("base") else f"{rel:+.1f}%"
        table.paper_rows.append([str(r["table"]), str(r["variant"]), str(r["value"]), num2(r["math_avg"]),
                                 num2(r["science_avg"]), num2(r["overall"]), rel_text,
                                 ", ".join(ours_for.get("base" if r["variant"] == "base" else str(r["value"]), []))])
    table.paper_caption = (f"Published numbers for the same axis ('{axis}'), {PAPER_SOURCE}: different model, "
                           "benchmarks (math: GSM8K, MATH-500, Minerva, AMC23; science: MMLU, MMLU-Pro, GPQA) and "
                           "scale, so compare directions, not levels. Δ rel: plain ratio of the overall averages "
                           "against the base row of the same paper table.")
