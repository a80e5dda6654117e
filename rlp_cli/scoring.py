"""Scoring a next token without a thought (S_ema, the EMA baseline) and with one, the reference way.

- window_logprobs: teacher-forced log-probs at every position of each window (the `surprise` rule's
  S_ema, `rlp eval`'s held-out perplexity); context_logprobs: only at the chosen positions.
- naive_context_logprobs and naive_s_pred: one forward per context, the reference the fast path is
  tested against (tests/test_rollout.py).
- empty_thought_logprobs: S_pred after an empty thought (`<think></think>`), which separates what
  the format alone does to x_t from what a thought's content does.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from rlp_cli.cursor import right_pad, positions, unpadded_prefill_pays
from rlp_cli.models import forward
from rlp_cli.rollout import Context, Rollouts, token_logp


def _forward_groups(model, rows: list[list[int]], pad_id: int) -> list[list[int]]:
    """Indices of `rows` forwarded together: each alone where its right padding would cost more than the
    extra calls (a CPU: cursor.unpadded_prefill_pays), else all in one padded batch."""
    _, mask = right_pad(rows, pad_id, "cpu")
    return [[i] for i in range(len(rows))] if unpadded_prefill_pays(model, mask) else [list(range(len(rows)))]


@torch.no_grad()
def window_logprobs(model, windows: list[list[int]], pad_id: int) -> tuple[list[torch.Tensor], int]:
    """Teacher-forced log p(x_t | x_<t) at every position t >= 1 of each window.

    One right-padded forward, or one forward per window where padding would cost more than the extra
    calls (_forward_groups; padding also forms [T, V] logits at every padded slot).
    Returns per window a tensor lp with lp[t] = log p(x_t | x_<t) (lp[0] = 0), and the token slots.
    """
    device = next(model.parameters()).device
    out, tokens = [], 0
    for group in _forward_groups(model, windows, pad_id):
        group = [windows[i] for i in group]
        ids, mask = right_pad(group, pad_id, device)
        logits, _ = forward(model, ids, mask, positions(mask))
        for i, w in enumerate(group):
            lp = token_logp(logits[i, :len(w) - 1], ids[i, 1:len(w)])
            out.append(F.pad(lp, (1, 0)))
        tokens += ids.numel()
    return out, tokens


@torch.no_grad()
def context_logprobs(model, windows: list[list[int]], contexts: list[Context], pad_id: int) -> tuple[torch.Tensor, int]:
    """S_ema of the given contexts when they are chosen before scoring (any position rule but `surprise`). [B, H].

    One forward per document, cut after its last scored target, with logits only where a target is
    scored: window_logprobs forms [D, T, V] logits to use a handful of them. Documents go one by one
    where padding would cost more than the extra calls (CPU), else as one right-padded batch.
    """
    device = next(model.parameters()).device
    horizon = len(contexts[0].targets)
    docs = sorted({c.doc_index for c in contexts})
    rows = [windows[d][:max(c.position for c in contexts if c.doc_index == d) + horizon] for d in docs]
    out = torch.empty(len(contexts), horizon, device=device)
    tokens = 0
    for group in _forward_groups(model, rows, pad_id):
        ids, mask = right_pad([rows[i] for i in group], pad_id, device)
        members = [(k, c, group.index(docs.index(c.doc_index))) for k, c in enumerate(contexts)
                   if docs.index(c.doc_index) in group]
        # the logits at t-1 score x_t; x_0 has no context and scores 0, as in window_logprobs
        keep = sorted({c.position - 1 + h for _, c, _ in members for h in range(horizon) if c.position + h > 0})
        logits, _ = forward(model, ids, mask, positions(mask), logits_to_keep=torch.tensor(keep, device=device))
        column = {t: j for j, t in enumerate(keep)}
        for k, c, r in members:
            cols = [column.get(c.position - 1 + h, 0) for h in range(horizon)]
            out[k] = token_logp(logits[r, cols], torch.tensor(c.targets, device=device))
            if c.position == 0:
                out[k, 0] = 0.0
        tokens += ids.numel()
    return out, tokens


@torch.no_grad()
def naive_context_logprobs(model, windows: list[list[int]], contexts: list[Context], pad_id: int) -> tuple[torch.Tensor, int]:
    """The reference S_ema: one forward per context over x_<t+H, scoring its H targets. [B, H]."""
    device = next(model.parameters()).device
    horizon = len(contexts[0].targets)
    rows = [windows[c.doc_index][:c.position + horizon] for c in contexts]
    ids, mask = right_pad(rows, pad_id, device)
    logits, _ = forward(model, ids, mask, positions(mask))
    out = torch.stack([token_logp(logits[i, c.position - 1:c.position - 1 + horizon],
                                   ids[i, c.position:c.position + horizon]) for i, c in enumerate(contexts)])
    return out, ids.numel()


@torch.no_grad()
def naive_s_pred(model, contexts: list[Context], rollouts: Rollouts, num_rollouts: int, close_id: int,
                 pad_id: int) -> tuple[torch.Tensor, int]:
    """The reference S_pred: re-encode prompt + thought + </think> + bridge + targets per rollout. [N, H]."""
    device = rollouts.seq.device
    rows, starts = [], []
    for i in range(rollouts.seq.shape[0]):
        c = contexts[i // num_rollouts]
        length = int(rollouts.thought_lengths[i])
        thought = rollouts.seq[i, :length].tolist()
        if not bool(rollouts.closed[i]):
            thought = thought + [close_id]
        row = c.prompt + thought + c.bridge + c.targets
        starts.append(len(c.prompt) + len(thought) + len(c.bridge))
        rows.append(row)
    ids, mask = right_pad(rows, pad_id, device)
    logits, _ = forward(model, ids, mask, positions(mask))
    horizon = len(contexts[0].targets)
    out = torch.stack([token_logp(logits[i, s - 1:s - 1 + horizon], ids[i, s:s + horizon])
                       for i, s in enumerate(starts)])
    return out, ids.numel()


@torch.no_grad()
def empty_thought_logprobs(model, contexts: list[Context], close_id: int, pad_id: int) -> tuple[torch.Tensor, int]:
    """S_empty: log p_theta(targets | prompt, </think>, bridge), the score after an empty thought. [B, H].

    What the format alone costs (or gives): s_pred - s_empty is what the thought's content adds.
    """
    device = next(model.parameters()).device
    rows = [c.prompt + [close_id] + c.bridge + c.targets for c in contexts]
    ids, mask = right_pad(rows, pad_id, device)
    logits, _ = forward(model, ids, mask, positions(mask))
    horizon = len(contexts[0].targets)
    starts = [len(r) - horizon for r in rows]
    out = torch.stack([token_logp(logits[i, s - 1:s - 1 + horizon], ids[i, s:s + horizon])
                       for i, s in enumerate(starts)])
    return out, ids.numel()
