"""The fast path (shared prefix caches, scoring from the generation cache) against plain forwards."""

import copy

import numpy as np
import pytest
import torch

from rlp_cli.config import load_config
from rlp_cli.models import THINK_CLOSE, THINK_OPEN
from rlp_cli.rollout import (Context, naive_context_logprobs, naive_s_pred, policy_logprobs, sample_thoughts,
                             window_logprobs)
from rlp_cli.train import Trainer

G = 3


def _contexts(tiny, horizon=1):
    tok = tiny.tokenizer
    docs = ["Question: 12 + 30 = ?\nWorking: 12 + 30 = 42\nAnswer: 42",
            "The river runs north through the old valley and into the sea."]
    windows = [tok(d, add_special_tokens=False).input_ids for d in docs]
    contexts = []
    for i, (w, t) in enumerate(zip(windows, [9, 5])):  # different prefix lengths: padding is exercised
        contexts.append(Context(prompt=w[:t] + [tiny.think_open_id], targets=w[t:t + horizon],
                                continuation=w[t:t + 8], doc_index=i, position=t))
    return windows, contexts


def _sample(tiny, contexts, seed=0, **kw):
    gen = torch.Generator().manual_seed(seed)
    args = dict(num_rollouts=G, max_thought_tokens=6, temperature=1.0, close_id=tiny.think_close_id,
                pad_id=tiny.tokenizer.pad_token_id, eos_id=tiny.tokenizer.eos_token_id, generator=gen,
                score_targets=True)
    args.update(kw)
    return sample_thoughts(tiny.model, contexts, **args)


def test_think_tokens_added_with_embeddings_from_their_pieces(tiny):
    tok = tiny.tokenizer
    assert tok.convert_ids_to_tokens(tiny.think_open_id) == THINK_OPEN
    assert tok.convert_ids_to_tokens(tiny.think_close_id) == THINK_CLOSE
    assert tok(THINK_OPEN + "x", add_special_tokens=False).input_ids[0] == tiny.think_open_id
    emb = tiny.model.get_input_embeddings().weight
    assert emb.shape[0] == len(tok)
    assert emb[tiny.think_open_id].abs().sum() > 0  # not left at zero
    assert not torch.equal(emb[tiny.think_open_id], emb[tiny.think_close_id])


def test_s_pred_from_the_generation_cache_equals_reencoding(tiny):
    windows, contexts = _contexts(tiny, horizon=2)
    ro = _sample(tiny, contexts)
    naive, _ = naive_s_pred(tiny.model, contexts, ro, G, tiny.think_close_id, tiny.tokenizer.pad_token_id)
    assert ro.s_pred.shape == (2 * G, 2)
    assert torch.allclose(ro.s_pred, naive, atol=1e-5)


def test_ragged_thoughts_score_the_same_both_ways(tiny):
    """Make </think> likely so rollouts stop at different lengths; padding must not leak."""
    windows, contexts = _contexts(tiny)
    model = copy.deepcopy(tiny.model)
    bias = torch.zeros(model.config.vocab_size)
    bias[tiny.think_close_id] = 5.0  # p(</think>) ~ 0.2 per step
    model.lm_head.register_forward_hook(lambda module, args, out: out + bias)
    gen = torch.Generator().manual_seed(3)
    ro = sample_thoughts(model, contexts, num_rollouts=G, max_thought_tokens=8, temperature=1.0,
                         close_id=tiny.think_close_id, pad_id=tiny.tokenizer.pad_token_id,
                         eos_id=tiny.tokenizer.eos_token_id, generator=gen, score_targets=True)
    lengths = ro.thought_lengths.tolist()
    assert len(set(lengths)) > 1 and ro.closed.any(), lengths  # the scenario really is ragged
    naive, _ = naive_s_pred(model, contexts, ro, G, tiny.think_close_id, tiny.tokenizer.pad_token_id)
    assert torch.allclose(ro.s_pred, naive, atol=1e-5)
    fast_lp, _, _ = policy_logprobs(model, contexts, ro, G, 1.0, tiny.tokenizer.pad_token_id, fast=True)
    m = ro.action_mask.bool()
    assert torch.allclose(fast_lp[m], ro.sample_logp[m], atol=1e-4)


def test_ema_scores_one_forward_per_document_equal_per_context(tiny):
    windows, contexts = _contexts(tiny)
    per_window, _ = window_logprobs(tiny.model, windows, tiny.tokenizer.pad_token_id)
    fast = torch.stack([per_window[c.doc_index][c.position:c.position + 1] for c in contexts])
    naive, _ = naive_context_logprobs(tiny.model, windows, contexts, tiny.tokenizer.pad_token_id)
    assert torch.allclose(fast, naive, atol=1e-5)
    # and by a plain HF forward without padding
    w, c = windows[1], contexts[1]
    logits = tiny.model(torch.tensor([w[:c.position]])).logits[0, -1]
    plain = torch.log_softmax(logits, -1)[w[c.position]]
    assert fast[1, 0].item() == pytest.approx(plain.item(), abs=1e-5)


def test_update_logprobs_and_gradients_fast_equal_naive(tiny):
    windows, contexts = _contexts(tiny)
    ro = _sample(tiny, contexts, seed=1)
    adv = torch.linspace(-1, 1, ro.seq.shape[0])
    grads = {}
    for fast in (True, False):
        model = copy.deepcopy(tiny.model)
        lp, _, _ = policy_logprobs(model, contexts, ro, G, 1.0, tiny.tokenizer.pad_token_id, fast=fast)
        m = ro.action_mask.float()
        loss = -((lp * m).sum(-1) / m.sum(-1) * adv).mean()
        loss.backward()
        grads[fast] = (lp.detach(), loss.item(), {n: p.grad.clone() for n, p in model.named_parameters()})
    (lp_f, loss_f, g_f), (lp_n, loss_n, g_n) = grads[True], grads[False]
    m = ro.action_mask.bool()
    assert torch.allclose(lp_f[m], lp_n[m], atol=1e-5)
    assert loss_f == pytest.approx(loss_n, abs=1e-6)
    for name in g_f:
        assert torch.allclose(g_f[name], g_n[name], atol=1e-5, rtol=1e-4), name
    # the behaviour log-probs recorded while sampling are the same policy's
    assert torch.allclose(lp_f[m], ro.sample_logp[m], atol=1e-4)


def test_gradient_flows_only_through_sampled_thought_tokens(tiny):
    """d loss / d logits is zero at every position that does not predict a sampled thought token:
    the context and the scored token x_t contribute nothing."""
    windows, contexts = _contexts(tiny)
    ro = _sample(tiny, contexts, seed=2)
    model = copy.deepcopy(tiny.model)
    captured = {}

    def keep_logits(module, args, output):
        output.retain_grad()
        captured["logits"] = output

    handle = model.lm_head.register_forward_hook(keep_logits)
    from rlp_cli.objective import clipped_surrogate

    lp, _, _ = policy_logprobs(model, contexts, ro, G, 1.0, tiny.tokenizer.pad_token_id, fast=False)
    handle.remove()
    adv = torch.randn(ro.seq.shape[0])
    clipped_surrogate(lp, lp.detach(), adv, ro.action_mask, 0.2, 0.2).backward()
    grad = captured["logits"].grad.abs().sum(-1)  # [N, T]
    for i in range(ro.seq.shape[0]):
        p = len(contexts[i // G].prompt)
        n_act = int(ro.action_mask[i].sum())
        expected = torch.zeros(grad.shape[1], dtype=torch.bool)
        expected[p - 1:p - 1 + n_act] = True  # logits at p-1+u predict thought token u
        assert (grad[i][~expected] == 0).all()
        assert (grad[i][expected] > 0).all()


def test_logged_reward_equals_a_plain_recomputation():
    """The trainer's info-gain reward = log p(x_t | x_<t, thought) - log p_ema(x_t | x_<t), recomputed with
    plain, unpadded Hugging Face forwards of the weights as they were before the update."""
    cfg = load_config("tiny", ["budget.steps=1", "objective.num_rollouts=3", "optim.batch_documents=3"])
    trainer = Trainer(cfg)
    before = copy.deepcopy(trainer.model).eval()  # theta before the step; also the lazily initialised EMA
    metrics, _ = trainer.train_step()
    batch = trainer.last_batch
    ro, contexts, windows = batch["rollouts"], batch["contexts"], batch["windows"]
    recomputed = []
    with torch.no_grad():
        for i in range(ro.seq.shape[0]):
            c = contexts[i // 3]
            thought = ro.seq[i, :int(ro.thought_lengths[i])].tolist()
            if not bool(ro.closed[i]):
                thought.append(trainer.close_id)
            ids = torch.tensor([c.prompt + thought])
            s_pred = torch.log_softmax(before(ids).logits[0, -1], -1)[c.targets[0]]
            w = windows[c.doc_index]
            s_ema = torch.log_softmax(before(torch.tensor([w[:c.position]])).logits[0, -1], -1)[w[c.position]]
            recomputed.append((s_pred - s_ema).item())
    assert np.allclose(batch["rewards"].tolist(), recomputed, atol=1e-4)
    assert metrics["reward"] == pytest.approx(float(np.mean(recomputed)), abs=1e-4)
    assert metrics["rlp/info_gain"] == pytest.approx(float(np.mean(recomputed)), abs=1e-4)
    assert not batch["advantages"].requires_grad


def test_rpt_rollouts_write_a_prediction_after_think(tiny):
    windows, contexts = _contexts(tiny)
    ro = _sample(tiny, contexts, score_targets=False, prediction_tokens=4)
    assert len(ro.prediction_ids) == 2 * G
    for i in range(2 * G):
        row = ro.seq[i, :int(ro.seq_mask[i].sum())].tolist()
        k = row.index(tiny.think_close_id)
        assert [t for t in row[k + 1:] if t != tiny.tokenizer.eos_token_id] == ro.prediction_ids[i]
        # the forced </think> is not an action; sampled prediction tokens are
        assert ro.action_mask[i, k + 1:len(row)].all()
    assert ro.prediction_first_prob is not None and (ro.prediction_first_prob > 0).all()
