"""The lm-evaluation-harness bridge for real: rlp's local tasks on `tiny`, offline, through `rlp eval`.

The harness tests skip where lm-eval is not installed (`pip install lm-eval`); the task data tests run everywhere.
"""

import importlib.metadata
import json
import math
import socket

import pytest
import torch
import yaml
from typer.testing import CliRunner

from rlp_cli import evaluate as E
from rlp_cli import lm_eval_tasks as T
from rlp_cli.errors import UserError


def test_local_task_data_is_deterministic_and_well_formed(tmp_path):
    rows = T.problems()
    assert rows == T.problems() and len(rows) == T.N_PROBLEMS
    assert len({(r["a"], r["b"]) for r in rows}) > T.N_PROBLEMS - 3  # not one problem repeated
    for r in rows:
        assert 10 <= r["a"] <= 99 and 10 <= r["b"] <= 99 and r["answer"] == str(r["a"] + r["b"])
        assert r["question"] == f"What is {r['a']} + {r['b']}?"
        assert len(set(r["choices"])) == 4 and r["choices"][r["label"]] == r["answer"]
    assert len({r["label"] for r in rows}) == 4  # the right choice is not always in the same place

    folder = T.write_tasks(tmp_path / "tasks")
    data = folder / T.DATA_FILE
    assert [json.loads(line) for line in data.read_text().splitlines()] == rows
    for name in T.TASKS:
        config = yaml.safe_load((folder / f"{name}.yaml").read_text())
        assert config["task"] == name and config["dataset_path"] == "json"
        assert config["dataset_kwargs"]["data_files"]["test"] == str(data.resolve())  # any working directory
    # Unchanged content is not rewritten (concurrent evaluations share the folder).
    stamp = data.stat().st_mtime_ns
    T.write_tasks(folder)
    assert data.stat().st_mtime_ns == stamp


@pytest.fixture
def offline(monkeypatch):
    """No network: the hub flags set, and any socket connection fails the test."""
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.setenv(var, "1")
    try:
        import datasets.config

        monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True, raising=False)
        monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True, raising=False)
    except ImportError:
        pass

    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args[1:] if len(args) > 1 else args}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def _choice_logprob(model, tok, context: str, continuation: str) -> float:
    """log p(continuation | context), split on tokens as lm-eval splits it (encode the whole, cut after the context)."""
    ctx = tok(context, add_special_tokens=False).input_ids
    whole = tok(context + continuation, add_special_tokens=False).input_ids
    cont = whole[len(ctx):]
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([whole])).logits[0].float()
    logp = torch.log_softmax(logits[len(ctx) - 1:-1], dim=-1)
    return float(logp[torch.arange(len(cont)), torch.tensor(cont)].sum())


def test_rlp_eval_runs_the_local_lm_eval_tasks_on_tiny_offline(tmp_path, tiny, offline):
    pytest.importorskip("lm_eval")
    from rlp_cli.cli import app

    out = tmp_path / "eval.json"
    args = ["eval", "tiny", "--suite", "lm-eval:rlp_addition,rlp_addition_mc", "--device", "cpu", "--out", str(out),
            "--set", "heldout_windows=0"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output + repr(result.exception)
    ev = json.loads(out.read_text())
    version = importlib.metadata.version("lm-eval")
    assert ev["suite"]["name"] == "lm-eval:rlp_addition,rlp_addition_mc" and ev["suite"]["lm_eval_version"] == version
    assert set(ev["results"]) == {"rlp_addition", "rlp_addition_mc"}
    for task, metric in (("rlp_addition", "exact_match,none"), ("rlp_addition_mc", "acc,none")):
        r = ev["results"][task]
        assert r["metric"] == metric and r["lm_eval_version"] == version
        assert 0.0 <= r["acc"] <= 1.0 and r["pass@1"] == r["acc"] and r["acc"] == r["raw"][metric]
        assert isinstance(r["acc_stderr"], float) and math.isfinite(r["acc_stderr"])
        assert r["n"] == T.N_PROBLEMS and r["group"] == "lm-eval"
        if 0 < r["acc"] < 1:  # lm-eval's stderr of a mean of 0/1 scores
            assert r["acc_stderr"] == pytest.approx(math.sqrt(r["acc"] * (1 - r["acc"]) / (r["n"] - 1)))
    assert ev["versions"] == {"rlp_addition": float(T.VERSION), "rlp_addition_mc": float(T.VERSION)}
    assert ev["groups"]["overall"]["n_tasks"] == 2 and 0.0 <= ev["groups"]["overall"]["acc"] <= 1.0
    assert ev["model"]["checkpoint_sha256"] == E.checkpoint_hash(tiny.source)
    assert ev["intrinsic"] == {}

    # The harness scored the model rlp loaded: its log-likelihoods of the choices are ours.
    samples = [json.loads(line) for line in (tmp_path / "eval_samples.jsonl").read_text().splitlines()]
    assert len(samples) == 2 * T.N_PROBLEMS
    mc = {s["doc_id"]: s for s in samples if s["task"] == "rlp_addition_mc"}
    rows = T.problems()
    correct = 0
    for doc in rows:
        ours = [_choice_logprob(tiny.model, tiny.tokenizer, f"Question: {doc['question']}\nAnswer:", " " + c)
                for c in doc["choices"]]
        theirs = [ll for ll, _ in mc[doc["id"]]["response"]]
        assert theirs == pytest.approx(ours, abs=1e-3)
        correct += max(range(4), key=lambda i: ours[i]) == doc["label"]
    assert ev["results"]["rlp_addition_mc"]["acc"] == pytest.approx(correct / len(rows))

    # Same command again: reused (same suite, settings, weights and lm-eval version), not recomputed.
    assert CliRunner().invoke(app, args).exit_code == 0
    assert json.loads(out.read_text())["date"] == ev["date"]


def test_an_unknown_lm_eval_task_is_a_clear_error_before_the_model_loads(tmp_path, offline, monkeypatch):
    pytest.importorskip("lm_eval")
    from rlp_cli import models

    monkeypatch.setattr(models, "load_model", lambda *a, **k: pytest.fail("loaded the model"))
    with pytest.raises(UserError, match="knows no task rlp_no_such_task"):
        E.evaluate("tiny", suite="lm-eval:rlp_addition,rlp_no_such_task", out=tmp_path / "eval.json", device="cpu",
                   overrides=["heldout_windows=0"])
