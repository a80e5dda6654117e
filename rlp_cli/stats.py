"""The statistics behind `rlp report`, as pure functions (no I/O; numpy only, no scipy).

Two kinds of comparison:

- Over seeds (`welch_test`): each run is one number; needs two runs on at least one side.
- Paired over items (`paired_bootstrap`, `paired_t`, `mcnemar`): two arms scored on the same items
  (the same eval problems, the same probe positions with the same sampling seeds). Each item gives
  one difference, so even a single seed per arm can be tested: the noise that pairing removes is the
  item-to-item spread, which is most of it on small suites. With several seeds, `combine_seeds`
  averages each item over the seeds first, then the items are paired across arms.

`minimum_detectable_difference` says how large a true difference a suite of n items can detect.
"""

from __future__ import annotations

import math
from statistics import NormalDist
from typing import Any, Hashable, Iterable, Mapping, Optional, Sequence

import numpy as np

# --------------------------------------------------------------------------------------------
# Student's t distribution and Welch's t-test (over seeds)


def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the incomplete beta function, evaluated with the modified Lentz method."""
    tiny = 1e-300
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1.0)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 500):
        for numerator in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
                          -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):
            d = 1.0 + numerator * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + numerator / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < 1e-15:
            break
    return h


def betainc(a: float, b: float, x: float) -> float:
    """The regularized incomplete beta function I_x(a, b)."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    log_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    if x < (a + 1.0) / (a + b + 2.0):  # the fraction converges fast here; otherwise use the symmetry
        return math.exp(log_front) * _betacf(a, b, x) / a
    return 1.0 - math.exp(log_front) * _betacf(b, a, 1.0 - x) / b


def t_two_sided_p(t: float, df: float) -> float:
    """P(|T| >= |t|) for Student's t with df degrees of freedom."""
    if math.isinf(t):
        return 0.0
    return betainc(df / 2.0, 0.5, df / (df + t * t))


def mean_std(values: list[float]) -> tuple[float, float, int]:
    """Mean, sample standard deviation (ddof=1; nan for one value) and count."""
    n = len(values)
    if n == 0:
        return float("nan"), float("nan"), 0
    m = sum(values) / n
    std = math.sqrt(sum((v - m) ** 2 for v in values) / (n - 1)) if n > 1 else float("nan")
    return m, std, n


def welch_test(x: list[float], y: list[float]) -> Optional[dict]:
    """Two-sided test of mean(x) == mean(y) over seeds; None when neither side has two values.

    Both sides with >= 2 values: Welch's t-test. One side with a single value (e.g. the base model,
    evaluated once): a one-sample t-test of the other side against it."""
    mx, sx, nx = mean_std(x)
    my, sy, ny = mean_std(y)
    if nx == 0 or ny == 0 or (nx < 2 and ny < 2):
        return None
    vx = sx * sx / nx if nx > 1 else 0.0
    vy = sy * sy / ny if ny > 1 else 0.0
    se2 = vx + vy
    diff = mx - my
    if nx > 1 and ny > 1:
        kind = "welch"
        df = se2 * se2 / ((vx * vx / (nx - 1) if vx else 0.0) + (vy * vy / (ny - 1) if vy else 0.0)) if se2 else float("inf")
    else:
        kind = "one-sample"
        df = (nx if nx > 1 else ny) - 1
    if se2 == 0.0:
        return {"t": 0.0 if diff == 0 else math.copysign(math.inf, diff), "df": df,
                "p": 1.0 if diff == 0 else 0.0, "test": kind}
    t = diff / math.sqrt(se2)
    return {"t": t, "df": df, "p": t_two_sided_p(t, df), "test": kind}


# --------------------------------------------------------------------------------------------
# Paired tests (over items)


def _finite(values: Iterable[Any]) -> list[float]:
    """The values that are finite numbers (booleans count as 0/1), as floats; None, nan and inf dropped."""
    out = []
    for v in values:
        if isinstance(v, (bool, np.bool_)):
            out.append(float(v))
        elif isinstance(v, (int, float, np.integer, np.floating)) and math.isfinite(v):
            out.append(float(v))
    return out


def paired_t(diffs: Sequence[float]) -> Optional[dict]:
    """One-sample t-test of mean(diffs) == 0: {mean, stderr, t, df, p, n, test}; None for fewer than 2 diffs.

    stderr is the sample std (ddof=1) over sqrt(n). Non-finite diffs are dropped."""
    values = _finite(diffs)
    mean, std, n = mean_std(values)
    if n < 2:
        return None
    stderr = std / math.sqrt(n)
    if stderr == 0.0:
        t = 0.0 if mean == 0 else math.copysign(math.inf, mean)
        p = 1.0 if mean == 0 else 0.0
    else:
        t = mean / stderr
        p = t_two_sided_p(t, n - 1)
    return {"mean": mean, "stderr": stderr, "t": t, "df": n - 1, "p": p, "n": n, "test": "paired t"}


def paired_bootstrap(diffs: Sequence[float], n_boot: int = 10000, seed: int = 0, confidence: float = 0.95,
                     strata: Optional[Sequence[Hashable]] = None) -> dict:
    """Bootstrap of the mean of paired differences: {mean, ci_low, ci_high, p, n, n_boot, test}.

    Each of n_boot replicates resamples the n differences with replacement (numpy's default_rng(seed):
    the same input and seed give the same answer) and takes their mean.
    - CI: the percentile interval, the (1-confidence)/2 and (1+confidence)/2 quantiles of the replicates.
    - p: two-sided, twice the smaller share of replicates on either side of 0 (ties with 0 count on both
      sides), with the usual +1 so that it is never exactly 0:
          p = min(1, 2 * (1 + min(#{replicate <= 0}, #{replicate >= 0})) / (1 + n_boot))
      It agrees with the percentile CI: p <= 1 - confidence about when the CI excludes 0.
    strata: optional labels (e.g. the task of each problem), one per difference. Then each replicate
    resamples within every stratum and the statistic is the mean over strata of the stratum means (a
    macro average, every stratum weighing the same), and so is `mean`. (When every stratum holds a single
    difference, they are resampled together instead.)
    Fewer than 2 finite differences cannot be tested: p and the CI are nan. Non-finite diffs are dropped.
    """
    labels = list(strata) if strata is not None else [None] * len(diffs)
    if len(labels) != len(diffs):
        raise ValueError(f"strata has {len(labels)} labels for {len(diffs)} differences")
    groups: dict[Hashable, list[float]] = {}
    for d, label in zip(diffs, labels):
        kept = _finite([d])
        if kept:
            groups.setdefault(label, []).append(kept[0])
    n = sum(len(g) for g in groups.values())
    if len(groups) > 1 and all(len(g) == 1 for g in groups.values()):
        # One difference per stratum could not vary within its stratum: resample them together (same mean).
        groups = {None: [g[0] for g in groups.values()]}
    result = {"mean": float("nan"), "ci_low": float("nan"), "ci_high": float("nan"), "p": float("nan"), "n": n,
              "n_boot": n_boot, "confidence": confidence, "test": "paired bootstrap"}
    if n == 0:
        return result
    arrays = [np.asarray(g, dtype=float) for g in groups.values()]
    mean = float(np.mean([a.mean() for a in arrays]))
    result["mean"] = mean
    if n < 2:
        return result
    rng = np.random.default_rng(seed)
    replicates = np.zeros(n_boot)
    chunk = max(1, 2_000_000 // max(1, max(len(a) for a in arrays)))  # bounds the index matrix to ~16 MB
    for a in arrays:
        stratum_means = np.empty(n_boot)
        for start in range(0, n_boot, chunk):
            rows = min(chunk, n_boot - start)
            idx = rng.integers(0, len(a), size=(rows, len(a)))
            stratum_means[start:start + rows] = a[idx].mean(axis=1)
        replicates += stratum_means
    replicates /= len(arrays)
    tail = (1.0 - confidence) / 2.0
    result["ci_low"], result["ci_high"] = (float(q) for q in np.quantile(replicates, [tail, 1.0 - tail]))
    # A tolerance so that float noise around an exact 0 (e.g. symmetric differences) counts as a tie.
    tolerance = 1e-12 * max(1.0, float(np.max(np.abs(replicates))))
    below, above = np.count_nonzero(replicates <= tolerance), np.count_nonzero(replicates >= -tolerance)
    result["p"] = float(min(1.0, 2.0 * (1 + min(below, above)) / (1 + n_boot)))
    return result


def mcnemar(a_correct: Sequence[Any], b_correct: Sequence[Any]) -> dict:
    """Exact two-sided McNemar test on paired binary outcomes: {b01, b10, n_discordant, n, p, test}.

    b01: items that A got wrong and B right; b10: A right and B wrong. Under the null each discordant
    item goes either way with probability 1/2, so p = min(1, 2 * P(X <= min(b01, b10))) with
    X ~ Binomial(b01 + b10, 1/2); p = 1 without discordant items."""
    if len(a_correct) != len(b_correct):
        raise ValueError(f"mcnemar needs paired outcomes: {len(a_correct)} vs {len(b_correct)} items")
    b01 = sum(1 for a, b in zip(a_correct, b_correct) if not a and b)
    b10 = sum(1 for a, b in zip(a_correct, b_correct) if a and not b)
    discordant = b01 + b10
    if discordant == 0:
        p = 1.0
    else:
        tail = sum(math.comb(discordant, k) for k in range(min(b01, b10) + 1)) / 2 ** discordant
        p = min(1.0, 2.0 * tail)
    return {"b01": b01, "b10": b10, "n_discordant": discordant, "n": len(a_correct), "p": p, "test": "exact McNemar"}


# --------------------------------------------------------------------------------------------
# Standard errors and power


def stderr_binary(p: float, n: int) -> float:
    """Standard error of a mean accuracy p over n problems, as lm-evaluation-harness reports it:
    sqrt(p (1 - p) / (n - 1)). This equals suites.mean_stderr (sample std, ddof=1, over sqrt(n)) of
    the n 0/1 outcomes. nan for n < 2."""
    if n is None or n < 2 or p is None or not math.isfinite(p):
        return float("nan")
    return math.sqrt(max(0.0, p * (1.0 - p)) / (n - 1))


def minimum_detectable_difference(sd_of_diffs_or_p: float, n: int, alpha: float = 0.05, power: float = 0.8,
                                  paired: bool = True) -> float:
    """The smallest true difference a test over n items detects with the given power (normal approximation).

        MDD = (z_{1 - alpha/2} + z_{power}) * sd / sqrt(n)

    z_q is the standard normal quantile (z_0.975 = 1.960, z_0.8 = 0.842: the factor is 2.80 at the defaults).
    - paired=True: sd_of_diffs_or_p is the standard deviation of the per-item differences between two
      arms scored on the same n items (sd / sqrt(n) is the stderr of the mean difference).
    - paired=False: sd_of_diffs_or_p is an accuracy p; two arms each score n independent 0/1 problems at
      about that accuracy, so the difference of the two accuracies has sd sqrt(2 p (1 - p)) / sqrt(n):
          MDD = (z_{1 - alpha/2} + z_{power}) * sqrt(2 p (1 - p) / n)
    Same unit as the input (a fraction for accuracies: multiply by 100 for points). nan when n < 1.
    """
    if n is None or n < 1 or sd_of_diffs_or_p is None or not math.isfinite(sd_of_diffs_or_p):
        return float("nan")
    z = NormalDist().inv_cdf(1.0 - alpha / 2.0) + NormalDist().inv_cdf(power)
    if paired:
        return z * abs(sd_of_diffs_or_p) / math.sqrt(n)
    p = sd_of_diffs_or_p
    return z * math.sqrt(max(0.0, 2.0 * p * (1.0 - p)) / n)


# --------------------------------------------------------------------------------------------
# Pairing helpers


def combine_seeds(per_seed: Mapping[Any, Mapping[Hashable, Any]]) -> dict[Hashable, float]:
    """{seed: {item: value}} -> {item: mean over seeds}, for the items with a finite value in every seed.

    Items missing (or null / non-finite) in any seed are left out, so every item averages the same
    seeds; the item order is the first seed's."""
    seeds = list(per_seed.values())
    if not seeds:
        return {}
    combined = {}
    for item in seeds[0]:
        values = [_finite([s.get(item)]) for s in seeds]
        if all(values):
            combined[item] = sum(v[0] for v in values) / len(values)
    return combined


def paired_differences(a: Mapping[Hashable, float], b: Mapping[Hashable, float]) -> tuple[list[Hashable], list[float]]:
    """The items both sides have (in a's order) and a[item] - b[item] for each."""
    items = [i for i in a if i in b]
    return items, [a[i] - b[i] for i in items]
