"""The thought format (restatement, banned tokens, word-boundary predictions), the probe, and the trainer's
guards (float32 masters and EMA, several updates per batch, non-finite values), mostly on the tiny model."""

import copy
import dataclasses
import json

import numpy as np
import pytest
import torch

from rlp_cli.config import load_config
from rlp_cli.data import answer_positions, arithmetic_documents, select_positions
from rlp_cli.models import token_classes
from rlp_cli.rollout import Context, sample_thoughts, token_logprobs
from rlp_cli.scoring import empty_thought_logprobs, naive_s_pred
from rlp_cli.runio import read_jsonl
from rlp_cli.update import policy_logprobs
from rlp_cli.run import train
from rlp_cli.train import NonFiniteError, Trainer

G = 3


def _classes(tiny):
    return token_classes(tiny.tokenizer, tiny.think_open_id, tiny.think_close_id,
                         tiny.model.get_output_embeddings().weight.shape[0])


def _contexts(tiny, k=3, horizon=2):
    tok = tiny.tokenizer
    docs = ["Question: What is 12 + 30?\nAnswer: 42", "The river runs north through the old valley and into the sea."]
    windows = [tok(d, add_special_tokens=False).input_ids for d in docs]
    return windows, [Context(prompt=w[:t] + [tiny.think_open_id], targets=w[t:t + horizon], continuation=w[t:t + 8],
                             doc_index=i, position=t, bridge=w[t - k:t])
                     for i, (w, t) in enumerate(zip(windows, [9, 6]))]


def _close_likely(tiny, logit=4.0):
    """A copy of the tiny model for which </think> is likely, so thoughts are ragged and some close."""
    model = copy.deepcopy(tiny.model)
    bias = torch.zeros(model.config.vocab_size)
    bias[tiny.think_close_id] = logit
    model.lm_head.register_forward_hook(lambda module, args, out: out + bias)
    return model


@pytest.mark.parametrize("k", [0, 3])
def test_restated_tokens_score_x_t_the_same_from_the_cache_and_by_reencoding(tiny, k):
    model = _close_likely(tiny)
    _, contexts = _contexts(tiny, k=k)
    ro = sample_thoughts(model, contexts, num_rollouts=G, max_thought_tokens=6, temperature=1.0,
                         close_id=tiny.think_close_id, pad_id=tiny.tokenizer.pad_token_id,
                         generator=torch.Generator().manual_seed(1), score_targets=True,
                         token_classes=_classes(tiny))
    assert len(set(ro.thought_lengths.tolist())) > 1 and ro.closed.any()  # ragged and closed thoughts
    naive, _ = naive_s_pred(model, contexts, ro, G, tiny.think_close_id, tiny.tokenizer.pad_token_id)
    assert torch.allclose(ro.s_pred, naive, atol=1e-5)
    # The restatement is context, not action: the update's actions are the sampled thought tokens only.
    assert torch.equal(ro.action_mask.sum(1), ro.thought_lengths)


def test_the_restatement_changes_the_score(tiny):
    _, with_bridge = _contexts(tiny, k=3)
    without = [dataclasses.replace(c, bridge=[]) for c in with_bridge]
    close, pad = tiny.think_close_id, tiny.tokenizer.pad_token_id
    a, _ = empty_thought_logprobs(tiny.model, with_bridge, close, pad)
    b, _ = empty_thought_logprobs(tiny.model, without, close, pad)
    assert not torch.allclose(a, b)
    # S_empty by hand: prompt, </think>, bridge, then the targets
    c = with_bridge[0]
    ids = torch.tensor([c.prompt + [close] + c.bridge + c.targets])
    logits = tiny.model(ids).logits[0].float()
    start = len(c.prompt) + 1 + len(c.bridge)
    want = torch.log_softmax(logits[start - 1:start + 1], -1)[torch.arange(2), torch.tensor(c.targets)]
    assert torch.allclose(a[0], want, atol=1e-5)


def test_banned_tokens_are_never_sampled_and_have_zero_probability(tiny):
    classes = _classes(tiny)
    banned = torch.tensor([tiny.tokenizer.eos_token_id, tiny.think_open_id])
    classes = dataclasses.replace(classes, banned=banned)
    model = copy.deepcopy(tiny.model)
    bias = torch.zeros(model.config.vocab_size)
    bias[banned] = 8.0  # without the ban these would be most of the samples
    model.lm_head.register_forward_hook(lambda module, args, out: out + bias)
    _, contexts = _contexts(tiny)
    ro = sample_thoughts(model, contexts, num_rollouts=4, max_thought_tokens=8, temperature=1.0,
                         close_id=tiny.think_close_id, pad_id=tiny.tokenizer.pad_token_id,
                         generator=torch.Generator().manual_seed(0), score_targets=True, token_classes=classes)
    sampled = ro.seq[ro.action_mask.bool()]
    assert not torch.isin(sampled, banned).any()
    # The update scores the same restricted distribution: its log-probs equal the sampler's.
    lp, _, _ = policy_logprobs(model, contexts, ro, 4, 1.0, tiny.tokenizer.pad_token_id, True, banned)
    m = ro.action_mask.bool()
    assert torch.allclose(lp[m], ro.sample_logp[m], atol=1e-4) and torch.isfinite(lp).all()


def test_token_logprobs_with_banned_tokens_match_a_masked_log_softmax():
    torch.manual_seed(0)
    logits = torch.randn(3, 5, 40, requires_grad=True)
    tokens = torch.randint(3, 40, (3, 5))
    banned = torch.tensor([0, 1, 2])
    lp, _ = token_logprobs(logits, tokens, 0.7, banned)
    ref = torch.log_softmax((logits / 0.7).index_fill(-1, banned, float("-inf")), -1).gather(-1, tokens[..., None])[..., 0]
    assert torch.allclose(lp, ref, atol=1e-5)
    (g1,) = torch.autograd.grad(lp.sum(), logits)
    (g2,) = torch.autograd.grad(ref.sum(), logits)
    assert torch.allclose(g1, g2, atol=1e-5) and (g1[..., :3] == 0).all()


def test_rpt_prediction_stops_where_the_next_word_begins(tiny):
    classes = _classes(tiny)
    _, contexts = _contexts(tiny, k=3, horizon=1)
    ro = sample_thoughts(tiny.model, contexts, num_rollouts=4, max_thought_tokens=4, temperature=1.0,
                         close_id=tiny.think_close_id, pad_id=tiny.tokenizer.pad_token_id,
                         generator=torch.Generator().manual_seed(0), score_targets=False, prediction_tokens=8,
                         token_classes=classes)
    for ids in ro.prediction_ids:
        # at most one word: no token after the first word-bearing one starts with white space
        seen_word = False
        for t in ids:
            assert not (seen_word and bool(classes.word_start[t])), tiny.tokenizer.decode(ids)
            seen_word |= not bool(classes.blank[t])


def test_answer_positions_and_the_answer_rule():
    marker, blank = [7, 8], {9}
    window = [1, 2, 7, 8, 9, 5, 6, 3]
    assert answer_positions(window, marker, blank) == [5]  # the blank token after the marker is skipped
    rng = np.random.default_rng(0)
    assert select_positions("answer", len(window), 2, 7, rng, answers=[5]) == [5]
    assert len(select_positions("answer", len(window), 2, 7, rng, answers=[])) == 1  # falls back to random_one
    docs = arithmetic_documents(50, 0)
    a, b = map(int, docs[0].split("What is ")[1].split("?")[0].split(" + "))
    assert docs[0].endswith(f"Answer: {a + b}") and docs == arithmetic_documents(50, 0)


def test_a_restatement_longer_than_the_minimum_prefix_is_a_clear_error():
    from rlp_cli.errors import UserError

    with pytest.raises(UserError) as info:
        load_config("tiny", ["objective.restate_tokens=20"])
    message = str(info.value)
    assert "objective.restate_tokens (20) cannot exceed data.min_prefix_tokens (8)" in message
    assert "'model'" not in message  # names the keys, does not dump the whole config


def test_trainer_scores_the_first_answer_token_with_the_format(tiny):
    cfg = load_config("tiny", ["data.corpus=arithmetic", "data.positions=answer", "objective.restate_tokens=4"])
    tr = Trainer(cfg)
    w = tr.tok("Question: What is 47 + 38?\nAnswer: 85", add_special_tokens=False).input_ids
    [t] = tr.positions_in(w, np.random.default_rng(0))
    c = tr.context_at(w, t, 0)
    assert tr.tok.decode(w[t:]).strip().startswith("8") and tr.tok.decode(c.targets).strip() == tr.tok.decode(w[t:t + 1]).strip()
    assert c.bridge == w[t - 4:t] and c.prompt == w[:t] + [tr.open_id]


def test_thought_prompt_conditions_both_sides_of_the_reward(tiny):
    """S_ema sees the same instruction as S_pred, on the fast and on the naive path."""
    got = {}
    for fast in (True, False):
        cfg = load_config("tiny", ["objective.thought_prompt=Think first.", f"fast_path={fast}"])
        tr = Trainer(cfg)
        windows = tr.stream.next_batch(2)
        contexts = tr.contexts_for(windows, None)
        got[fast], _ = tr.no_think_logprobs(tr.model, windows, contexts)
        c = contexts[0]
        ids = torch.tensor([tr.prompt_ids + windows[c.doc_index][:c.position + 1]])
        want = torch.log_softmax(tr.model(ids).logits[0, -2].float(), -1)[c.targets[0]]
        assert torch.allclose(got[fast][0, 0], want, atol=1e-5)
    assert torch.allclose(got[True], got[False], atol=1e-5)


def test_probe_is_deterministic_and_shared_across_seeds(tiny):
    a = Trainer(load_config("tiny", ["seed=0"]))
    b = Trainer(load_config("tiny", ["seed=1"]))
    from rlp_cli.probe import Probe

    pa, pb = Probe(a), Probe(b)
    assert pa.ids == pb.ids and len(pa) > 4  # the same held-out positions whatever the run's seed
    first, again = pa.run(0), pa.run(0)
    assert first == again  # same weights, same thoughts, same numbers
    a.train_step()
    after = pa.run(1)
    assert after["items"] == first["items"] and after["s_pred"] != first["s_pred"]
    gains = np.array(first["info_gain"])
    assert np.allclose(gains, np.array(first["s_pred"]) - np.array(first["s_ema"]), atol=1e-5)
    assert first["s_nothink"] == first["s_ema"]  # before the first step the model is its own baseline
    assert after["s_nothink"] != after["s_ema"]  # then the EMA teacher lags the model


def test_ema_and_optimizer_keep_float32_masters_under_bfloat16(tiny):
    cfg = load_config("tiny", ["model.dtype=bfloat16", "optim.lr=1e-4", "objective.ema_tau=0.999",
                               "log.probe_every=0"])
    tr = Trainer(cfg)
    assert tr.master.copied and all(p.dtype == torch.float32 for p in tr.master.params)
    tr.train_step()
    teacher0 = [p.detach().clone() for p in tr.teacher.parameters()]
    assert all(p.dtype == torch.float32 for p in teacher0)
    for _ in range(3):
        tr.train_step()
    moved = sum(int((p != q).sum()) for p, q in zip(tr.teacher.parameters(), teacher0))
    total = sum(p.numel() for p in teacher0)
    assert moved > 0.5 * total  # a bf16 lerp by 1e-3 moves none; a float32 one moves nearly all
    # the bf16 model holds its float32 masters, rounded
    for p, m in zip(tr.model.parameters(), tr.master.params):
        assert p.dtype == torch.bfloat16 and torch.equal(p, m.to(torch.bfloat16))


def test_several_updates_per_batch_make_the_clip_act(tiny):
    one = Trainer(load_config("tiny", ["optim.lr=0.05", "log.probe_every=0"]))
    m1, _ = one.train_step()
    assert m1["clip_ratio/low_mean"] == 0 and m1["clip_ratio/high_mean"] == 0  # one update: rho = 1 exactly
    many = Trainer(load_config("tiny", ["optim.lr=0.05", "objective.num_iterations=4", "log.probe_every=0"]))
    m4, _ = many.train_step()
    assert m4["clip_ratio/low_mean"] + m4["clip_ratio/high_mean"] > 0


def test_a_diverging_run_fails_at_that_step_with_strict_json(tiny, tmp_path):
    cfg = load_config("tiny", ["optim.lr=1e8", "budget.steps=6", "log.probe_every=0", "log.checkpoint_every=1"])
    with pytest.raises(NonFiniteError) as info:
        train(cfg, tmp_path / "run", progress=False)
    status = json.loads((tmp_path / "run" / "status.json").read_text())
    assert status["status"] == "failed" and "non-finite" in status["error"] and status["step"] == info.value.step
    for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines():
        json.loads(line, parse_constant=lambda c: pytest.fail(f"bare {c} in metrics.jsonl"))
    assert len(read_jsonl(tmp_path / "run" / "metrics.jsonl")) == info.value.step - 1  # the bad step is not logged


@pytest.mark.slow
def test_oracle_a_correct_thought_earns_more_than_a_wrong_one():
    """On the arithmetic corpus, under the default format, the right sum in the thought is rewarded above a wrong one."""
    cfg = load_config("default", ["data.num_documents=40", "log.probe_every=0"])
    tr = Trainer(cfg)
    rng = np.random.default_rng(5)
    wins = 0
    pairs = rng.integers(10, 100, size=(12, 2)).tolist()
    for a, b in pairs:
        w = tr.tok(f"Question: What is {a} + {b}?\nAnswer: {a + b}", add_special_tokens=False).input_ids
        [t] = tr.positions_in(w, rng)
        c = tr.context_at(w, t, 0)

        def score(thought: str) -> float:
            ids = c.prompt + tr.tok(thought, add_special_tokens=False).input_ids + [tr.close_id] + c.bridge + c.targets
            with torch.no_grad():
                logits = tr.model(torch.tensor([ids])).logits[0, -2].float()
            return float(torch.log_softmax(logits, -1)[c.targets[0]])

        right = str(a + b)
        wrong = str(int(right[0]) % 9 + 1) + right[1:]  # wrong in the first digit, the one that is scored
        wins += score(f"{a} + {b} = {right}") > score(f"{a} + {b} = {wrong}")
    assert wins >= 11, wins  # the reward's S_ema is shared by both thoughts, so S_pred decides
