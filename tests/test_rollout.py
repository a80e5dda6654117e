"""The fast path (shared prefix caches, scoring from the generation cache) against plain forwards."""

import copy

import numpy as np
import pytest
import torch

import rlp_cli.cursor as C
import rlp_cli.scoring as S
from rlp_cli.config import load_config
from rlp_cli.models import THINK_CLOSE, THINK_OPEN
from rlp_cli.rollout import Context, sample_thoughts
from rlp_cli.scoring import naive_context_logprobs, naive_s_pred, window_logprobs
from rlp_cli.update import policy_logprobs
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
                pad_id=tiny.tokenizer.pad_token_id, generator=gen,
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
                         generator=gen, score_targets=True)
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


def test_token_logprobs_match_log_softmax_with_exact_gradients(monkeypatch):
    """The chunked log-prob of the chosen token (no full log_softmax kept) against the plain formula."""
    import rlp_cli.rollout as R

    monkeypatch.setattr(R, "CHUNK_ELEMENTS", 3 * 11)  # several chunks of 3 rows
    logits = torch.randn(2, 5, 11, dtype=torch.float64, requires_grad=True)
    tokens = torch.randint(0, 11, (2, 5))
    logp, entropy = R.token_logprobs(logits, tokens, 0.7)
    ref = torch.log_softmax(logits / 0.7, dim=-1)
    assert torch.allclose(logp, ref.gather(-1, tokens.unsqueeze(-1)).squeeze(-1))
    assert torch.allclose(entropy, -(ref.exp() * ref).sum(-1))
    assert not entropy.requires_grad
    assert torch.autograd.gradcheck(lambda x: R.token_logprobs(x, tokens, 0.7)[0], (logits,))
    # banned ids: probability 0 in both, and no NaN from 0 * -inf in the entropy
    banned = torch.tensor([0, 4])
    tokens = tokens.clamp(min=5)
    logp, entropy = R.token_logprobs(logits, tokens, 0.7, banned)
    ref = torch.log_softmax((logits / 0.7).index_fill(-1, banned, float("-inf")), dim=-1)
    assert torch.allclose(logp, ref.gather(-1, tokens.unsqueeze(-1)).squeeze(-1))
    assert torch.allclose(entropy, -torch.special.xlogy(ref.exp(), ref.exp()).sum(-1))
    assert torch.autograd.gradcheck(lambda x: R.token_logprobs(x, tokens, 0.7, banned)[0], (logits,))


def test_sampler_draws_from_the_softmax():
    """Inverse-CDF sampling: empirical frequencies match softmax(logits / T); the log-prob is of the drawn token."""
    from rlp_cli.rollout import _sample

    logits = torch.tensor([[2.0, 0.0, -1.0, 1.0, -30.0]]).expand(40000, 5)
    tok, lp = _sample(logits, 0.7, torch.Generator().manual_seed(0))
    p = torch.softmax(logits[0] / 0.7, -1)
    freq = torch.bincount(tok, minlength=5).double() / len(tok)
    assert torch.allclose(freq, p.double(), atol=4 * (0.25 / len(tok)) ** 0.5)
    assert torch.allclose(lp, torch.log(p)[tok], atol=1e-6)


def test_prompts_forwarded_without_padding_give_the_same_numbers(tiny, monkeypatch):
    """The CPU path that prefills each prompt unpadded and pads its cache: same S_pred, log-probs, gradients."""
    windows, contexts = _contexts(tiny, horizon=2)
    monkeypatch.setattr(C, "UNPADDED_PREFILL", False)
    padded = _sample(tiny, contexts, seed=4)
    monkeypatch.setattr(C, "UNPADDED_PREFILL", True)
    unpadded = _sample(tiny, contexts, seed=4)
    assert torch.equal(padded.seq, unpadded.seq)  # same draws: the logits agree to float noise
    assert torch.allclose(padded.s_pred, unpadded.s_pred, atol=1e-5)
    naive, _ = naive_s_pred(tiny.model, contexts, unpadded, G, tiny.think_close_id, tiny.tokenizer.pad_token_id)
    assert torch.allclose(unpadded.s_pred, naive, atol=1e-5)
    assert unpadded.forward_tokens < padded.forward_tokens  # the padding was not computed
    grads = {}
    for force in (True, False):
        monkeypatch.setattr(C, "UNPADDED_PREFILL", force)
        model = copy.deepcopy(tiny.model)
        lp, _, _ = policy_logprobs(model, contexts, unpadded, G, 1.0, tiny.tokenizer.pad_token_id, fast=True)
        m = unpadded.action_mask.bool()
        (lp[m] * torch.linspace(-1, 1, int(m.sum()))).sum().backward()
        grads[force] = (lp.detach()[m], {n: p.grad.clone() for n, p in model.named_parameters()})
    assert torch.allclose(grads[True][0], grads[False][0], atol=1e-5)
    for name in grads[True][1]:
        assert torch.allclose(grads[True][1][name], grads[False][1][name], atol=1e-5, rtol=1e-4), name


def test_windows_scored_without_padding_give_the_same_numbers(tiny, monkeypatch):
    """window_logprobs (the `surprise` rule's S_ema, rlp eval's held-out perplexity) one window at a time
    where padding does not pay: the same log-probs, and fewer slots computed."""
    windows, _ = _contexts(tiny)
    out = {}
    for force in (False, True):
        monkeypatch.setattr(C, "UNPADDED_PREFILL", force)
        out[force] = window_logprobs(tiny.model, windows, tiny.tokenizer.pad_token_id)
    for a, b, w in zip(out[False][0], out[True][0], windows):
        assert a.shape == b.shape == (len(w),) and torch.allclose(a, b, atol=1e-5)
    assert out[True][1] == sum(len(w) for w in windows) < out[False][1]


def test_prompts_prefilled_in_groups_give_the_same_numbers(tiny, monkeypatch):
    """rlp eval's prefill: runs of prompts of similar length forwarded together, then repeated with room."""
    tok = tiny.tokenizer
    texts = ["a b", "one two", "one two three", "the river runs north", "the river runs north through the valley"]
    ids, mask = C.left_pad([tok(t, add_special_tokens=False).input_ids for t in texts], tok.pad_token_id, "cpu")
    lengths = mask.sum(1).tolist()
    groups = C._prefill_groups(lengths, 0.3)
    assert len(groups) < len(texts) and any(len(g) > 1 for g in groups), groups
    assert C._prefill_groups(lengths, None) == [[i] for i in range(len(texts))]  # the trainer's: each alone
    monkeypatch.setattr(C, "UNPADDED_PREFILL", False)
    padded = C.Cursor(tiny.model, ids, mask, logits_to_keep=1)
    monkeypatch.setattr(C, "UNPADDED_PREFILL", True)
    grouped = C.Cursor(tiny.model, ids, mask, logits_to_keep=1, prefill_padding=0.3)
    assert torch.allclose(padded.logits, grouped.logits, atol=1e-5)
    assert int(mask.sum()) < grouped.tokens < padded.tokens
    step = torch.tensor([[5], [6], [7], [8], [9]]).repeat_interleave(2, 0)
    with torch.no_grad():
        padded.repeat(2)
        grouped.repeat(2, reserve=3)
        assert torch.allclose(padded.feed(step, torch.ones_like(step)), grouped.feed(step, torch.ones_like(step)),
                              atol=1e-5)


@pytest.mark.parametrize("fast, per, rows_per_backward", [(True, 1, None), (True, 1, 1), (True, 1, 2), (True, 2, 2),
                                                         (False, 1, None)])
def test_update_in_chunks_of_contexts_accumulates_the_whole_batch_gradient(tiny, fast, per, rows_per_backward):
    """Chunks of contexts, and slices of a context's thoughts cut from its prompt (update.PromptBoundary:
    one backward per slice into the prompt's keys and values, then the prompt's once), give the gradient
    of one backward over the whole batch."""
    from rlp_cli.objective import clipped_surrogate
    from rlp_cli.update import policy_update

    windows, contexts = _contexts(tiny)
    ro = _sample(tiny, contexts, seed=5, max_thought_tokens=8)
    n, pad = ro.seq.shape[0], tiny.tokenizer.pad_token_id
    adv = torch.linspace(-1, 1, n)
    whole = copy.deepcopy(tiny.model)
    lp, ent, _ = policy_logprobs(whole, contexts, ro, G, 0.7, pad, fast=fast)
    loss = clipped_surrogate(lp, lp.detach(), adv, ro.action_mask, 0.2, 0.2)
    loss.backward()
    chunked = copy.deepcopy(tiny.model)

    def share(rows, logp):
        part = clipped_surrogate(logp, logp.detach(), adv[rows], ro.action_mask[rows], 0.2, 0.2)
        return part * (rows.stop - rows.start) / n

    lp_c, ent_c, _, loss_c = policy_update(chunked, contexts, ro, G, 0.7, pad, share, fast=fast, contexts_per_chunk=per,
                                           rows_per_backward=rows_per_backward)
    m = ro.action_mask.bool()
    assert torch.allclose(lp_c[m], lp.detach()[m], atol=1e-5)
    assert torch.allclose(ent_c[m], ent[m], atol=1e-5)
    assert loss_c.item() == pytest.approx(loss.item(), abs=1e-6)
    for (name, p), q in zip(whole.named_parameters(), chunked.parameters()):
        assert torch.allclose(p.grad, q.grad, atol=1e-6, rtol=1e-4), name


@pytest.mark.parametrize("unpadded", [True, False])
def test_ema_scores_of_chosen_contexts_equal_per_context_forwards(tiny, monkeypatch, unpadded):

    monkeypatch.setattr(C, "UNPADDED_PREFILL", unpadded)
    windows, contexts = _contexts(tiny, horizon=2)
    w = windows[0]
    contexts.append(Context(prompt=w[:4] + [tiny.think_open_id], targets=w[4:6], continuation=w[4:12],
                            doc_index=0, position=4))  # two positions in one document
    fast, slots = S.context_logprobs(tiny.model, windows, contexts, tiny.tokenizer.pad_token_id)
    naive, _ = naive_context_logprobs(tiny.model, windows, contexts, tiny.tokenizer.pad_token_id)
    assert fast.shape == (3, 2)
    assert torch.allclose(fast, naive, atol=1e-5)
    assert slots < sum(len(x) for x in windows) or not unpadded  # cut after the last scored token


def test_update_counts_sampled_tokens_only_with_ragged_closed_and_forced_thoughts(tiny):
    """RPT rollouts through the trainer's fast update, with thoughts that close early (a sampled </think>:
    an action), thoughts cut at the limit (a forced </think>: not an action), a restated bridge (not an
    action) and ragged predictions. The gradient equals a plain per-rollout reference that takes the
    log-prob of exactly the sampled tokens, found from the rollouts' lengths, not from action_mask."""
    from rlp_cli.models import token_classes
    from rlp_cli.objective import clipped_surrogate
    from rlp_cli.update import policy_update

    tok, close, pad = tiny.tokenizer, tiny.think_close_id, tiny.tokenizer.pad_token_id
    policy = copy.deepcopy(tiny.model)

    def likely_close(module, args, out):  # a policy that closes some thoughts early
        out = out.clone()
        out[..., close] += 4.5
        return out

    policy.lm_head.register_forward_hook(likely_close)
    windows, plain = _contexts(tiny)
    contexts = [Context(prompt=c.prompt, targets=c.targets, continuation=c.continuation, doc_index=c.doc_index,
                        position=c.position, bridge=windows[c.doc_index][c.position - 2:c.position]) for c in plain]
    classes = token_classes(tok, tiny.think_open_id, close, policy.config.vocab_size)
    g = 4
    ro = sample_thoughts(policy, contexts, num_rollouts=g, max_thought_tokens=5, temperature=1.0, close_id=close,
                         pad_id=pad, generator=torch.Generator().manual_seed(3), score_targets=False,
                         prediction_tokens=3, token_classes=classes)
    lengths, closed = ro.thought_lengths.tolist(), ro.closed.tolist()
    assert any(closed) and not all(closed), "the test needs both closed and cut thoughts"
    assert len(set(lengths)) > 1 and len({len(p) for p in ro.prediction_ids}) > 1, "and ragged ones"

    n = ro.seq.shape[0]
    adv = torch.linspace(-1, 1, n)
    fast = copy.deepcopy(policy)
    policy_update(fast, contexts, ro, g, 1.0, pad,
                  lambda rows, lp: clipped_surrogate(lp, lp.detach(), adv[rows], ro.action_mask[rows], 0.2, 0.2)
                  * (rows.stop - rows.start) / n, fast=True, contexts_per_chunk=1)

    reference = copy.deepcopy(policy)
    loss = 0.0
    for i in range(n):
        c, thought, pred = contexts[i // g], ro.seq[i, :lengths[i]].tolist(), ro.prediction_ids[i]
        assert (thought[-1] == close) == closed[i]
        after = thought + ([] if closed[i] else [close]) + c.bridge
        ids = c.prompt + after + pred
        sampled = list(range(len(c.prompt), len(c.prompt) + len(thought)))
        sampled += list(range(len(c.prompt) + len(after), len(ids)))
        logits = reference(torch.tensor([ids])).logits[0]
        logp = torch.log_softmax(logits[[j - 1 for j in sampled]].float(), -1)[range(len(sampled)), [ids[j] for j in sampled]]
        loss = loss - adv[i] * logp.mean() / n  # the clipped surrogate's gradient at ratio 1
    loss.backward()
    for (name, p), q in zip(reference.named_parameters(), fast.parameters()):
        assert torch.allclose(p.grad, q.grad, atol=1e-6, rtol=1e-4), name


def test_sparse_tied_embedding_gradient_and_fused_adamw_match_the_dense_ones(tiny):
    """The trainer's speed-ups of the update (train.sparse_embedding_gradient, make_optimizer) change no number."""
    from types import SimpleNamespace

    from rlp_cli.objective import clipped_surrogate
    from rlp_cli.update import policy_update
    from rlp_cli.train import make_optimizer, sparse_embedding_gradient

    windows, contexts = _contexts(tiny)
    ro = _sample(tiny, contexts, seed=7, max_thought_tokens=8)
    n, pad = ro.seq.shape[0], tiny.tokenizer.pad_token_id
    adv = torch.linspace(-1, 1, n)

    def share(rows, logp):
        return clipped_surrogate(logp, logp.detach(), adv[rows], ro.action_mask[rows], 0.2, 0.2) * (
            rows.stop - rows.start) / n

    settings = SimpleNamespace(lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1)
    dense, fast = copy.deepcopy(tiny.model), copy.deepcopy(tiny.model)
    sparse_embedding_gradient(fast)
    assert fast.get_input_embeddings().sparse and not dense.get_input_embeddings().sparse
    reference = torch.optim.AdamW(list(dense.parameters()), foreach=True, **vars(settings))
    fused = make_optimizer(list(fast.parameters()), settings, torch.device("cpu"))
    assert fused.param_groups[0]["fused"]
    for _ in range(2):  # two steps: the second one uses the moments of the first
        for model, opt in ((dense, reference), (fast, fused)):
            opt.zero_grad(set_to_none=True)
            policy_update(model, contexts, ro, G, 0.7, pad, share, contexts_per_chunk=1)
            weight = model.get_input_embeddings().weight
            assert weight.grad is not None and not weight.grad.is_sparse  # the head's dense gradient absorbed it
        for p, q in zip(dense.parameters(), fast.parameters()):
            assert torch.allclose(p.grad, q.grad, atol=1e-7, rtol=1e-5)
        reference.step(), fused.step()
    for (name, p), q in zip(dense.named_parameters(), fast.parameters()):
        assert torch.allclose(p, q, atol=1e-6), name
