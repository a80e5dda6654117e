"""`rlp report`: the statistics against hand computations, and a report over a synthetic results folder."""

import json
import math

import numpy as np
import pandas as pd
import pytest
import yaml
from typer.testing import CliRunner

from rlp_cli import report as R
from rlp_cli.config import load_config
from rlp_cli.errors import UserError

# --------------------------------------------------------------------------------------------
# Statistics


@pytest.mark.parametrize("t", [0.0, 0.3, 1.0, 2.5, 12.706, 40.0])
def test_t_distribution_matches_closed_forms(t):
    # df = 1 is the Cauchy distribution; df = 2 has a closed-form CDF too.
    assert R.t_two_sided_p(t, 1) == pytest.approx(1 - 2 / math.pi * math.atan(abs(t)), abs=1e-10)
    assert R.t_two_sided_p(t, 2) == pytest.approx(1 - abs(t) / math.sqrt(2 + t * t), abs=1e-10)


def _t_p_by_integration(t, df):
    """Two-sided p by integrating Student's density numerically: an independent check of the beta route."""
    c = math.gamma((df + 1) / 2) / (math.sqrt(df * math.pi) * math.gamma(df / 2))
    u = np.linspace(0, math.pi / 2, 200_001)[:-1]  # x = |t| + tan(u) maps [|t|, inf) to [0, pi/2)
    x = abs(t) + np.tan(u)
    dens = c * (1 + x * x / df) ** (-(df + 1) / 2) / np.cos(u) ** 2
    return 2 * float(np.sum((dens[1:] + dens[:-1]) / 2 * np.diff(u)))


def test_welch_test_against_hand_computation():
    x, y = [1.0, 2.0, 3.0], [4.0, 5.0, 6.0, 7.0]
    # by hand: means 2 and 5.5, sample variances 1 and 5/3; se^2 = 1/3 + (5/3)/4 = 0.75
    t_hand = (2 - 5.5) / math.sqrt(0.75)
    df_hand = 0.75 ** 2 / ((1 / 3) ** 2 / 2 + (5 / 12) ** 2 / 3)
    test = R.welch_test(x, y)
    assert test["test"] == "welch"
    assert test["t"] == pytest.approx(t_hand) and test["df"] == pytest.approx(df_hand)
    assert test["p"] == pytest.approx(_t_p_by_integration(t_hand, df_hand), rel=1e-4)
    assert 0.005 < test["p"] < 0.05 and R.noise_marker(test) == ""


def test_one_sample_test_when_the_baseline_is_a_single_run():
    seeds, base = [0.40, 0.42, 0.44], [0.30]
    test = R.welch_test(seeds, base)
    t_hand = (0.42 - 0.30) / (0.02 / math.sqrt(3))
    assert test["test"] == "one-sample" and test["df"] == 2
    assert test["t"] == pytest.approx(t_hand)
    assert test["p"] == pytest.approx(1 - t_hand / math.sqrt(2 + t_hand ** 2))
    noisy = R.welch_test([0.29, 0.31, 0.33], base)
    assert noisy["p"] > 0.05 and R.noise_marker(noisy) == "~"
    assert R.welch_test([0.5], [0.3]) is None and R.noise_marker(None) == "?"
    assert R.welch_test([0.3, 0.3], [0.3])["p"] == 1.0  # no variance, no difference


def test_mean_std_and_relative_change_by_hand():
    m, s, n = R.mean_std([0.40, 0.42, 0.44])
    assert (m, n) == (pytest.approx(0.42), 3) and s == pytest.approx(0.02)  # ddof = 1
    assert math.isnan(R.mean_std([0.5])[1])
    assert R.relative_change(61.32, 42.81) == pytest.approx(43.24, abs=0.01)  # the paper's Table 2 overall
    assert math.isnan(R.relative_change(0.5, 0.0))


# --------------------------------------------------------------------------------------------
# A synthetic results folder


TASKS = {"chain_sum": "math", "gcd": "math", "syllogism": "logic"}


def _eval_json(accs, suite="quick", ppl=9.0, info_gain=-0.5):
    results = {t: {"acc": a, "acc_stderr": 0.1, "pass@1": a / 2, "n": 8, "group": TASKS[t]} for t, a in accs.items()}
    groups = {}
    for g in ("math", "logic", "overall"):
        tasks = [t for t in accs if g == "overall" or TASKS[t] == g]
        groups[g] = {"acc": sum(accs[t] for t in tasks) / len(tasks),
                     "pass@1": sum(accs[t] / 2 for t in tasks) / len(tasks), "n_tasks": len(tasks)}
    return {"results": results, "groups": groups, "intrinsic": {"heldout_perplexity": ppl, "heldout_info_gain": info_gain},
            "suite": {"name": suite, "version": 1, "seed": 0}, "model": {"target": "tiny"},
            "total_evaluation_time_seconds": 1.0}


def _run(folder, config, status="completed", accs=None, steps=5, **status_extra):
    folder.mkdir(parents=True)
    (folder / "config.yaml").write_text(yaml.safe_dump(config))
    (folder / "status.json").write_text(json.dumps({"status": status, "step": steps, **status_extra}))
    rows = [{"step": i + 1, "reward": 0.1 * i, "rlp/info_gain": 0.05 * i, "input_tokens": 100 * (i + 1),
             "generated_tokens": 50 * (i + 1), "flops": 1e9 * (i + 1), "step_time": 0.5} for i in range(steps)]
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 99, "rew')  # torn
    if accs is not None:
        (folder / "eval.json").write_text(json.dumps(_eval_json(accs)))


def _config(seed=0, **objective):
    cfg = load_config("tiny").to_dict()
    cfg["seed"] = seed
    cfg["objective"].update(objective)
    return cfg


@pytest.fixture
def results(tmp_path):
    """Ablation `rollouts` (manifest, 3 seeds x 2 arms, a base model, a failed, a running and a missing run, a
    half-written eval.json, a foreign folder) and ablation `bare` (no manifest: axes inferred)."""
    root = tmp_path / "results"
    ab = root / "rollouts"
    # arm g4: overall 0.40, 0.42, 0.44 over seeds; arm g2: 0.29, 0.31, 0.33 (seed 2 failed / running / missing)
    g4 = [{"chain_sum": 0.5, "gcd": 0.4, "syllogism": o * 3 - 0.9} for o in (0.40, 0.42, 0.44)]
    g2 = [{"chain_sum": 0.3, "gcd": 0.3, "syllogism": o * 3 - 0.6} for o in (0.29, 0.31, 0.33)]
    runs = []
    for seed in range(3):
        name = f"g4_s{seed}-aaaa000{seed}"
        _run(ab / name, _config(seed, num_rollouts=4), accs=g4[seed])
        runs.append({"dir": name, "arm": "g4", "seed": seed, "axis_values": {"objective.num_rollouts": 4}})
    for seed in range(2):
        name = f"g2_s{seed}-bbbb000{seed}"
        _run(ab / name, _config(seed, num_rollouts=2), accs=g2[seed])
        runs.append({"dir": name, "arm": "g2", "seed": seed, "axis_values": {"objective.num_rollouts": 2}})
    _run(ab / "g2_s2-bbbb0002", _config(2, num_rollouts=2), accs=g2[2])
    runs.append({"dir": "g2_s2-bbbb0002", "arm": "g2", "seed": 2, "axis_values": {"objective.num_rollouts": 2}})
    _run(ab / "g8_s0-cccc0000", _config(0, num_rollouts=8), status="failed", steps=2,
         error="RuntimeError: out of memory")
    _run(ab / "g8_s1-cccc0001", _config(1, num_rollouts=8), status="running", steps=3)
    (ab / "g8_s1-cccc0001" / "eval.json").write_text('{"results": {"chain_sum": {"acc": 0.')  # half-written
    runs += [{"dir": "g8_s0-cccc0000", "arm": "g8", "seed": 0, "axis_values": {"objective.num_rollouts": 8}},
             {"dir": "g8_s1-cccc0001", "arm": "g8", "seed": 1, "axis_values": {"objective.num_rollouts": 8}},
             {"dir": "g8_s2-cccc0002", "arm": "g8", "seed": 2, "axis_values": {"objective.num_rollouts": 8}}]
    (ab / "base").mkdir()
    (ab / "base" / "eval.json").write_text(json.dumps(_eval_json({"chain_sum": 0.3, "gcd": 0.3, "syllogism": 0.3},
                                                                  ppl=12.0)))
    (ab / "manifest.json").write_text(json.dumps({
        "ablation": "rollouts", "axes": {"objective.num_rollouts": [2, 4, 8]}, "seeds": [0, 1, 2], "baseline": "base",
        "report": {"title": "Rollouts G", "axis": "objective.num_rollouts", "x_scale": "log",
                   "metrics": ["overall"], "curves": ["reward", "rlp/info_gain"],
                   "paper": {"axis": "rollouts", "values": {"g2": "2", "g4": "4", "g8": "8"}}},
        "base_models": [{"model": "tiny", "dir": "base"}], "runs": runs}))
    foreign = ab / "notes"
    foreign.mkdir()
    (foreign / "config.yaml").write_text("- just\n- a list\n")
    (foreign / "status.json").write_text("{}")
    (ab / "README.txt").write_text("not a run")

    bare = root / "nested" / "bare"
    _run(bare / "a", _config(0, thought_tokens=8), accs={"chain_sum": 0.2, "gcd": 0.1, "syllogism": 0.6})
    _run(bare / "b", _config(0, thought_tokens=16), accs={"chain_sum": 0.4, "gcd": 0.1, "syllogism": 0.7})
    (bare / "base").mkdir()  # the base-model evaluation failed: `rlp ablate` leaves only eval_status.json
    (bare / "base" / "eval_status.json").write_text(json.dumps({"status": "failed", "error": "exit code 1"}))
    return root


def _table(out, ablation):
    return next(t for t in out["tables"] if t.ablation == ablation)


def _row(table, arm):
    return dict(zip(table.columns, next(r for r in table.rows if r[0] == arm)))


def test_report_over_a_synthetic_results_folder(results):
    out = R.make_report(results, paper=True)
    for name in ("report.md", "report.csv", "report.tex", "report.json"):
        assert (results / name).stat().st_size > 0, name
    pngs = sorted((results / "plots").glob("*.png"))
    assert {p.name for p in pngs} == {"rollouts-metrics.png", "rollouts-training.png", "nested_bare-metrics.png",
                                      "nested_bare-training.png"}
    for p in pngs:
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and p.stat().st_size > 5000

    t = _table(out, "rollouts")
    assert [r[0] for r in t.rows] == ["base (tiny)", "g4", "g2", "g8"]  # base first, then the manifest's order
    g4, g2, g8, base = _row(t, "g4"), _row(t, "g2"), _row(t, "g8"), _row(t, "base (tiny)")
    delta, rel = [c for c in t.columns if c.startswith("Δ")]
    assert "vs base (tiny)" in delta
    assert g4["Overall"] == "42.0 ± 2.0" and g4["n"] == "3"
    assert g4["Math Avg"] == "45.0 ± 0.0" and g4["chain_sum"] == "50.0 ± 0.0"  # the same in every seed
    assert g4[delta] == "+12.0" and g4[rel] == "+40.0%"  # one-sample t-test p = 0.009: a real difference
    assert g2["Overall"] == "31.0 ± 2.0" and g2[delta] == "+1.0~" and g2[rel] == "+3.3%~"  # within seed noise
    assert base[delta] == "ref" and base["ppl (held-out)"] == "12.00"
    assert g8["Overall"] == "—" and g8["n"] == "0"
    assert "1 failed" in g8["status"] and "1 running (step 3/4)" in g8["status"] and "1 missing" in g8["status"]
    data = next(d for d in t.data if d["arm"] == "g4")
    assert data["p_value"] == pytest.approx(1 - (12 / (2 / 3 ** 0.5)) / math.sqrt(2 + (12 / (2 / 3 ** 0.5)) ** 2))
    assert any(r[2] == "4" and r[-1] == "g4" for r in t.paper_rows)  # the paper's G = 4 row beside our g4 arm
    assert any("Welch" in f for f in t.footer) and any("macro average" in f for f in t.footer)

    bare = _table(out, "nested/bare")  # inferred axis, sorted numerically; the failed base model stays visible
    assert [r[0] for r in bare.rows] == ["base (base)", "thought_tokens=8", "thought_tokens=16"]
    assert _row(bare, "base (base)")["status"] == "eval failed" and _row(bare, "base (base)")["Overall"] == "—"
    b = _row(bare, "thought_tokens=16")
    assert b["Overall"] == "40.0" and b[[c for c in bare.columns if c.startswith("Δ")][0]] == "+10.0?"
    assert any("base model is not evaluated yet; changes are against thought_tokens=8" in f for f in bare.footer)

    joined = "\n".join(out["warnings"])
    assert "g8_s1-cccc0001/eval.json" in joined and "notes/config.yaml" in joined  # skipped, not crashed
    md = (results / "report.md").read_text()
    assert "RuntimeError: out of memory" in md and "42.0 ± 2.0" in md and "![rollouts-metrics]" in md
    assert "\\pm" in (results / "report.tex").read_text()
    frame = pd.read_csv(results / "report.csv")
    assert len(frame) == 3 + 3 + 1 + 3 + 2 + 1  # g4, g2, base, g8 (failed, running, missing), bare and its base
    assert set(frame["status"]) == {"completed", "failed", "running", "missing", "eval failed"}
    assert frame.loc[frame["name"] == "g4_s1-aaaa0001", "acc/overall"].iloc[0] == pytest.approx(0.42)
    assert frame.loc[frame["name"] == "g4_s1-aaaa0001", "input_tokens"].iloc[0] == 500  # torn last line skipped
    report = json.loads((results / "report.json").read_text())
    assert {t["ablation"] for t in report["tables"]} == {"rollouts", "nested/bare"}


def test_report_command_formats_and_errors(results):
    from rlp_cli.cli import app

    res = CliRunner().invoke(app, ["report", str(results), "--format", "md,json", "--no-plots"])
    assert res.exit_code == 0, res.output + repr(res.exception)
    assert (results / "report.md").exists() and (results / "report.json").exists()
    assert not (results / "report.csv").exists() and not (results / "plots").exists()
    assert "Rollouts G" in res.output
    with pytest.raises(UserError, match="unknown format"):
        R.make_report(results, "md,pdf")
    with pytest.raises(UserError, match="no such results folder"):
        R.make_report(results / "nope")


def test_an_empty_or_foreign_folder_reports_without_crashing(tmp_path):
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "eval.json").write_text('{"something": "else"}')
    out = R.make_report(tmp_path, plots=True)
    assert out["tables"] == [] and any("not an `rlp eval` file" in w for w in out["warnings"])
    assert (tmp_path / "report.md").exists()
