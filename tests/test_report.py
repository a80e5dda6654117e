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


def _eval_json(accs, suite="quick", ppl=9.0, info_gain=-0.5, n=8):
    results = {t: {"acc": a, "acc_stderr": 0.1, "pass@1": a / 2, "n": n, "group": TASKS[t]} for t, a in accs.items()}
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
    assert g4["Math Avg"] == "45.0 ± 0.0"  # group cells: mean ± std over seeds (the same in every seed)
    assert g4["chain_sum"] == "50.0 ± 18.9"  # task cells: accuracy ± lm-eval stderr, sqrt(0.5 * 0.5 / (8 - 1))
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


# --------------------------------------------------------------------------------------------
# One seed, made testable by pairing: eval problems and probe items


PROBLEMS = 20  # per task


def _eval_samples(folder, solved):
    """eval_samples.jsonl with one greedy record per problem (correct when its doc_id is in solved[task]), a sampled
    record that must be ignored, and a torn last line; plus the matching eval.json."""
    records = []
    for task, correct in solved.items():
        for doc in range(PROBLEMS):
            records.append({"task": task, "group": TASKS[task], "doc_id": doc, "dataset_seed": 2_000_000_000,
                            "sample": "greedy", "correct": doc in correct, "answer": "x"})
            records.append({"task": task, "group": TASKS[task], "doc_id": doc, "dataset_seed": 2_000_000_000,
                            "sample": 0, "correct": True})
    (folder / "eval_samples.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records) + '{"task": "cha')
    accs = {task: len(correct) / PROBLEMS for task, correct in solved.items()}
    (folder / "eval.json").write_text(json.dumps(_eval_json(accs, n=PROBLEMS)))


ITEMS = [f"item{k:02d}" for k in range(10)]


def _probe_rows(gain_shift, seed_shift=0.0):
    """probe.jsonl rows at steps 0 and 8. info_gain rises by gain_shift on every item (plus a +-0.01 wiggle);
    content_gain has a null item."""
    step0 = {"info_gain": [-5 + 0.1 * k + seed_shift for k in range(10)],
             "content_gain": [0.2 * k for k in range(10)], "s_pred": [-3.0 - 0.1 * k for k in range(10)]}
    wiggle = [0.01 * (-1) ** k for k in range(10)]
    final = {"info_gain": [v + gain_shift + w for v, w in zip(step0["info_gain"], wiggle)],
             "content_gain": [None] + [v + gain_shift for v in step0["content_gain"][1:]],
             "s_pred": [v + w for v, w in zip(step0["s_pred"], wiggle)]}
    extra = {"s_ema": [-3.5] * 10, "s_empty": [-3.2] * 10, "frac_positive": [0.5] * 10}
    return [{"step": step, "probe_version": 1, "items": ITEMS, **values, **extra}
            for step, values in ((0, step0), (8, final))]


def _probe_run(folder, config, gain_shift, seed_shift=0.0, steps=8):
    _run(folder, config, steps=steps)
    rows = _probe_rows(gain_shift, seed_shift)
    (folder / "probe.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 16, "ite')
    # metrics.jsonl: a probe-only row at step 0 first, then the training rows, the last with the probe's means
    train = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()[:-1]]
    means = {f"probe/{k}": float(np.mean([v for v in rows[1][k] if v is not None])) for k in R.PROBE_METRICS}
    train[-1].update(means)
    first = {"step": 0, **{f"probe/{k}": float(np.mean(rows[0][k])) for k in R.PROBE_METRICS}}
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in [first] + train))


@pytest.fixture
def paired_results(tmp_path):
    """Ablation `sd` (one seed, baseline arm `sparse`, a base model, evals with per-problem samples and a probe) and
    ablation `probe-only` (two seeds per arm, a probe, no evaluation yet)."""
    root = tmp_path / "results"
    ab = root / "sd"
    runs = []
    for arm, gain in (("sparse", 0.0), ("dense", 0.5)):
        name = f"{arm}_s0-0000"
        _probe_run(ab / name, _config(0, num_rollouts=4 if arm == "sparse" else 8), gain)
        runs.append({"dir": name, "arm": arm, "seed": 0, "axis_values": {"arm": arm}})
    # chain_sum: dense solves 10 problems sparse misses (b01 = 10, b10 = 0); syllogism: one each way (1/1).
    _eval_samples(ab / "sparse_s0-0000", {"chain_sum": {0, 1}, "syllogism": {0, 1, 2}})
    _eval_samples(ab / "dense_s0-0000", {"chain_sum": set(range(12)), "syllogism": {1, 2, 3}})
    (ab / "base").mkdir()
    _eval_samples(ab / "base", {"chain_sum": {0}, "syllogism": set()})
    (ab / "manifest.json").write_text(json.dumps({
        "ablation": "sd", "axes": {"arm": ["sparse", "dense"]}, "seeds": [0], "baseline": "sparse",
        "report": {"title": "Sparse vs dense", "axis": "arm", "metrics": ["overall"]},
        "base_models": [{"model": "tiny", "dir": "base"}], "runs": runs}))

    only = root / "probe-only"
    runs = []
    for arm, gain in (("a", 0.0), ("b", 0.3)):
        for seed in (0, 1):
            name = f"{arm}_s{seed}-1111"
            # seed 1 of arm b gains 0.1 more than seed 0: a seed spread of 0.0707 in its Δ
            _probe_run(only / name, _config(seed, thought_tokens=8 if arm == "a" else 16), gain + 0.1 * seed * (arm == "b"),
                       seed_shift=0.05 * seed)
            runs.append({"dir": name, "arm": arm, "seed": seed, "axis_values": {"arm": arm}})
    (only / "manifest.json").write_text(json.dumps({
        "ablation": "probe-only", "axes": {"arm": ["a", "b"]}, "seeds": [0, 1], "baseline": "a",
        "eval_suite": "none", "report": {"title": "Probe only", "axis": "arm"}, "base_models": [], "runs": runs}))
    return root


def test_one_seed_eval_is_tested_problem_by_problem(paired_results):
    out = R.make_report(paired_results, plots=False)
    t = _table(out, "sd")
    delta = next(c for c in t.columns if c.startswith("Δ overall"))
    dense, base = _row(t, "dense"), _row(t, "base (tiny)")
    # Δ overall = macro mean of (10/20 - 0/20) and (0/20): +25 points. Welch could not test one seed each ("?");
    # the stratified paired bootstrap over the 40 problems can: p < 0.05, no mark.
    assert dense["Overall"] == "37.5" and dense[delta] == "+25.0"
    assert dense["chain_sum"] == "60.0 ± 11.2"  # sqrt(0.6 * 0.4 / 19) = 0.1124: lm-eval stderr over 20 problems
    # base vs sparse: macro of -1/20 and -3/20, 4 problems worse and none better. A resample (within each task) is
    # >= 0 only when it draws none of them: (19/20)^20 * (17/20)^20 = 0.0139, so p = 2 * 0.0139 = 0.028; but with
    # one run a side the exact McNemar test also runs, and 4 discordant problems give p = 2 * 0.5^4 = 0.125: the
    # cautious p marks it "~" (not beyond noise).
    assert base[delta] == "-10.0~"
    base_record = next(d for d in t.data if d["arm"] == "base (tiny)")
    assert base_record["p_value"] == pytest.approx(0.125)
    record = next(d for d in t.data if d["arm"] == "dense")
    assert record["test"].startswith("paired bootstrap") and record["p_value"] < 0.01
    assert record["acc/chain_sum"]["stderr"] == pytest.approx(math.sqrt(0.6 * 0.4 / 19))
    assert record["acc/chain_sum"]["n_problems"] == 20
    assert any("paired bootstrap over problems" in f for f in t.footer)

    paired = t.paired_eval
    assert paired is not None and "sparse" in paired.title
    row = dict(zip(paired.columns, next(r for r in paired.rows if r[0] == "dense")))
    assert row["problems"] == "40" and row["Δ Overall (pts)"] == "+25.0"
    assert row["chain_sum"] == "+50.0 (10/0)"  # McNemar p = 2 / 2^10 = 0.002
    assert row["syllogism"] == "+0.0 (1/1)~"  # McNemar p = 1
    data = next(d for d in paired.data if d["arm"] == "dense")
    assert data["per_task"]["chain_sum"]["test"]["p"] == pytest.approx(2 / 1024)
    low, high = data["test"]["ci_low"], data["test"]["ci_high"]
    assert 0 < low < 0.25 < high <= 0.5
    # MDD: sd of the 40 per-problem differences (10 ones, 1 one, 1 minus one, 28 zeros), 2.8016 * sd / sqrt(40)
    diffs = [1.0] * 11 + [-1.0] + [0.0] * 28
    assert data["mdd_paired"] == pytest.approx(2.801585 * float(np.std(diffs, ddof=1)) / math.sqrt(40), rel=1e-5)
    mdd_line = next(f for f in t.footer if f.startswith("Minimum detectable difference"))
    assert "n = 40 problems" in mdd_line and f"dense {100 * data['mdd_paired']:.1f}" in mdd_line
    # unpaired: at the baseline's 12.5% over 40 problems, 2.8016 * sqrt(2 * 0.125 * 0.875 / 40)
    assert f"{100 * 2.801585 * math.sqrt(2 * 0.125 * 0.875 / 40):.1f} pts" in mdd_line

    md = (paired_results / "report.md").read_text()
    assert "### Problem by problem against sparse" in md and "+50.0 (10/0)" in md
    report = json.loads((paired_results / "report.json").read_text())
    sd = next(x for x in report["tables"] if x["ablation"] == "sd")
    in_json = {d["arm"]: d for d in sd["paired_eval"]["data"]}
    assert set(in_json) == {"base (tiny)", "dense"}
    assert in_json["dense"]["per_task"]["chain_sum"]["test"]["b01"] == 10
    assert in_json["base (tiny)"]["per_task"]["chain_sum"]["test"]["b10"] == 1  # the one problem only sparse solved
    assert sd["headline"] == "eval"


def test_probe_table_pairs_items_across_steps_and_arms(paired_results):
    out = R.make_report(paired_results)
    probe = _table(out, "sd").probe
    assert probe is not None
    assert "Δ info gain vs sparse" in probe.columns and "Δ content gain since step 0" in probe.columns
    dense = dict(zip(probe.columns, next(r for r in probe.rows if r[0] == "dense")))
    sparse = dict(zip(probe.columns, next(r for r in probe.rows if r[0] == "sparse")))
    assert dense["step"] == "8" and dense["runs"] == "1"
    assert dense["info gain"] == f"{np.mean([-5 + 0.1 * k + 0.5 for k in range(10)]):.3f}"
    assert dense["Δ info gain since step 0"] == "+0.500"  # +0.5 +- 0.01 on every item: learnt, p ~ 0
    assert dense["Δ info gain vs sparse"] == "+0.500"
    assert sparse["Δ info gain since step 0"] == "+0.000~"  # the +-0.01 wiggle only: nothing learnt
    assert sparse["Δ info gain vs sparse"] == "ref"
    assert dense["Δ s_pred since step 0"] == "+0.000~"
    data = next(d for d in probe.data if d["arm"] == "dense")
    assert data["content_gain"]["n_items"] == 9  # the null item is left out
    assert data["content_gain"]["since_step0"]["mean"] == pytest.approx(0.5)
    assert data["info_gain"]["since_step0"]["bootstrap"]["p"] < 0.001
    assert data["info_gain"]["since_step0"]["seed_std"] is None  # one seed: no spread
    assert not any(f.startswith("Note:") for f in probe.footer)  # the baseline arm has a probe, items are shared

    frame = out["frame"]  # the probe-only step-0 row of metrics.jsonl did not break the readers
    row = frame[frame["name"] == "dense_s0-0000"].iloc[0]
    assert row["steps_logged"] == 8 and row["input_tokens"] == 800
    assert row["probe/info_gain"] == pytest.approx(np.mean([-5 + 0.1 * k + 0.5 + 0.01 * (-1) ** k for k in range(10)]))
    assert row["train/reward"] == pytest.approx(0.7)
    assert all(r["status"] == "not evaluated" for r in _table(out, "probe-only").runs)
    ab = R.collect(paired_results)[1]["sd"]
    assert R.training_curve_names(ab) == ["reward", "rlp/info_gain", "probe/info_gain", "probe/content_gain"]
    assert (paired_results / "plots" / "sd-training.png").stat().st_size > 5000
    assert not any("probe.jsonl" in w for w in out["warnings"])  # a torn last line is skipped silently


def test_probe_is_the_headline_without_an_eval_and_shows_the_seed_spread(paired_results):
    out = R.make_report(paired_results, plots=False)
    t = _table(out, "probe-only")
    assert t.headline == "probe" and all(r[1] == "0" for r in t.rows)
    b = dict(zip(t.probe.columns, next(r for r in t.probe.rows if r[0] == "b")))
    assert b["runs"] == "2"
    # per seed, b gains 0.3 and 0.4 against its step 0: Δ 0.35, seed spread std(0.3, 0.4) = 0.0707
    assert b["Δ info gain since step 0"] == "+0.350 ± 0.071"
    # vs a (which did not learn): each seed against a's run of the same seed, 0.3 and 0.4 again
    assert b["Δ info gain vs a"] == "+0.350 ± 0.071"
    data = next(d for d in t.probe.data if d["arm"] == "b")
    assert data["info_gain"]["vs_baseline"]["per_seed"] == [pytest.approx(0.3), pytest.approx(0.4)]
    md = (paired_results / "report.md").read_text()
    section = md[md.index("## Probe only"):]
    assert section.index("(the headline: no run is evaluated yet)") < section.index("### Evaluation")
    report = json.loads((paired_results / "report.json").read_text())
    assert next(x for x in report["tables"] if x["ablation"] == "probe-only")["headline"] == "probe"


def test_probe_with_the_base_model_as_baseline_and_bad_lines(tmp_path):
    root = tmp_path / "r"
    _probe_run(root / "x" / "run", _config(0), 0.2)
    with open(root / "x" / "run" / "probe.jsonl", "a") as fh:  # after the torn line: unreadable, then foreign rows
        fh.write("\n" + json.dumps({"step": 4, "probe_version": 2, "items": ITEMS}) + "\n")
        fh.write(json.dumps({"step": 5, "items": ITEMS, "info_gain": [1.0]}) + "\n")
    _probe_run(root / "x" / "late", _config(0, thought_tokens=3), 0.2)  # its step-0 probe is lost
    rows = (root / "x" / "late" / "probe.jsonl").read_text().splitlines()
    (root / "x" / "late" / "probe.jsonl").write_text(rows[1] + "\n")
    (root / "x" / "base").mkdir()
    (root / "x" / "base" / "eval.json").write_text(json.dumps(_eval_json({"chain_sum": 0.5, "syllogism": 0.5})))
    out = R.make_report(root, plots=False)
    probe = _table(out, "x").probe
    assert not any(c.startswith("Δ info gain vs") for c in probe.columns)  # the base model: its probe is step 0
    assert any("each run's step 0" in f for f in probe.footer)
    row = dict(zip(probe.columns, next(r for r in probe.rows if r[0] != "thought_tokens=3")))
    assert row["Δ info gain since step 0"] == "+0.200" and row["step"] == "8"  # the version-2 row is skipped
    late = dict(zip(probe.columns, next(r for r in probe.rows if r[0] == "thought_tokens=3")))
    assert late["Δ info gain since step 0"] == "—" and late["info gain"] != "—"
    joined = "\n".join(out["warnings"])
    assert "probe_version 2" in joined and "not a list with one value per item" in joined


def test_paired_stats_helpers_are_exposed_by_the_report_module():
    assert R.noise_marker({"p": float("nan")}) == "?" and R.noise_marker({"p": 0.2}) == "~"
    assert R.noise_marker({"p": 0.01}) == ""
