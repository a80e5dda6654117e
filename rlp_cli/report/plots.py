"""plots/<ablation>-metrics.png (each eval metric against the axis) and plots/<ablation>-training.png (curves)."""

from __future__ import annotations

import math
import re
from pathlib import Path

from rlp_cli.report.cells import Table
from rlp_cli.report.collect import axis_value
from rlp_cli.report.records import Ablation, is_number
from rlp_cli.report.tables import ordered_arms
from rlp_cli.stats import mean_std

PROBE_CURVES = ("probe/info_gain", "probe/content_gain")  # added to the training plot when the runs logged them


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_") or "results"


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_metrics(ab: Ablation, table: Table, path: Path) -> bool:
    """Each metric against the axis value (mean ± std over seeds, seeds as dots), the base model dashed."""
    plt = _pyplot()
    layout = ab.manifest
    axis = (layout.axis if layout else None) or (ab.axes[0] if len(ab.axes) == 1 else "arm")
    scale = layout.x_scale if layout else None
    runs = [r for r in ab.trained if r.evaluated]
    if not runs:
        return False
    groups = [c[4:] for c in runs[0].eval.columns if c.startswith("acc/")]
    wanted = list(layout.metrics if layout else [])
    metrics = [m for m in dict.fromkeys(wanted + ["overall"] + [g for g in ("math", "logic") if g in groups])
               if any(r.has_metric(f"acc/{m}") for r in runs)]
    panels = [(f"acc/{m}", f"{m} accuracy (%)", 100.0) for m in metrics]
    panels += [(c, label, 1.0) for c, label in (("ppl", "held-out perplexity"), ("info_gain", "held-out info gain (nats)"))
               if any(isinstance(r.value(c), (int, float)) for r in runs)]
    numeric = scale != "category" and all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                          for v in (axis_value(r, axis) for r in runs))
    arms = [a for a in ordered_arms(ab, ab.axes) if any(r.arm == a for r in runs)]
    if numeric:
        position = {a: float(axis_value(next(r for r in runs if r.arm == a), axis)) for a in arms}
    else:
        position = {a: float(i) for i, a in enumerate(arms)}
    bases = [r for r in ab.runs if r.is_base and r.evaluated]

    ncols = min(3, len(panels))
    nrows = math.ceil(len(panels) / ncols)
    fig, axs = plt.subplots(nrows, ncols, figsize=(4.4 * ncols, 3.4 * nrows), squeeze=False)
    for ax in axs.flat[len(panels):]:
        ax.set_visible(False)
    for ax, (col, label, mult) in zip(axs.flat, panels):
        xs, means, stds = [], [], []
        for a in arms:
            vals = [float(r.value(col)) * mult for r in runs if r.arm == a and isinstance(r.value(col), (int, float))]
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
            if isinstance(b.value(col), (int, float)):
                ax.axhline(float(b.value(col)) * mult, ls="--", color=f"C{i + 1}", label=b.arm)
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


def training_curve_names(ab: Ablation) -> list[str]:
    """The metrics.jsonl keys the training plot shows: the manifest's curves (default: reward and info gain),
    then the probe's, each only when some run logged it."""
    wanted = (ab.manifest.curves if ab.manifest else None) or ["reward", "rlp/info_gain"]
    curves = list(dict.fromkeys(list(wanted) + list(PROBE_CURVES)))
    runs = [r for r in ab.trained if r.metrics]
    return [c for c in curves if any(any(is_number(m.get(c)) for m in r.metrics) for r in runs)]


def plot_training(ab: Ablation, table: Table, path: Path) -> bool:
    """Training curves, one colour per arm (each seed a line): against input tokens (against the step where a
    row lacks them), and the probe's curves against the step, step 0 (before training) included."""
    plt = _pyplot()
    runs = [r for r in ab.trained if r.metrics]
    curves = training_curve_names(ab)
    if not curves:
        return False
    arms = [a for a in ordered_arms(ab, ab.axes) if any(r.arm == a for r in runs)]
    fig, axs = plt.subplots(1, len(curves), figsize=(4.8 * len(curves), 3.4), squeeze=False)
    for ax, curve in zip(axs[0], curves):
        is_probe = curve.startswith("probe/")
        rows_with = [[m for m in r.metrics if is_number(m.get(curve))] for r in runs]
        by_tokens = not is_probe and all(is_number(m.get("input_tokens")) for rows in rows_with for m in rows)
        x_key = "input_tokens" if by_tokens else "step"
        for i, arm in enumerate(arms):
            labelled = False
            for r, rows in zip(runs, rows_with):
                pts = [(m.get(x_key), m[curve]) for m in rows if r.arm == arm and is_number(m.get(x_key))]
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
