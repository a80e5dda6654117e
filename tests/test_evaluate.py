"""`rlp eval`: suites, the scorer, the aggregation, batched generation, and the command end to end on `tiny`."""

import json
import math
import sys
import types

import pytest
import torch
import yaml
from typer.testing import CliRunner

from rlp_cli import evaluate as E
from rlp_cli import lm_eval_bridge as L
from rlp_cli import suites as S
from rlp_cli.config import load_config
from rlp_cli.data import CORPUS_SEED_OFFSET, LOGIC_TASKS, MATH_TASKS
from rlp_cli.errors import UserError
from rlp_cli.models import forward


def _settings(**kw):
    return S.SuiteSettings(**{"n_per_task": 3, **kw})


def test_suite_is_deterministic_for_a_seed_and_changes_with_it():
    a, _ = S.build_suite("quick", seed=0, settings=_settings())
    b, _ = S.build_suite("quick", seed=0, settings=_settings())
    c, _ = S.build_suite("quick", seed=1, settings=_settings())
    key = [(p.task, p.question, p.answer) for p in a]
    assert key == [(p.task, p.question, p.answer) for p in b]
    assert key != [(p.task, p.question, p.answer) for p in c]
    assert len(a) == 3 * len(S.QUICK_TASKS)
    assert {p.group for p in a} == {"math", "logic"}
    # the logic group has no arithmetic task
    assert not {p.task for p in a if p.group == "logic"} & {"chain_sum", "basic_arithmetic", "products", "gcd"}


def test_eval_seeds_never_meet_training_seeds():
    """reasoning-gym seeds item i of a dataset with seed s by Random(s + i): compare the seed intervals."""
    n_tasks = len(MATH_TASKS) + len(LOGIC_TASKS)
    max_run_seed, max_docs = 10_000, 1_000_000
    training_top = max_run_seed + CORPUS_SEED_OFFSET + n_tasks + max_docs  # largest item seed a corpus can use
    for eval_seed in (0, 1, 99):
        for task_index in range(len(S.FULL_TASKS)):
            first = S.task_seed(eval_seed, task_index)
            assert first > training_top
            if task_index:  # tasks' blocks do not overlap either
                assert first >= S.task_seed(eval_seed, task_index - 1) + S.TASK_STRIDE
    _, datasets = S.build_suite("quick", seed=2, settings=_settings(n_per_task=1))
    assert datasets["chain_sum"].seed == S.task_seed(2, 0)
    with pytest.raises(UserError):
        S.task_seed(-1, 0)


def test_scorer_agrees_with_each_generators_own_checker():
    _, datasets = S.build_suite("full", seed=0, settings=_settings(n_per_task=2))
    checked = 0
    for name, ds in datasets.items():
        for entry in (ds[0], ds[1]):
            answer = str(entry["answer"])
            for generated in (f" {answer}\nWorking: more text", f"\n\n{answer}  ", "0", "not an answer", "", answer[:-1]):
                extracted, value, correct = S.score(ds, entry, generated)
                assert extracted == S.extract_answer(generated)
                try:
                    own = float(ds.score_answer(extracted, entry))
                except Exception:  # some checkers raise on garbage; the suite scores that 0
                    own = 0.0
                assert value == own, (name, generated)
                assert correct == (own == 1.0)
                checked += 1
            assert S.score(ds, entry, f" {answer}\n")[2], name  # the right answer on the first line counts
    assert checked == 6 * 2 * len(S.FULL_TASKS)


def _records():
    """Task a (math): 4 problems, greedy 1,0,1,1; two samples each. b (math): 2 problems. c (logic): 1 problem."""
    rows = []
    def add(task, group, doc, greedy, samples):
        rows.append({"task": task, "group": group, "doc_id": doc, "sample": "greedy", "correct": greedy,
                     "score": float(greedy)})
        for k, s in enumerate(samples):
            rows.append({"task": task, "group": group, "doc_id": doc, "sample": k, "correct": s, "score": float(s)})
    for doc, (g, s) in enumerate([(1, (1, 0)), (0, (0, 0)), (1, (1, 1)), (1, (1, 0))]):
        add("a", "math", doc, g, s)
    add("b", "math", 0, 1, (1, 1))
    add("b", "math", 1, 0, (0, 1))
    add("c", "logic", 0, 0, (0, 0))
    return rows


def test_aggregation_matches_hand_computation():
    results, groups = S.aggregate(_records(), {"a": "math", "b": "math", "c": "logic"})
    a = results["a"]
    assert a["acc"] == pytest.approx(0.75)
    assert a["pass@1"] == pytest.approx((0.5 + 0 + 1 + 0.5) / 4)
    assert a["acc_stderr"] == pytest.approx(math.sqrt(0.75 * 0.25 / 3))  # sample std / sqrt(n), as lm-eval
    assert (a["n"], a["k"], a["group"]) == (4, 2, "math")
    assert results["b"]["acc"] == 0.5 and results["b"]["pass@1"] == pytest.approx(0.75)
    assert math.isnan(results["c"]["acc_stderr"])  # one problem: no stderr
    assert groups["math"]["acc"] == pytest.approx((0.75 + 0.5) / 2)
    assert groups["logic"]["acc"] == 0.0
    # Overall is the macro average over the three tasks, not the mean of the two group averages.
    assert groups["overall"]["acc"] == pytest.approx((0.75 + 0.5 + 0.0) / 3)
    assert groups["overall"]["pass@1"] == pytest.approx((0.5 + 0.75 + 0.0) / 3)
    assert groups["math"]["n_tasks"] == 2 and groups["overall"]["n_tasks"] == 3


@torch.no_grad()
def _naive_greedy(model, ids, steps, stop):
    out = []
    for _ in range(steps):
        x = torch.tensor([ids + out])
        logits, _ = forward(model, x, torch.ones_like(x), torch.arange(x.shape[1]).unsqueeze(0))
        token = int(logits[0, -1].argmax())
        out.append(token)
        if stop(token):
            break
    return out


def test_batched_greedy_generation_equals_one_sequence_at_a_time(tiny):
    """Left padding, the repeated cache and the thought/answer hand-over must not change the greedy row."""
    tok, model = tiny.tokenizer, tiny.model  # a Llama without dropout: train/eval mode does not matter
    prompts = [tok("Question: 2 + 2 =\n", add_special_tokens=False).input_ids + [tiny.think_open_id],
               tok("Question: spell the word cat backwards, please\n", add_special_tokens=False).input_ids
               + [tiny.think_open_id]]
    prefix = tok(S.ANSWER_PREFIX, add_special_tokens=False).input_ids
    rows = E.generate(model, tok, prompts, samples=2, think=True, thought_tokens=5, answer_prefix=prefix,
                      answer_tokens=4, temperature=1.0, close_id=tiny.think_close_id,
                      generator=torch.Generator().manual_seed(0))
    assert len(rows) == 2 * 3 and [r["greedy"] for r in rows] == [True, False, False] * 2
    for i, prompt in enumerate(prompts):
        thought = _naive_greedy(model, prompt, 5, lambda t: t == tiny.think_close_id)
        closed = thought[-1] == tiny.think_close_id
        thought_body = thought[:-1] if closed else thought
        assert rows[3 * i]["thought_ids"] == thought
        answer = _naive_greedy(model, prompt + thought_body + [tiny.think_close_id] + prefix, 4,
                               lambda t: "\n" in tok.decode([t]) or t == tok.eos_token_id)
        got = rows[3 * i]["answer_ids"]
        assert got == [t for t in answer if t != tok.eos_token_id][:len(got)] and len(got) >= 1


def test_eval_thoughts_obey_the_trainers_banned_tokens(tiny):
    """rlp eval's thoughts, greedy and sampled, come from the policy the trainer trains: no EOS, no <think>.
    A model pushed to write EOS in every thought writes none once run_suite bans it (models.banned_ids)."""
    import copy

    from rlp_cli.models import banned_ids

    tok, close, eos = tiny.tokenizer, tiny.think_close_id, tiny.tokenizer.eos_token_id
    model = copy.deepcopy(tiny.model)

    def likes_eos(module, args, out):
        out = out.clone()
        out[..., eos] += 50.0
        return out

    model.lm_head.register_forward_hook(likes_eos)
    problems, datasets = S.build_suite("quick", seed=0, settings=_settings(n_per_task=1))
    settings = _settings(n_per_task=1, thought_tokens=4, answer_tokens=2)
    records = E.run_suite(model, tok, problems, datasets, settings, prompt_ids=[], open_id=tiny.think_open_id,
                          close_id=close, generator=torch.Generator().manual_seed(0))
    assert {r["sample"] for r in records} >= {"greedy", 0}
    assert not any(tok.eos_token in r["thought"] for r in records)
    # the ids, through generate: with the ban none is banned; without it (None) the model writes EOS
    banned = banned_ids(tok, tiny.think_open_id, close, model.config.vocab_size)
    assert eos in banned.tolist()
    prompts = E.suite_prompts(tok, problems[:2], [], tiny.think_open_id)
    prefix = tok(S.ANSWER_PREFIX, add_special_tokens=False).input_ids
    kw = dict(samples=1, think=True, thought_tokens=4, answer_prefix=prefix, answer_tokens=2, temperature=1.0,
              close_id=close)
    ruled = E.generate(model, tok, prompts, generator=torch.Generator().manual_seed(0), banned=banned, **kw)
    assert all(len(r["thought_ids"]) == 4 and not set(r["thought_ids"]) & set(banned.tolist()) for r in ruled)
    free = E.generate(model, tok, prompts, generator=torch.Generator().manual_seed(0), **kw)
    assert all(eos in r["thought_ids"] for r in free)


def test_batching_across_tasks_and_dropping_finished_rows_keep_the_greedy_rows(tiny, monkeypatch):
    """Prompts of all tasks in one batch, rows that finished their answer leaving it: every greedy row equals
    the same prompt generated alone (and a plain one-sequence-at-a-time forward)."""
    import copy

    import rlp_cli.cursor as C
    from rlp_cli.models import LineTokens

    tok, close = tiny.tokenizer, tiny.think_close_id
    model = copy.deepcopy(tiny.model)  # the tiny model repeats one token: noise makes its answers differ
    noise = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=noise) * 0.2)
    vocab = model.get_output_embeddings().weight.shape[0]
    # a quarter of the vocabulary "ends a line", so answers end after different numbers of tokens
    lines = LineTokens(newline=torch.arange(vocab) % 4 == 0, text_first=torch.ones(vocab, dtype=torch.bool),
                       blank=torch.zeros(vocab, dtype=torch.bool))
    problems, _ = S.build_suite("quick", seed=0, settings=_settings(n_per_task=2))
    prompts = E.suite_prompts(tok, problems, [], tiny.think_open_id)
    prefix = tok(S.ANSWER_PREFIX, add_special_tokens=False).input_ids
    kw = dict(samples=1, think=True, thought_tokens=4, answer_prefix=prefix, answer_tokens=8, temperature=1.0,
              close_id=close, lines=lines)
    kept = []
    keep = C.Cursor.keep
    monkeypatch.setattr(C.Cursor, "keep", lambda self, index: (kept.append(len(index)), keep(self, index))[1])
    batched = E.generate(model, tok, prompts, generator=torch.Generator().manual_seed(0), **kw)[::2]
    assert kept and len({len(r["answer_ids"]) for r in batched}) > 2, "the test needs rows that finish early"
    kept.clear()
    for prompt, row in zip(prompts, batched):
        alone = E.generate(model, tok, [prompt], generator=torch.Generator().manual_seed(1), drop_finished=False,
                           **kw)[0]
        assert (alone["thought_ids"], alone["answer_ids"]) == (row["thought_ids"], row["answer_ids"])
        thought = _naive_greedy(model, prompt, 4, lambda t: t == close)
        body = thought[:-1] if thought[-1] == close else thought
        answer = _naive_greedy(model, prompt + body + [close] + prefix, 8,
                               lambda t: t % 4 == 0 or t in (close, tok.eos_token_id))
        assert (row["thought_ids"], row["answer_ids"]) == (thought, [t for t in answer if t != tok.eos_token_id])
    assert not kept

    # run_suite: batches across tasks give each greedy record what one problem per batch gives
    def greedy(batch_size):
        settings = _settings(n_per_task=2, thought_tokens=3, answer_tokens=3, batch_size=batch_size)
        _, datasets = S.build_suite("quick", seed=0, settings=settings)
        records = E.run_suite(model, tok, problems, datasets, settings, prompt_ids=[], open_id=tiny.think_open_id,
                              close_id=close, generator=torch.Generator().manual_seed(0))
        return [(r["task"], r["doc_id"], r["thought"], r["generated"]) for r in records if r["sample"] == "greedy"]

    assert greedy(7) == greedy(1)


def test_settings_split_between_suite_and_run_config():
    settings, cfg = S.parse_settings("quick", ["n_per_task=3", "eval.samples=0", "tasks=chain_sum,gcd",
                                               "data.corpus=general", "think=false"])
    assert (settings.n_per_task, settings.samples, settings.think) == (3, 0, False)
    assert settings.tasks == ["chain_sum", "gcd"]
    assert cfg == ["data.corpus=general"]
    assert S.SUITES["quick"][1].n_per_task == 8  # the suite's defaults are not mutated
    for bad in (["n_per_tsk=3"], ["n_per_task=many"], ["think=3"], ["thought_tokens=0"]):
        with pytest.raises(UserError):
            S.parse_settings("quick", bad)


def test_lm_eval_bridge_converts_the_harness_output(monkeypatch):
    """A fake harness: the bridge hands it the loaded model through HFLM and converts what it returns."""
    fake, fake_hf = types.ModuleType("lm_eval"), types.ModuleType("lm_eval.models.huggingface")
    calls = {}

    class HFLM:
        def __init__(self, **kw):
            calls["hflm"] = kw

    def simple_evaluate(**kw):
        calls.update(kw)
        return {"results": {"gsm8k": {"alias": "gsm8k", "exact_match,strict-match": 0.25,
                                      "exact_match_stderr,strict-match": 0.05, "exact_match,flexible-extract": 0.3},
                            "arc_easy": {"acc,none": 0.5, "acc_stderr,none": 0.1, "acc_norm,none": 0.45},
                            "hellaswag": {"acc,none": 0.75, "acc_stderr,none": "N/A"}},
                "group_subtasks": {"gsm8k": [], "arc_easy": [], "hellaswag": []},
                "configs": {"gsm8k": {"num_fewshot": 5}}, "versions": {"gsm8k": 3.0},
                "n-samples": {"gsm8k": {"original": 1319, "effective": 10}},
                "samples": {"gsm8k": [{"doc_id": 0, "target": "4", "filtered_resps": ["4"], "metrics": ["exact_match"],
                                       "exact_match": 1.0}]}}

    fake.simple_evaluate, fake.__version__, fake_hf.HFLM = simple_evaluate, "9.9.9", HFLM
    monkeypatch.setitem(sys.modules, "lm_eval", fake)
    monkeypatch.setitem(sys.modules, "lm_eval.models", types.ModuleType("lm_eval.models"))
    monkeypatch.setitem(sys.modules, "lm_eval.models.huggingface", fake_hf)
    model, tok, task_manager = object(), object(), object()
    results, groups, configs, versions, n_samples, samples = L.run_lm_eval(
        model, tok, ["gsm8k", "arc_easy", "hellaswag"], 3, S.SuiteSettings(lm_eval_limit=10, lm_eval_batch_size=4),
        task_manager)
    assert calls["hflm"]["pretrained"] is model and calls["hflm"]["tokenizer"] is tok
    assert calls["hflm"]["batch_size"] == 4 and isinstance(calls["model"], HFLM)
    assert calls["task_manager"] is task_manager and calls["tasks"] == ["gsm8k", "arc_easy", "hellaswag"]
    assert calls["limit"] == 10 and calls["random_seed"] == 3
    assert results["gsm8k"]["acc"] == 0.25 and results["gsm8k"]["acc_stderr"] == 0.05
    assert results["gsm8k"]["metric"] == "exact_match,strict-match" and results["gsm8k"]["n"] == 10
    assert results["arc_easy"]["acc"] == 0.5  # acc preferred to acc_norm
    assert results["hellaswag"]["acc_stderr"] is None  # the harness's "N/A"
    assert {r["lm_eval_version"] for r in results.values()} == {L.lm_eval_version(fake)}
    assert groups["overall"]["acc"] == pytest.approx((0.25 + 0.5 + 0.75) / 3)
    assert samples[0]["exact_match"] == 1.0 and versions == {"gsm8k": 3.0}


def test_lm_eval_suite_without_the_harness_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # import lm_eval -> ImportError
    with pytest.raises(UserError, match="pip install lm-eval.*rlp_addition"):
        L.run_lm_eval(object(), object(), ["gsm8k"], 0, S.SuiteSettings())
    with pytest.raises(UserError, match="pip install lm-eval"):
        E.evaluate("tiny", suite="lm-eval:rlp_addition")


@pytest.fixture
def run_dir(tmp_path, tiny):
    """A finished run folder as `rlp train` leaves it, with the tiny model as final/."""
    run = tmp_path / "run"
    tiny.model.save_pretrained(run / "final")
    tiny.tokenizer.save_pretrained(run / "final")
    (run / "config.yaml").write_text(yaml.safe_dump(load_config("tiny").to_dict()))
    (run / "status.json").write_text(json.dumps({"status": "completed", "step": 4}))
    return run


def test_rlp_eval_end_to_end_on_tiny(run_dir):
    from rlp_cli.cli import app

    args = ["eval", str(run_dir), "--device", "cpu", "--set", "n_per_task=2", "--set", "samples=1",
            "--set", "thought_tokens=4", "--set", "answer_tokens=4", "--set", "tasks=chain_sum,syllogism",
            "--set", "heldout_windows=4", "--set", "info_gain_contexts=2", "--set", "info_gain_rollouts=2"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output + repr(result.exception)
    ev = json.loads((run_dir / "eval.json").read_text())
    for key in ("results", "groups", "intrinsic", "configs", "versions", "n-samples", "model", "suite", "provenance",
                "date", "total_evaluation_time_seconds"):
        assert key in ev, key
    assert set(ev["results"]) == {"chain_sum", "syllogism"}
    assert ev["results"]["chain_sum"]["n"] == 2 and ev["results"]["chain_sum"]["group"] == "math"
    assert set(ev["groups"]) == {"math", "logic", "overall"} and ev["groups"]["overall"]["n_tasks"] == 2
    assert ev["model"]["checkpoint_sha256"] == E.checkpoint_hash(run_dir / "final")
    assert ev["suite"] == {**ev["suite"], "name": "quick", "version": S.SUITE_VERSION, "seed": 0}
    intrinsic = ev["intrinsic"]
    assert intrinsic["heldout_perplexity"] > 1 and intrinsic["heldout_windows"] == 4
    assert math.isfinite(intrinsic["heldout_info_gain"]) and "evaluated model itself" in intrinsic["info_gain_baseline"]
    assert ev["provenance"]["versions"]["torch"] == torch.__version__
    samples = [json.loads(line) for line in (run_dir / "eval_samples.jsonl").read_text().splitlines()]
    assert len(samples) == 2 * 2 * 2  # tasks x problems x (greedy + 1 sample)
    assert {s["sample"] for s in samples} == {"greedy", 0}

    # Same command again: the matching eval.json is reused, not recomputed.
    date = ev["date"]
    assert CliRunner().invoke(app, args).exit_code == 0
    assert json.loads((run_dir / "eval.json").read_text())["date"] == date
    # --force recomputes, with the same numbers for the same seed.
    assert CliRunner().invoke(app, args + ["--force"]).exit_code == 0
    again = json.loads((run_dir / "eval.json").read_text())
    assert again["results"] == ev["results"] and again["intrinsic"]["heldout_info_gain"] == intrinsic["heldout_info_gain"]


def test_a_run_without_a_final_model_is_a_clear_error(run_dir):
    import shutil

    shutil.rmtree(run_dir / "final")
    (run_dir / "status.json").write_text(json.dumps({"status": "running", "step": 2}))
    with pytest.raises(UserError, match="no final model.*status: running"):
        E.evaluate(run_dir)
    with pytest.raises(UserError, match="unknown suite"):
        E.evaluate("tiny", suite="huge")


def test_lm_eval_bridge_end_to_end_on_a_local_task(tmp_path):
    """Only where lm-evaluation-harness is installed: a task YAML over a local jsonl file, no downloads."""
    pytest.importorskip("lm_eval")
    rows = [{"question": f"{a} + {b} =", "answer": str(a + b), "choices": [str(a + b), str(a * b + 7)], "label": 0}
            for a, b in [(1, 2), (3, 4), (10, 5), (2, 9)]]
    (tmp_path / "arith.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "rlp_test_mc.yaml").write_text(yaml.safe_dump({
        "task": "rlp_test_mc", "dataset_path": "json", "dataset_kwargs": {"data_files": {"test": str(tmp_path / "arith.jsonl")}},
        "test_split": "test", "output_type": "multiple_choice", "doc_to_text": "Question: {{question}}\nAnswer:",
        "doc_to_choice": "{{choices}}", "doc_to_target": "label",
        "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}], "metadata": {"version": 1.0}}))
    ev = E.evaluate("tiny", suite="lm-eval:rlp_test_mc", out=tmp_path / "eval.json", device="cpu",
                    overrides=[f"lm_eval_include_path={tmp_path}", "heldout_windows=0"])
    assert ev["results"]["rlp_test_mc"]["n"] == 4 and ev["results"]["rlp_test_mc"]["metric"] == "acc,none"
    assert 0.0 <= ev["groups"]["overall"]["acc"] <= 1.0
    assert len((tmp_path / "eval_samples.jsonl").read_text().splitlines()) == 4
