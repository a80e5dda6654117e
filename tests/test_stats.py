"""rlp_cli.stats: the paired tests, standard errors and power against hand-computed values (no scipy)."""

import math
from statistics import NormalDist

import numpy as np
import pytest

from rlp_cli import stats as S
from rlp_cli.suites import mean_stderr

# --------------------------------------------------------------------------------------------
# McNemar


def test_mcnemar_exact_binomial_by_hand():
    # b01 = 10 (A wrong, B right), b10 = 2 (A right, B wrong), 5 concordant pairs of each kind.
    a = [0] * 10 + [1] * 2 + [1] * 5 + [0] * 5
    b = [1] * 10 + [0] * 2 + [1] * 5 + [0] * 5
    out = S.mcnemar(a, b)
    assert (out["b01"], out["b10"], out["n_discordant"], out["n"]) == (10, 2, 12, 22)
    # 2 * P(X <= 2 | n=12, 1/2) = 2 * (1 + 12 + 66) / 4096
    assert out["p"] == pytest.approx(2 * 79 / 4096) and out["p"] == pytest.approx(0.0386, abs=1e-4)
    assert S.mcnemar(b, a)["p"] == out["p"] and S.mcnemar(b, a)["b01"] == 2  # symmetric, directions swap


def test_mcnemar_edge_cases():
    assert S.mcnemar([1, 0, 1], [1, 0, 1])["p"] == 1.0  # no discordant pair: nothing to test
    assert S.mcnemar([0] * 5, [1] * 5)["p"] == pytest.approx(2 / 32)  # 5 of 5 one way: still > 0.05
    assert S.mcnemar([0, 0, 0, 1, 1, 1], [1, 1, 1, 0, 0, 0])["p"] == 1.0  # balanced: capped at 1
    assert S.mcnemar([True, False], [False, False])["b10"] == 1  # booleans work
    with pytest.raises(ValueError):
        S.mcnemar([1, 0], [1])


# --------------------------------------------------------------------------------------------
# Paired bootstrap


def test_bootstrap_of_constant_differences_is_certain():
    out = S.paired_bootstrap([1.0] * 30, n_boot=2000, seed=0)
    assert out["mean"] == 1.0 and (out["ci_low"], out["ci_high"]) == (pytest.approx(1.0), pytest.approx(1.0))
    assert out["p"] == pytest.approx(2 / 2001) and out["n"] == 30  # as small as n_boot allows
    assert S.paired_bootstrap([-1.0] * 30, n_boot=2000)["p"] == pytest.approx(2 / 2001)
    zero = S.paired_bootstrap([0.0] * 30, n_boot=500)
    assert zero["p"] == 1.0 and zero["mean"] == 0.0


def test_bootstrap_of_symmetric_noise_finds_nothing():
    diffs = [-3.0, -1.0, 1.0, 3.0] * 10  # mean exactly 0
    out = S.paired_bootstrap(diffs, n_boot=4000, seed=1)
    assert out["mean"] == 0.0 and out["p"] > 0.9
    assert out["ci_low"] < 0 < out["ci_high"]
    noise = np.random.default_rng(7).normal(0.0, 1.0, 200)
    noise = np.concatenate([noise, -noise])  # symmetric about 0
    assert S.paired_bootstrap(noise, n_boot=2000)["p"] > 0.5


def test_bootstrap_agrees_with_the_t_interval_on_a_real_shift():
    diffs = np.random.default_rng(3).normal(0.5, 1.0, 400)
    boot = S.paired_bootstrap(diffs, n_boot=10000, seed=0)
    t = S.paired_t(diffs)
    assert boot["mean"] == pytest.approx(t["mean"])
    # The percentile interval of a mean of 400 values is close to mean +- 1.96 * stderr.
    assert boot["ci_low"] == pytest.approx(t["mean"] - 1.96 * t["stderr"], abs=0.1 * t["stderr"] * 1.96)
    assert boot["ci_high"] == pytest.approx(t["mean"] + 1.96 * t["stderr"], abs=0.1 * t["stderr"] * 1.96)
    assert boot["p"] < 0.001 and t["p"] < 1e-10


def test_bootstrap_p_agrees_with_its_interval():
    # One item of 40 better, none worse: a resample misses it with probability (39/40)^40 = 0.36, so about 36% of
    # the replicates sit at 0 and p = 2 * 0.36 = 0.73 (while the interval [0, 0.05] touches 0).
    out = S.paired_bootstrap([1.0] + [0.0] * 39, n_boot=10000, seed=0)
    assert out["p"] == pytest.approx(2 * (39 / 40) ** 40, abs=0.03) and out["ci_low"] == 0.0
    # 12 of 40 better: the interval is well above 0 and p is near its floor.
    strong = S.paired_bootstrap([1.0] * 12 + [0.0] * 28, n_boot=10000, seed=0)
    assert strong["ci_low"] > 0 and strong["p"] < 0.001


def test_bootstrap_is_deterministic_given_the_seed():
    diffs = [1, 0, 0, -1, 1, 1, 0, 1, 0, 0, 1, -1]
    a = S.paired_bootstrap(diffs, n_boot=3000, seed=5)
    assert a == S.paired_bootstrap(diffs, n_boot=3000, seed=5)
    other = S.paired_bootstrap(diffs, n_boot=3000, seed=6)
    assert (other["ci_low"], other["ci_high"], other["p"]) != (a["ci_low"], a["ci_high"], a["p"])


def test_bootstrap_with_strata_is_a_macro_average():
    # Task A: 2 problems, both +1. Task B: 8 problems, all 0. Macro mean 0.5 (micro would be 0.2).
    diffs = [1.0, 1.0] + [0.0] * 8
    out = S.paired_bootstrap(diffs, n_boot=500, strata=["A", "A"] + ["B"] * 8)
    assert out["mean"] == pytest.approx(0.5)
    assert (out["ci_low"], out["ci_high"]) == (pytest.approx(0.5), pytest.approx(0.5))  # no variation within a task
    assert S.paired_bootstrap(diffs, n_boot=500)["mean"] == pytest.approx(0.2)
    with pytest.raises(ValueError):
        S.paired_bootstrap(diffs, strata=["A"])
    singletons = S.paired_bootstrap([1.0, 0.0, -1.0, 1.0], n_boot=500, strata=["A", "B", "C", "D"])
    assert singletons["ci_low"] < singletons["ci_high"]  # not a zero-width interval from unresamplable strata


def test_bootstrap_drops_missing_values_and_refuses_a_single_item():
    out = S.paired_bootstrap([2.0, None, float("nan")], n_boot=100)
    assert out["n"] == 1 and out["mean"] == 2.0 and math.isnan(out["p"]) and math.isnan(out["ci_low"])
    assert S.paired_bootstrap([], n_boot=100)["n"] == 0


# --------------------------------------------------------------------------------------------
# Paired t


def test_paired_t_by_hand():
    # df = 2: the t distribution's two-sided p is 1 - |t| / sqrt(2 + t^2).
    out = S.paired_t([1.0, 2.0, 6.0])
    se = math.sqrt(7) / math.sqrt(3)  # sample sd sqrt(((1-3)^2 + (2-3)^2 + (6-3)^2) / 2) = sqrt(7)
    assert out["mean"] == pytest.approx(3.0) and out["stderr"] == pytest.approx(se) and out["df"] == 2
    assert out["t"] == pytest.approx(3.0 / se)
    assert out["p"] == pytest.approx(1 - (3 / se) / math.sqrt(2 + (3 / se) ** 2))
    # df = 1 is the Cauchy distribution.
    assert S.paired_t([1.0, 3.0])["p"] == pytest.approx(1 - 2 / math.pi * math.atan(2.0))
    assert S.paired_t([0.5]) is None
    assert S.paired_t([0.0, 0.0, 0.0])["p"] == 1.0 and S.paired_t([1.0, 1.0])["p"] == 0.0


# --------------------------------------------------------------------------------------------
# Standard errors and power


def test_stderr_binary_matches_lm_eval_style_mean_stderr():
    assert S.stderr_binary(0.125, 8) == pytest.approx(0.125)  # sqrt(0.125 * 0.875 / 7)
    outcomes = [1.0, 0.0, 0.0, 0.0, 0.0, 1.0, 0.0, 1.0, 0.0, 0.0]
    assert S.stderr_binary(0.3, 10) == pytest.approx(mean_stderr(outcomes))
    assert S.stderr_binary(0.0, 8) == 0.0 and math.isnan(S.stderr_binary(1.0, 1))


def test_minimum_detectable_difference_by_hand():
    factor = 1.959964 + 0.841621  # z_0.975 + z_0.8
    assert S.minimum_detectable_difference(1.0, 100) == pytest.approx(factor * 0.1, rel=1e-5)
    assert S.minimum_detectable_difference(0.5, 100, paired=False) == pytest.approx(factor * math.sqrt(0.005), rel=1e-5)
    # 80 problems at 5%: two unpaired arms must differ by about 9.6 points.
    assert 100 * S.minimum_detectable_difference(0.05, 80, paired=False) == pytest.approx(9.65, abs=0.01)
    # At exactly that true difference, a two-sided 5% z-test has 80% power.
    sd, n = 0.7, 50
    mdd = S.minimum_detectable_difference(sd, n)
    power = 1 - NormalDist().cdf(1.959964 - mdd / (sd / math.sqrt(n)))
    assert power == pytest.approx(0.8, abs=1e-4)
    assert S.minimum_detectable_difference(1.0, 100, alpha=0.01, power=0.9) > S.minimum_detectable_difference(1.0, 100)
    assert math.isnan(S.minimum_detectable_difference(1.0, 0))


# --------------------------------------------------------------------------------------------
# Pairing across seeds


def test_combine_seeds_keeps_items_present_in_every_seed():
    per_seed = {0: {"a": 1.0, "b": 0.0, "c": None, "e": 1.0},
                1: {"a": 0.0, "b": 0.0, "c": 1.0, "d": 1.0, "e": float("nan")}}
    assert S.combine_seeds(per_seed) == {"a": 0.5, "b": 0.0}
    assert S.combine_seeds({3: {"x": True}}) == {"x": 1.0}
    assert S.combine_seeds({}) == {}
    items, diffs = S.paired_differences({"a": 0.5, "b": 0.0, "z": 1.0}, {"b": 1.0, "a": 0.25})
    assert items == ["a", "b"] and diffs == [0.25, -1.0]


def test_report_still_exposes_the_moved_helpers():
    from rlp_cli import report

    assert report.welch_test is S.welch_test and report.t_two_sided_p is S.t_two_sided_p
    assert report.mean_std is S.mean_std and report.betainc is S.betainc
