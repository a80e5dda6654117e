"""`rlp bench` on the tiny model: it runs, and what it writes is complete and consistent."""

import json
import math
from pathlib import Path

import pytest
from typer.testing import CliRunner

from rlp_cli.bench import PHASES
from rlp_cli.cli import app

SMALL_CORPUS = ["--set", "data.num_documents=200"]  # same windows, faster setup


def _bench(tmp_path, *extra):
    result = CliRunner().invoke(app, ["bench", "--model", "tiny", "--warmup", "1", "--steps", "2",
                                      "--out", str(tmp_path), *SMALL_CORPUS, *extra])
    assert result.exit_code == 0, result.output
    files = list(tmp_path.glob("*.json"))
    assert len(files) == 1, result.output
    return json.loads(files[0].read_text()), result.output


def _finite_numbers(tree):
    if isinstance(tree, dict):
        for v in tree.values():
            yield from _finite_numbers(v)
    elif isinstance(tree, list):
        for v in tree:
            yield from _finite_numbers(v)
    elif isinstance(tree, (int, float)) and not isinstance(tree, bool):
        yield tree


@pytest.mark.parametrize("naive", [False, True])
def test_bench_writes_complete_consistent_numbers(tmp_path, naive):
    data, output = _bench(tmp_path, *(["--naive"] if naive else []))
    assert data["path"] == ("naive" if naive else "fast") and data["config"]["fast_path"] is not naive
    cfg = data["config"]  # the reference setting of issue 5
    assert (cfg["objective"]["num_rollouts"], cfg["objective"]["thought_tokens"], cfg["optim"]["batch_documents"],
            cfg["data"]["max_context_tokens"]) == (8, 32, 4, 128)
    assert data["timed_steps"] == 2 and len(data["steps"]) == 2
    assert all(math.isfinite(x) for x in _finite_numbers(data))
    for key in ("step_time_s", "steps_per_s", "thought_tokens_per_s", "flops_per_s", "cpu_s",
                "outside_model_calls_s", "model_forward_s", "model_backward_s", "model_optimizer_s",
                *[f"phase_{p}_s" for p in PHASES + ["other"]]):
        assert set(data["summary"][key]) >= {"median", "min", "max", "q1", "q3"}, key
    for step in data["steps"]:
        phases = sum(step[f"phase_{p}_s"] for p in PHASES)
        assert 0 < phases <= step["step_time_s"]
        assert step["phase_other_s"] == pytest.approx(step["step_time_s"] - phases)
        assert step["thought_tokens"] > 0 and step["flops"] > 0
        assert step["thought_tokens_per_s"] == pytest.approx(step["thought_tokens"] / step["step_time_s"])
        calls = step["model_forward_s"] + step["model_backward_s"] + step["model_optimizer_s"]
        assert 0 < calls <= step["step_time_s"]
        assert step["phase_rollout_s"] > 0 and step["phase_update_s"] > 0 and step["phase_ema_scoring_s"] > 0
        assert (step["phase_s_pred_scoring_s"] > 0) == naive  # the fast path scores S_pred while generating
    assert data["memory"]["peak_rss_mb"] > 0
    limit = data["flops"]["matmul_limit"]
    assert limit["flops_per_s"] > 0 and data["flops"]["fraction_of_limit"] > 0
    assert data["machine"]["torch_threads"] >= 1 and data["machine"]["cpu"]
    if Path("/proc/stat").exists():  # how busy the machine was while timing: tells noisy numbers apart
        assert 0 <= data["machine"]["during_timed_steps"]["busy_fraction"] <= 1
    assert data["device"]["type"] == "cpu" or data["device"]["type"] == "cuda"
    assert data["provenance"]["versions"]["torch"]
    assert "thought tokens / s" in output and "outside model calls" in output


def test_bench_vs_trl_without_trl_says_how_to_get_it(tmp_path, monkeypatch):
    import importlib.util

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "trl" else real_find_spec(name, *a))
    result = CliRunner().invoke(app, ["bench", "--model", "tiny", "--vs-trl", "--out", str(tmp_path)])
    assert result.exit_code != 0
    assert "pip install trl" in str(result.exception) + result.output
    assert not list(tmp_path.glob("*.json"))  # refused before any step ran


def test_bench_refuses_zero_steps(tmp_path):
    result = CliRunner().invoke(app, ["bench", "--model", "tiny", "--steps", "0", "--out", str(tmp_path)])
    assert result.exit_code != 0
    assert "--steps" in str(result.exception) + result.output


def test_bench_of_a_bfloat16_policy_reports_its_reward_drift_against_float32(tmp_path):
    result, output = _bench(tmp_path, "--set", "model.dtype=bfloat16")
    drift = result["precision_vs_float32"]
    assert drift["dtype"] == "bfloat16" and drift["thoughts"] == 4 * 8
    # bf16 rounding moves S_pred, but far less than the spread between thoughts that the advantages use
    assert 0 < drift["info_gain_difference_mean_abs"] <= drift["info_gain_difference_max_abs"]
    assert drift["info_gain_difference_mean_abs"] < drift["reward_std_within_groups"]
    assert 0.5 < drift["advantage_rank_agreement"] <= 1.0
    assert "policy vs float32 on the same 32 thoughts" in " ".join(output.split())
    float32, _ = _bench(tmp_path / "f32")
    assert float32["precision_vs_float32"] is None


def test_bench_eval_times_the_generation_of_rlp_eval(tmp_path):
    result = CliRunner().invoke(app, ["bench", "--eval", "--model", "tiny", "--out", str(tmp_path),
                                      "--set", "n_per_task=2", "--set", "tasks=chain_sum,syllogism,gcd",
                                      "--set", "thought_tokens=4", "--set", "answer_tokens=4", "--set", "batch_size=4",
                                      "--set", "heldout_windows=2", "--set", "info_gain_contexts=2", *SMALL_CORPUS])
    assert result.exit_code == 0, result.output + repr(result.exception)
    files = list(tmp_path.glob("*.json"))
    assert len(files) == 1 and files[0].name.startswith("tiny-eval-"), result.output
    data = json.loads(files[0].read_text())
    assert data["kind"] == "rlp bench --eval" and (data["problems"], data["rows"]) == (6, 6 * 3)
    assert all(math.isfinite(x) for x in _finite_numbers(data))
    assert data["problems_per_s"] == pytest.approx(6 / data["generation_s"])
    phases = data["phases_s"]
    assert set(phases) == {"prefill", "thought", "block", "answer", "scoring", "other"}
    assert all(phases[p] > 0 for p in ("prefill", "thought", "block", "answer", "scoring"))
    assert sum(phases.values()) == pytest.approx(data["generation_s"])
    assert data["tokens"]["generated"] > 0 and data["intrinsic_s"] > 0
    assert data["intrinsic"]["heldout_perplexity"] > 1 and 0 <= data["accuracy"]["acc"] <= 1
    assert "problems/s" in result.output and "decode: thoughts" in result.output
    assert CliRunner().invoke(app, ["bench", "--eval", "--naive", "--model", "tiny", "--out", str(tmp_path)]).exit_code != 0
