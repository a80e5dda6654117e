"""`rlp train` end to end on `tiny`, resume, and bad input (exit 2, one paragraph, no traceback)."""

import json
import subprocess
import sys

import pytest

from rlp_cli.config import load_config
from rlp_cli.probe import FIELDS as PROBE_FIELDS
from rlp_cli.runio import read_jsonl
from rlp_cli.train import Trainer


def rlp(*args, cwd=None):
    env = {"HF_HUB_OFFLINE": "1", "RLP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"}
    import os

    env = {**os.environ, **env}
    return subprocess.run([sys.executable, "-m", "rlp_cli.cli", *args], capture_output=True, text=True, cwd=cwd,
                          env=env, timeout=300)


@pytest.mark.parametrize("objective,reward", [("rlp", None), ("rpt", "prefix_match"), ("rpt", "rpt_dense"),
                                              ("ntp", None)])
def test_train_end_to_end_on_tiny(tmp_path, objective, reward):
    out = tmp_path / "run"
    sets = [f"objective.name={objective}", "budget.steps=3", "log.samples_every=1"]
    if reward:
        sets.append(f"objective.reward={reward}")
    r = rlp("train", "tiny", "--out", str(out), "--no-progress", *sum((["--set", s] for s in sets), []))
    assert r.returncode == 0, r.stderr
    status = json.loads((out / "status.json").read_text())
    assert status["status"] == "completed" and status["step"] == 3
    rows = read_jsonl(out / "metrics.jsonl")
    assert [r["step"] for r in rows] == [0, 1, 2, 3]  # step 0: the held-out probe before training
    assert set(rows[0]) == {"step", *(f"probe/{k}" for k in PROBE_FIELDS)}
    assert "probe/info_gain" in rows[-1] and len(read_jsonl(out / "probe.jsonl")) == 2
    rows = rows[1:]
    assert all(r["input_tokens"] > 0 and r["flops"] > 0 for r in rows)
    assert rows[-1]["input_tokens"] > rows[0]["input_tokens"]
    if objective == "rlp":
        for key in ("reward", "reward_std", "rewards/info_gain/mean", "completions/mean_length",
                    "completions/clipped_ratio", "clip_ratio/low_mean", "clip_ratio/high_mean", "kl", "entropy",
                    "step_time", "num_tokens", "rlp/s_pred", "rlp/s_ema", "rlp/info_gain", "rlp/frac_positive",
                    "rlp/s_empty", "rlp/content_gain"):
            assert key in rows[0], key
    if objective != "ntp":
        samples = read_jsonl(out / "samples.jsonl")
        assert samples and len(samples[0]["thoughts"]) == 4
        if objective == "rpt":
            assert "prediction" in samples[0]["thoughts"][0]
    prov = json.loads((out / "provenance.json").read_text())
    assert prov["seed"] == 0 and "torch" in prov["versions"]
    from transformers import AutoModelForCausalLM

    assert AutoModelForCausalLM.from_pretrained(out / "final") is not None
    assert not (out / "checkpoint").exists()
    # re-running a completed run does nothing and succeeds
    again = rlp("train", "tiny", "--out", str(out), "--no-progress", *sum((["--set", s] for s in sets), []))
    assert again.returncode == 0 and len(read_jsonl(out / "metrics.jsonl")) == 4


def test_resume_continues_the_same_trajectory(tmp_path):
    cfg = load_config("tiny", ["budget.steps=4", "objective.kl_beta=0.01"])
    straight = Trainer(cfg)
    want = [straight.train_step()[0] for _ in range(4)]
    first = Trainer(cfg)
    got = [first.train_step()[0] for _ in range(2)]
    first.save_checkpoint(tmp_path / "ckpt")
    second = Trainer(cfg)
    assert second.load_checkpoint(tmp_path / "ckpt") and second.step == 2
    got += [second.train_step()[0] for _ in range(2)]
    for a, b in zip(want, got):
        for key in ("reward", "loss", "rlp/info_gain", "kl", "input_tokens", "grad_norm"):
            assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-7), key


def test_a_run_folder_refuses_a_different_config(tmp_path):
    out = tmp_path / "run"
    assert rlp("train", "tiny", "--out", str(out), "--no-progress", "--set", "budget.steps=1").returncode == 0
    r = rlp("train", "tiny", "--out", str(out), "--no-progress", "--set", "budget.steps=2")
    assert r.returncode == 2 and "budget.steps" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.parametrize("content,expect", [
    ("objective:\n  num_rolouts: 8\n", "did you mean 'objective.num_rollouts'"),
    ("objective:\n  num_rollouts: many\n", "objective.num_rollouts"),
    ("model: [unclosed\n", "malformed YAML"),
    ("objective:\n  name: rlp\n  reward: nope\n", "not a registered reward"),
    ("objective:\n  num_rollouts: 1\n", "at least 2"),
])
def test_bad_config_exits_2_with_one_paragraph(tmp_path, content, expect):
    path = tmp_path / "bad.yaml"
    path.write_text(content)
    r = rlp("train", str(path), "--out", str(tmp_path / "out"), "--no-progress")
    assert r.returncode == 2, r.stderr
    assert expect in r.stderr and "Fix" in r.stderr and "Traceback" not in r.stderr
    assert str(path) in r.stderr or "bad.yaml" in r.stderr or "reward" in expect


def test_missing_file_and_offline_model_errors(tmp_path):
    r = rlp("train", str(tmp_path / "nope.yaml"))
    assert r.returncode == 2 and "file not found" in r.stderr
    r = rlp("train", "tiny", "--out", str(tmp_path / "o"), "--no-progress", "--set", "model.name=someorg/unknown-model")
    assert r.returncode == 2 and "never downloads" in r.stderr and "Traceback" not in r.stderr
    status = json.loads((tmp_path / "o" / "status.json").read_text())
    assert status["status"] == "failed"
    r = rlp("train", "tiny", "--out", str(tmp_path / "p"), "--set", "data.corpus=/no/such/corpus.txt")
    assert r.returncode == 2 and "corpus" in r.stderr


def test_validate_and_ls():
    assert rlp("validate", "tiny").returncode == 0
    r = rlp("ls", "rewards")
    assert r.returncode == 0 and "info_gain" in r.stdout and "prefix_match" in r.stdout
    assert "smollm2-135m" in rlp("ls", "models").stdout


@pytest.mark.slow
def test_smollm2_smoke_run(tmp_path):
    """One short RLP run on the real SmolLM2-135M (converted from its GGUF once, then cached)."""
    out = tmp_path / "smol"
    r = rlp("train", "default", "--out", str(out), "--no-progress", "--set", "budget.steps=1",
            "--set", "objective.num_rollouts=2", "--set", "objective.thought_tokens=4",
            "--set", "optim.batch_documents=1", "--set", "data.num_documents=50", "--set", "log.probe_contexts=2")
    assert r.returncode == 0, r.stderr
    row = read_jsonl(out / "metrics.jsonl")[-1]
    assert row["rlp/s_ema"] < 0 and abs(row["rlp/info_gain"]) < 20
    assert json.loads((out / "provenance.json").read_text())["n_params"] > 100_000_000
