"""`rlp ablate`: grid expansion, stable ids, the manifest and changed grids, the lock, failure isolation,
resume after a kill (same trajectory as an uninterrupted run), bad input (exit 2), and `smoke` end to end."""

import fcntl
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from rlp_cli.ablate import expand, load_preset, make_slots, run_id, write_manifest
from rlp_cli.config import load_config
from rlp_cli.errors import UserError
from rlp_cli.runio import read_json, read_jsonl

TIMING_KEYS = ("step_time", "time/")  # wall-clock measurements: the only values allowed to differ between runs


def rlp(*args, cwd=None, timeout=300):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "RLP_NUM_THREADS": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "rlp_cli.cli", *args], capture_output=True, text=True, cwd=cwd,
                          env=env, timeout=timeout)


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def plan_of(path: Path, overrides=None):
    preset, p = load_preset(str(path))
    return expand(preset, p, overrides)


# ---------------------------------------------------------------------------------------------
# Expansion


GRID = """
name: g
base: tiny
set: {budget.steps: 3}
grid:
  objective.num_rollouts: [2, 4]
  optim.lr: [0.001, 0.01]
zip:
  objective.horizon: [1, 2]
  objective.gamma: [0.5, 0.9]
runs:
  - name: a
    set: {objective.temperature: 0.5}
  - name: b
    set: {objective.temperature: 1.0}
seeds: [0, 1]
eval: none
"""


def test_expansion_product_zip_runs_seeds_and_overrides(tmp_path):
    plan = plan_of(write(tmp_path / "g.yaml", GRID), ["data.num_documents=50"])
    # 2 x 2 (grid) x 2 (zip rows) x 2 (arms) x 2 (seeds)
    assert len(plan.runs) == 32 and len({r.id for r in plan.runs}) == 32
    assert [r.seed for r in plan.runs] == [0] * 16 + [1] * 16  # seed-major: seed 0 of every arm first
    for r in plan.runs:
        c = r.config
        assert c.data.num_documents == 50 and c.budget.steps == 3 and c.model.name == "tiny"
        assert (c.objective.horizon, c.objective.gamma) in {(1, 0.5), (2, 0.9)}  # zip pairs, never crosses
        assert c.objective.temperature == {"a": 0.5, "b": 1.0}[r.axis_values["arm"]]
        assert c.seed == r.seed and c.name == r.name
        assert r.overrides["objective.temperature"] == c.objective.temperature
        assert "data.num_documents" not in r.overrides  # --set is part of the base every run starts from
    names = {r.name for r in plan.runs}
    assert "a_gamma-0.5_horizon-1_num_rollouts-2_lr-0.001_s0" in names
    assert "b_gamma-0.9_horizon-2_num_rollouts-4_lr-0.01_s1" in names
    assert plan.arms[0] == "a_gamma-0.5_horizon-1_num_rollouts-2_lr-0.001"
    assert plan.axes() == {"arm": ["a", "b"], "objective.num_rollouts": [2, 4], "optim.lr": [0.001, 0.01],
                           "objective.horizon": [1, 2], "objective.gamma": [0.5, 0.9]}


def test_ids_are_stable_and_independent_of_grid_order(tmp_path):
    first = plan_of(write(tmp_path / "g.yaml", GRID))
    reordered = GRID.replace("objective.num_rollouts: [2, 4]\n  optim.lr: [0.001, 0.01]",
                             "optim.lr: [0.01, 0.001]\n  objective.num_rollouts: [4, 2]")
    reordered = reordered.replace("seeds: [0, 1]", "seeds: [1, 0]")
    second = plan_of(write(tmp_path / "g2.yaml", reordered))
    assert {r.dir_name for r in first.runs} == {r.dir_name for r in second.runs}
    assert first.fingerprint == second.fingerprint
    # the id is the hash of the resolved config: the same config gives the same id anywhere, the label aside
    run = first.runs[0]
    same = load_config(run.config.to_dict() | {"name": "renamed"})
    assert run_id(same) == run.id
    assert run_id(load_config(run.config.to_dict(), ["optim.lr=0.5"])) != run.id


def test_flop_matched_arm_and_baseline(tmp_path):
    text = """
name: f
base: tiny            # G=4, 8-token thoughts, 2 documents of <= 64 tokens a step, 4 steps
runs:
  - name: rlp
  - name: cpt
    set: {objective.name: ntp, budget.steps: null}
    derive:
      budget.input_tokens: {flop_match: rlp}
baseline: cpt
eval: none
"""
    plan = plan_of(write(tmp_path / "f.yaml", text))
    cpt = next(r for r in plan.runs if r.arm == "cpt")
    # T_flop = n_rollouts * l_seq * batch_size * iters + T_inp = 4*8*2*4 + 4*2*64
    assert cpt.config.budget.input_tokens == 4 * 8 * 2 * 4 + 4 * 2 * 64 == 768
    assert cpt.config.budget.steps is None and cpt.derived["budget.input_tokens"]["flop_match"] == "rlp"
    assert plan.baseline == "cpt"
    # the derivation follows --set
    assert next(r for r in plan_of(tmp_path / "f.yaml", ["budget.steps=2"]).runs
                if r.arm == "cpt").config.budget.input_tokens == 384


def test_baseline_by_axis_values_and_errors(tmp_path):
    base = "name: b\nbase: tiny\ngrid: {objective.num_rollouts: [2, 4]}\neval: none\n"
    assert plan_of(write(tmp_path / "b1.yaml", base + "baseline: {objective.num_rollouts: 4}\n")).baseline == \
        "num_rollouts-4"
    assert plan_of(write(tmp_path / "b2.yaml", base + "baseline: base\n")).baseline == "base"
    with pytest.raises(UserError, match="not an arm"):
        plan_of(write(tmp_path / "b3.yaml", base + "baseline: nope\n"))
    with pytest.raises(UserError, match="matches 0 arms"):
        plan_of(write(tmp_path / "b4.yaml", base + "baseline: {objective.num_rollouts: 8}\n"))
    with pytest.raises(UserError, match="collapse"):
        plan_of(tmp_path / "b1.yaml", ["objective.num_rollouts=8"])
    with pytest.raises(UserError, match="same config"):
        plan_of(write(tmp_path / "dup.yaml", "base: tiny\nruns: [{name: x}, {name: y}]\n"))


def test_slots_share_cores_and_devices(monkeypatch):
    monkeypatch.setattr("rlp_cli.ablate.scheduler.cpu_count", lambda: 8)
    monkeypatch.setattr("rlp_cli.ablate.scheduler.memory_gb", lambda: 64)
    monkeypatch.delenv("RLP_NUM_THREADS", raising=False)
    slots = make_slots("cpu", None, 10)
    assert len(slots) == 8 and {s.env["RLP_NUM_THREADS"] for s in slots} == {"1"}  # one run per core
    assert all(s.env["CUDA_VISIBLE_DEVICES"] == "" for s in slots)
    assert [s.env["RLP_NUM_THREADS"] for s in make_slots("cpu", 3, 2)] == ["4", "4"]  # never more slots than jobs
    assert [s.env["OMP_NUM_THREADS"] for s in make_slots("cpu", 2, 9)] == ["4", "4"]  # the cores shared out
    assert len(make_slots("cpu", 64, 100)) == 8  # never oversubscribed
    monkeypatch.setattr("rlp_cli.ablate.scheduler.memory_gb", lambda: 12)
    assert len(make_slots("cpu", None, 10)) == 3  # as many as memory allows
    monkeypatch.setenv("RLP_NUM_THREADS", "1")
    assert [s.env["RLP_NUM_THREADS"] for s in make_slots("cpu", 2, 2)] == ["1", "1"]  # an explicit cap holds
    gpus = make_slots("0,1", None, 5)
    assert [s.env["CUDA_VISIBLE_DEVICES"] for s in gpus] == ["0", "1"] and gpus[0].label == "cuda:0"
    with pytest.raises(UserError):
        make_slots("gpu0", None, 1)


# ---------------------------------------------------------------------------------------------
# Bad input: exit 2, one paragraph naming the file and the key, no traceback


@pytest.mark.parametrize("text,expected", [
    ("base: tiny\ngird: {objective.num_rollouts: [2, 4]}\n", ["gird", "did you mean 'grid'"]),
    ("base: tiny\nruns: [{name: a, sett: {optim.lr: 0.1}}]\n", ["runs.0.sett", "did you mean 'set'"]),
    ("base: tiny\nseeds: zero\n", ["seeds", "valid list"]),
    ("base: tiny\ngrid: {objective.num_rollouts: 4}\n", ["grid.objective.num_rollouts", "valid list"]),
    ("base: tiny\ngrid: {objective.num_rollout: [2, 4]}\n", ["objective.num_rollout", "objective.num_rollouts"]),
    ("base: tiny\ngrid: {objective.num_rollouts: [2, four]}\n", ["objective.num_rollouts", "four"]),
    ("base: tiny\nruns: [{name: a, set: {objective.reward: nope}}]\n", ["nope", "rlp ls rewards"]),
    ("base: tiny\ngrid: {objective.num_rollouts: [2, 4]\n", ["malformed YAML", "line"]),
    ("base: tiny\neval: {suite: quik}\n", ["key 'eval'", "quick"]),
])
def test_bad_ablation_files_exit_2(tmp_path, text, expected):
    path = write(tmp_path / "bad.yaml", text)
    r = rlp("ablate", str(path), "--out", str(tmp_path / "res"), cwd=tmp_path)
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert "Traceback" not in r.stderr and "bad.yaml" in r.stderr and "Fix:" in r.stderr
    for piece in expected:
        assert piece in r.stderr, (piece, r.stderr)
    assert not (tmp_path / "res").exists()  # nothing was written


def test_validate_accepts_ablations(tmp_path):
    r = rlp("validate", "thought-vs-ntp", cwd=tmp_path)
    assert r.returncode == 0 and "valid ablation" in r.stdout and "flop-matched" in r.stdout
    bad = write(tmp_path / "bad.yaml", "base: tiny\ngird: {objective.num_rollouts: [2, 4]}\n")
    r = rlp("validate", str(bad), cwd=tmp_path)
    assert r.returncode == 2 and "did you mean 'grid'" in r.stderr and "Traceback" not in r.stderr
    good = write(tmp_path / "run.yaml", "model: {name: tiny}\n")  # a run config is still a run config
    r = rlp("validate", str(good), cwd=tmp_path)
    assert r.returncode == 0 and "run.yaml: valid" in r.stdout and "valid ablation" not in r.stdout


def test_missing_preset_exit_2_and_listing(tmp_path):
    r = rlp("ablate", "sparse-vs-dens", cwd=tmp_path)
    assert r.returncode == 2 and "did you mean 'sparse-vs-dense'" in r.stderr and "rlp ls presets" in r.stderr
    r = rlp("ls", "presets", cwd=tmp_path)
    assert r.returncode == 0 and "smoke" in r.stdout and "sparse-vs-dense" in r.stdout


# ---------------------------------------------------------------------------------------------
# Manifest, changed grid, lock


def test_changed_grid_is_refused_with_what_changed(tmp_path):
    old = write(tmp_path / "old.yaml", "name: grid\nbase: tiny\ngrid: {objective.num_rollouts: [2, 4]}\neval: none\n")
    folder = tmp_path / "res" / "grid"
    write_manifest(plan_of(old), folder, accept_changes=False)
    manifest = read_json(folder / "manifest.json")
    assert manifest["ablation"] == "grid" and [r["name"] for r in manifest["runs"]] == ["num_rollouts-2_s0",
                                                                                       "num_rollouts-4_s0"]
    assert {"id", "name", "dir", "arm", "seed", "overrides", "axis_values"} <= set(manifest["runs"][0])
    assert manifest["axes"] == {"objective.num_rollouts": [2, 4]} and manifest["eval_suite"] == "none"

    new = write(tmp_path / "new.yaml", "name: grid\nbase: tiny\ngrid: {objective.num_rollouts: [2, 8]}\neval: none\n")
    r = rlp("ablate", str(new), "--out", str(tmp_path / "res"), "--set", "optim.lr=0.01", cwd=tmp_path)
    assert r.returncode == 2, r.stdout + r.stderr
    err = " ".join(r.stderr.split())
    assert "added: num_rollouts-8_s0" in err and "removed: num_rollouts-4_s0" in err
    assert "altered: num_rollouts-2_s0" in err and "optim.lr 0.001 -> 0.01" in err
    assert "--accept-changes" in err and "--out" in err
    assert read_json(folder / "manifest.json") == manifest  # untouched

    write_manifest(plan_of(new, ["optim.lr=0.01"]), folder, accept_changes=True)
    updated = read_json(folder / "manifest.json")
    assert {r["name"] for r in updated["retired_runs"]} == {"num_rollouts-2_s0", "num_rollouts-4_s0"}
    assert updated["fingerprint"] != manifest["fingerprint"]


def test_second_ablate_on_the_same_folder_is_refused(tmp_path):
    preset = write(tmp_path / "l.yaml", "name: l\nbase: tiny\neval: none\n")
    lock = tmp_path / "res" / "l" / ".lock"
    lock.parent.mkdir(parents=True)
    with open(lock, "w") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)  # a first `rlp ablate` holds it
        r = rlp("ablate", str(preset), "--out", str(tmp_path / "res"), cwd=tmp_path)
    assert r.returncode == 2 and "another `rlp ablate` is already running" in " ".join(r.stderr.split())
    assert not (lock.parent / "manifest.json").exists()


# ---------------------------------------------------------------------------------------------
# Running: failure isolation, resume after a kill, eval only, smoke end to end


def test_a_failing_run_does_not_stop_the_others(tmp_path):
    preset = write(tmp_path / "iso.yaml", """
name: iso
base: tiny
set: {budget.steps: 2}
runs:
  - name: broken
    set: {model.name: /nonexistent/model}   # fails inside the child, when the model is loaded
  - name: good
eval: none
""")
    out = tmp_path / "res"
    r = rlp("ablate", str(preset), "--out", str(out), "--jobs", "2", cwd=tmp_path)
    assert r.returncode == 1, r.stdout + r.stderr
    text = " ".join(r.stdout.split())
    assert "failed broken_s0" in text and "/nonexistent/model" in text  # reported with the log's tail
    folders = {p.name.rsplit("-", 1)[0]: p for p in (out / "iso").iterdir() if p.is_dir()}
    assert read_json(folders["good_s0"] / "status.json")["status"] == "completed"
    assert read_json(folders["broken_s0"] / "status.json")["status"] == "failed"

    # a re-run skips both: the good one is done, the failed one waits for --retry-failed
    r = rlp("ablate", str(preset), "--out", str(out), cwd=tmp_path)
    assert r.returncode == 1 and "--retry-failed" in r.stdout
    assert (folders["broken_s0"] / "train.log").read_text().count("=== rlp ablate") == 1

    # --fail-fast with one slot: the broken arm runs first, the good one never starts
    r = rlp("ablate", str(preset), "--out", str(tmp_path / "ff"), "--jobs", "1", "--fail-fast", cwd=tmp_path)
    assert r.returncode == 1 and "not finished" in r.stdout and "good_s0" in r.stdout
    assert not any((p / "status.json").exists() for p in (tmp_path / "ff" / "iso").glob("good_s0-*"))


RESUME = """
name: resume
base: tiny
set: {budget.steps: 40, log.checkpoint_every: 5, log.samples_every: 100}
eval:                 # a very small evaluation: the test only checks that it runs once, after training
  suite: quick
  set: {tasks: [chain_sum, syllogism], n_per_task: 2, samples: 0, thought_tokens: 4, answer_tokens: 4,
        heldout_windows: 2, info_gain_contexts: 2, info_gain_rollouts: 2}
"""


def _alive(pid: int) -> bool:
    """True while the process runs (a zombie, dead but not yet reaped by init, counts as gone)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


def test_kill_then_rerun_resumes_the_same_trajectory(tmp_path):
    preset = write(tmp_path / "resume.yaml", RESUME)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "RLP_NUM_THREADS": "1", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "rlp_cli.cli", "ablate", str(preset), "--eval", "none"]
    # the reference: the same grid, uninterrupted, in another folder (in parallel, to save time)
    reference = subprocess.Popen(cmd + ["--out", str(tmp_path / "ref")], cwd=tmp_path, env=env,
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    victim = subprocess.Popen(cmd + ["--out", str(tmp_path / "res")], cwd=tmp_path, env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    run_dir = None
    deadline = time.time() + 120
    while time.time() < deadline:
        found = list((tmp_path / "res" / "resume").glob("run_s0-*"))
        if found and len(read_jsonl(found[0] / "metrics.jsonl")) >= 12:
            run_dir = found[0]
            break
        time.sleep(0.02)
    assert run_dir is not None, "the run never got going"
    victim.send_signal(signal.SIGKILL)  # kill -9 of `rlp ablate`; its child follows (PR_SET_PDEATHSIG)
    victim.wait()
    # The child gets SIGTERM when its parent dies and may still be writing: read its files once it is gone.
    pid = read_json(run_dir / "status.json").get("pid")
    deadline = time.time() + 60
    while pid and _alive(pid) and time.time() < deadline:
        time.sleep(0.05)
    assert not (pid and _alive(pid)), "the child outlived its parent"
    status = read_json(run_dir / "status.json")
    rows_at_kill = len(read_jsonl(run_dir / "metrics.jsonl"))
    assert status["status"] in ("running", "interrupted") and 12 <= rows_at_kill < 40  # both resumable
    assert (run_dir / "checkpoint" / "state.pt").exists()

    r = rlp("ablate", str(preset), "--out", str(tmp_path / "res"), "--eval", "none", cwd=tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    assert reference.wait(timeout=120) == 0

    resumed = read_jsonl(run_dir / "metrics.jsonl")
    ref_dir = next((tmp_path / "ref" / "resume").glob("run_s0-*"))
    assert ref_dir.name == run_dir.name  # same config, same id
    uninterrupted = read_jsonl(ref_dir / "metrics.jsonl")
    assert [m["step"] for m in resumed] == list(range(0, 41))  # the step-0 probe, then every step exactly once
    strip = lambda m: {k: v for k, v in m.items() if not k.startswith(TIMING_KEYS)}  # noqa: E731
    assert [strip(m) for m in resumed] == [strip(m) for m in uninterrupted]
    assert read_json(run_dir / "provenance.json")["resumed_from_step"] >= 5
    assert (run_dir / "train.log").read_text().count("=== rlp ablate") == 2

    # done runs are skipped: nothing starts again
    r = rlp("ablate", str(preset), "--out", str(tmp_path / "res"), "--eval", "none", cwd=tmp_path)
    assert r.returncode == 0 and "1 already done, 0 to run" in " ".join(r.stdout.split())
    assert (run_dir / "train.log").read_text().count("=== rlp ablate") == 2

    # asking for an evaluation later runs only the evaluation (and the base model's, once)
    r = rlp("ablate", str(preset), "--out", str(tmp_path / "res"), "--jobs", "2", cwd=tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    assert (run_dir / "train.log").read_text().count("=== rlp ablate") == 2
    assert read_json(run_dir / "eval_status.json")["status"] == "completed"
    assert read_json(run_dir / "eval.json")["n-samples"]["chain_sum"]["effective"] == 2
    assert read_json(run_dir / "eval.json")["suite"]["name"] == "quick"
    assert read_json(tmp_path / "res" / "resume" / "base" / "eval.json")["suite"]["name"] == "quick"


def test_smoke_preset_end_to_end(tmp_path):
    out = tmp_path / "results"
    r = rlp("ablate", "smoke", "--out", str(out), "--eval", "none", "--set", "budget.steps=2", "--jobs", "2",
            cwd=tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    manifest = read_json(out / "smoke" / "manifest.json")
    assert [x["arm"] for x in manifest["runs"]] == ["rlp", "rpt", "ntp"]
    assert manifest["baseline"] == "rlp" and manifest["report"]["axis"] == "arm"
    assert manifest["cli_overrides"] == ["budget.steps=2"]
    for entry in manifest["runs"]:
        folder = out / "smoke" / entry["dir"]
        status = read_json(folder / "status.json")
        assert status["status"] == "completed", (entry["name"], status)
        rows = read_jsonl(folder / "metrics.jsonl")
        assert [m["step"] for m in rows] == list(range(len(rows)))  # the step-0 probe, then each step once
        config = load_config(folder / "config.yaml")
        assert run_id(config) == entry["id"] and config.objective.name == entry["arm"]
    ntp = next(x for x in manifest["runs"] if x["arm"] == "ntp")
    # FLOP-matched to the rlp arm: 4 rollouts * 8 tokens * 2 contexts * 2 steps + 2 steps * 2 docs * 64 tokens
    assert ntp["config"]["budget"]["input_tokens"] == 384
    assert read_json(out / "smoke" / ntp["dir"] / "status.json")["input_tokens"] >= 384
    r = rlp("ablate", "smoke", "--out", str(out), "--set", "budget.steps=2", "--eval", "none", "--dry-run",
            cwd=tmp_path)
    assert r.returncode == 0 and r.stdout.count("│ done") == 3, r.stdout


def test_shipped_presets_cpt_arms_follow_the_paper_schedule():
    """thought-vs-ntp: the CPT arms use lr 1e-6 decayed to 1e-7 (RLP_SPEC section 2); the rlp arm keeps its own."""
    root = Path(__file__).resolve().parent.parent / "rlp_cli" / "presets"
    plan = plan_of(root / "thought-vs-ntp.yaml")
    by_arm = {r.arm: r.config for r in plan.runs}
    for arm in ("cpt-token-matched", "cpt-flop-matched"):
        assert (by_arm[arm].optim.lr, by_arm[arm].optim.lr_end) == (1e-6, 1e-7), arm
    assert by_arm["rlp"].optim.lr_end is None and by_arm["rlp"].objective.name == "rlp"
    # FLOP-matched: one answer position per document, so batch_size = the documents per step (8), not 8 x 4
    rlp = by_arm["rlp"]
    expected = 4 * rlp.objective.thought_tokens * 8 * rlp.budget.steps + rlp.budget.steps * 8 * rlp.data.max_context_tokens
    assert by_arm["cpt-flop-matched"].budget.input_tokens == expected


def test_every_shipped_preset_expands():
    root = Path(__file__).resolve().parent.parent / "rlp_cli" / "presets"
    for path in sorted(root.glob("*.yaml")):
        assert plan_of(path).runs, path.name
