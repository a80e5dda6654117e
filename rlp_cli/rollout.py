"""Thought sampling and every model call around it, fast and naive.

The fast path (RLP_SPEC section 5):
- one teacher-forced EMA forward per document window gives S_ema at all its positions;
- one forward per prefix, its KV cache repeated G times, all G thoughts decoded in parallel;
- S_pred from the generation cache: `</think>` and the target tokens fed after each thought, with
  per-rollout positions and masks, instead of re-encoding prefix + thought;
- the update forwards each prefix once with gradients and runs the G thoughts against its repeated
  cache; full-vocabulary logits are only formed where a token is scored.
The naive path re-encodes prefix + thought for every scoring and runs one EMA forward per context.
Both give the same numbers to floating-point tolerance (tests/test_fast_naive.py).

Layout: context b has rollouts b*G ... b*G+G-1 (rollout index = b*G + g).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from rlp_cli.models import forward


@dataclass
class Context:
    """One scored position t of a document window: the model thinks after `prompt`, then predicts `targets`."""
    prompt: list[int]  # thought_prompt + x_<t + <think>
    targets: list[int]  # x_t .. x_{t+H-1}
    continuation: list[int]  # x_t .. (the true text the rpt rewards compare against)
    doc_index: int  # which window of the batch it came from
    position: int  # t


@dataclass
class Rollouts:
    """G sampled thoughts per context, compacted: real tokens first, right padding after."""
    seq: torch.Tensor  # [N, S] tokens after the prompt: thought (+ </think> + prediction for rpt)
    seq_mask: torch.Tensor  # [N, S] 1 where seq holds a real token
    action_mask: torch.Tensor  # [N, S] 1 where the token was sampled by the policy (the loss is over these)
    thought_lengths: torch.Tensor  # [N] sampled thought tokens, </think> included when sampled
    closed: torch.Tensor  # [N] bool: the thought ended with a sampled </think> (else cut at the length limit)
    sample_logp: torch.Tensor  # [N, S] behaviour log-probs of the sampled tokens (0 elsewhere)
    s_pred: torch.Tensor | None = None  # [N, H] log p_theta(x_{t+k} | x_<t, c, x_t..x_{t+k-1})
    prediction_ids: list[list[int]] = field(default_factory=list)  # rpt: the tokens written after </think>
    prediction_first_prob: torch.Tensor | None = None  # [N] prob of the first prediction token under the policy
    forward_tokens: int = 0  # token slots processed (padding included), for the FLOP estimate


def _left_pad(rows: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - len(r):] = torch.tensor(r, dtype=torch.long)
        mask[i, width - len(r):] = 1
    return ids.to(device), mask.to(device)


def _right_pad(rows: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(1, max(len(r) for r in rows))
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, :len(r)] = torch.tensor(r, dtype=torch.long)
        mask[i, :len(r)] = 1
    return ids.to(device), mask.to(device)


def _positions(mask: torch.Tensor, start: torch.Tensor | None = None) -> torch.Tensor:
    """Position ids that advance only over real tokens; masked slots reuse their neighbour's id."""
    pos = mask.long().cumsum(-1) - 1
    if start is not None:
        pos = pos + start.unsqueeze(-1)
    return pos.clamp(min=0)


class Cursor:
    """A batch of sequences being extended block by block against one KV cache."""

    def __init__(self, model, ids, mask, cache=None, logits_to_keep=0):
        self.model = model
        self.mask = mask
        self.next_pos = mask.sum(-1)
        self.logits, self.cache = forward(model, ids, mask, _positions(mask), cache, logits_to_keep=logits_to_keep)
        self.tokens = ids.numel()

    def repeat(self, g: int) -> None:
        """Each row becomes g rows sharing its prefix (the cache is repeated, not recomputed)."""
        self.cache.batch_repeat_interleave(g)
        self.mask = self.mask.repeat_interleave(g, 0)
        self.next_pos = self.next_pos.repeat_interleave(g, 0)
        self.logits = self.logits.repeat_interleave(g, 0)

    def feed(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Append a block [N, k] (mask 0 = a slot this row skips); return its logits [N, k, V]."""
        pos = _positions(mask, self.next_pos)
        self.mask = torch.cat([self.mask, mask.long()], dim=1)
        self.logits, self.cache = forward(self.model, ids, self.mask, pos, self.cache)
        self.next_pos = self.next_pos + mask.long().sum(-1)
        self.tokens += ids.numel()
        return self.logits


def _token_logp(logits: torch.Tensor, tokens: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    return torch.log_softmax(logits.float() / temperature, dim=-1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)


@torch.no_grad()
def sample_thoughts(model, contexts: list[Context], *, num_rollouts: int, max_thought_tokens: int,
                    temperature: float, close_id: int, pad_id: int, eos_id: int | None,
                    generator: torch.Generator, score_targets: bool, prediction_tokens: int = 0) -> Rollouts:
    """Sample G thoughts per context from the current policy (theta_old), then score and/or predict.

    score_targets: feed `</think>` + targets after each thought and keep S_pred (the info-gain reward).
    prediction_tokens > 0: after `</think>`, let the model write its prediction (the rpt rewards).
    """
    device = next(model.parameters()).device
    g = num_rollouts
    ids, mask = _left_pad([c.prompt for c in contexts], pad_id, device)
    cur = Cursor(model, ids, mask, logits_to_keep=1)
    cur.repeat(g)
    n = ids.shape[0] * g
    logits = cur.logits[:, -1]

    alive = torch.ones(n, dtype=torch.bool, device=device)
    closed = torch.zeros(n, dtype=torch.bool, device=device)
    thought, thought_logp, thought_mask = [], [], []
    for u in range(max_thought_tokens):
        scaled = torch.log_softmax(logits.float() / temperature, dim=-1)
        tok = torch.multinomial(scaled.exp(), 1, generator=generator).squeeze(-1)
        tok = torch.where(alive, tok, torch.full_like(tok, pad_id))
        thought.append(tok)
        thought_logp.append(torch.where(alive, scaled.gather(-1, tok.unsqueeze(-1)).squeeze(-1), 0.0))
        thought_mask.append(alive.clone())
        closed |= alive & (tok == close_id)
        alive &= tok != close_id
        if u == max_thought_tokens - 1 or not alive.any():
            break
        logits = cur.feed(tok.unsqueeze(-1), alive.unsqueeze(-1))[:, -1]
    thought_t = torch.stack(thought, 1)
    thought_m = torch.stack(thought_mask, 1)
    # Rows still alive were cut at the length limit: their last sampled token is not in the cache yet.
    pending = torch.where(alive, thought_t[:, -1], torch.full_like(thought_t[:, -1], pad_id))
    closing = torch.full((n,), close_id, dtype=torch.long, device=device)

    s_pred = None
    block, block_mask = [pending, closing], [alive, torch.ones_like(alive)]
    horizon = len(contexts[0].targets)
    if score_targets:
        targets = torch.tensor([c.targets for c in contexts], device=device).repeat_interleave(g, 0)  # [N, H]
        block += [targets[:, k] for k in range(horizon - 1)]
        block_mask += [torch.ones_like(alive)] * (horizon - 1)
    block_logits = cur.feed(torch.stack(block, 1), torch.stack(block_mask, 1).long())
    if score_targets:
        s_pred = _token_logp(block_logits[:, 1:1 + horizon], targets)

    prediction_ids: list[list[int]] = [[] for _ in range(n)]
    pred_first_prob = None
    pred_t = torch.zeros((n, 0), dtype=torch.long, device=device)
    pred_logp_t = torch.zeros((n, 0), device=device)
    pred_m = torch.zeros((n, 0), dtype=torch.bool, device=device)
    if prediction_tokens > 0:
        if score_targets and horizon > 1:
            raise ValueError("a reward that needs both S_pred with horizon > 1 and a written prediction is not supported")
        logits = block_logits[:, 1]
        writing = torch.ones(n, dtype=torch.bool, device=device)
        toks, logps, masks = [], [], []
        for k in range(prediction_tokens):
            scaled = torch.log_softmax(logits.float() / temperature, dim=-1)
            tok = torch.multinomial(scaled.exp(), 1, generator=generator).squeeze(-1)
            tok = torch.where(writing, tok, torch.full_like(tok, pad_id))
            lp = scaled.gather(-1, tok.unsqueeze(-1)).squeeze(-1)
            if k == 0:
                pred_first_prob = lp.exp()
            toks.append(tok)
            logps.append(torch.where(writing, lp, 0.0))
            masks.append(writing.clone())
            if eos_id is not None:
                writing &= tok != eos_id
            if k == prediction_tokens - 1 or not writing.any():
                break
            logits = cur.feed(tok.unsqueeze(-1), writing.unsqueeze(-1))[:, -1]
        pred_t, pred_logp_t, pred_m = torch.stack(toks, 1), torch.stack(logps, 1), torch.stack(masks, 1)
        for i in range(n):
            prediction_ids[i] = [t for t, m in zip(pred_t[i].tolist(), pred_m[i].tolist())
                                 if m and t != eos_id]

    # Compact each rollout into [thought tokens, (</think> if forced), prediction tokens], right-padded.
    rows, action_rows, logp_rows = [], [], []
    thought_lengths = thought_m.sum(1)
    thought_logp_t = torch.stack(thought_logp, 1)
    for i in range(n):
        length = int(thought_lengths[i])
        row = thought_t[i, :length].tolist()
        acts = [1] * length
        lps = thought_logp_t[i, :length].tolist()
        if prediction_tokens > 0:
            if not bool(closed[i]):
                row, acts, lps = row + [close_id], acts + [0], lps + [0.0]
            k = int(pred_m[i].sum())
            row += pred_t[i, :k].tolist()
            acts += [1] * k
            lps += pred_logp_t[i, :k].tolist()
        rows.append(row)
        action_rows.append(acts)
        logp_rows.append(lps)
    seq, seq_mask = _right_pad(rows, pad_id, device)
    action_mask, _ = _right_pad(action_rows, 0, device)
    sample_logp = torch.zeros(seq.shape, device=device)
    for i, lps in enumerate(logp_rows):
        sample_logp[i, :len(lps)] = torch.tensor(lps, device=device)
    return Rollouts(seq=seq, seq_mask=seq_mask, action_mask=action_mask, thought_lengths=thought_lengths,
                    closed=closed, sample_logp=sample_logp, s_pred=s_pred, prediction_ids=prediction_ids,
                    prediction_first_prob=pred_first_prob, forward_tokens=cur.tokens)


# --------------------------------------------------------------------------------------------
# Log-probabilities of the sampled tokens under the current parameters (with gradients): the update


def policy_logprobs(model, contexts: list[Context], rollouts: Rollouts, num_rollouts: int, temperature: float,
                    pad_id: int, fast: bool = True) -> tuple[torch.Tensor, torch.Tensor, int]:
    """log pi_theta(seq_u | prompt, seq_<u) for every slot of rollouts.seq, and the per-slot entropy.

    Fast: each prompt is forwarded once with gradients, its cache repeated G times, and the thought
    tokens run against it (the gradient still flows through the shared prefix). Naive: every
    prompt + thought re-encoded from scratch. Returns (logp [N, S], entropy [N, S], token slots).
    """
    device = rollouts.seq.device
    seq, seq_mask = rollouts.seq, rollouts.seq_mask
    if fast:
        ids, mask = _left_pad([c.prompt for c in contexts], pad_id, device)
        cur = Cursor(model, ids, mask, logits_to_keep=1)
        cur.repeat(num_rollouts)
        first = cur.logits[:, -1:]
        rest = cur.feed(seq[:, :-1], seq_mask[:, :-1]) if seq.shape[1] > 1 else first[:, :0]
        logits = torch.cat([first, rest], dim=1)
        tokens = cur.tokens
    else:
        prompts = [c.prompt for c in contexts for _ in range(num_rollouts)]
        rows = [p + seq[i, :int(seq_mask[i].sum())].tolist() for i, p in enumerate(prompts)]
        ids, mask = _right_pad(rows, pad_id, device)
        out, _ = forward(model, ids, mask, _positions(mask))
        width = seq.shape[1]
        logits = torch.stack([out[i, len(p) - 1:len(p) - 1 + width] for i, p in enumerate(prompts)])
        tokens = ids.numel()
    logp_all = torch.log_softmax(logits.float() / temperature, dim=-1)
    logp = logp_all.gather(-1, seq.unsqueeze(-1)).squeeze(-1)
    with torch.no_grad():
        entropy = -(logp_all.exp() * logp_all).sum(-1)
    return logp, entropy, tokens


# --------------------------------------------------------------------------------------------
# Scoring without a thought (the EMA baseline) and with one, the reference way


@torch.no_grad()
def window_logprobs(model, windows: list[list[int]], pad_id: int) -> tuple[list[torch.Tensor], int]:
    """Teacher-forced log p(x_t | x_<t) at every position t >= 1 of each window: one forward per window.

    Returns per window a tensor lp with lp[t] = log p(x_t | x_<t) (lp[0] = 0), and the token slots.
    """
    device = next(model.parameters()).device
    ids, mask = _right_pad(windows, pad_id, device)
    logits, _ = forward(model, ids, mask, _positions(mask))
    out = []
    for i, w in enumerate(windows):
        lp = _token_logp(logits[i, :len(w) - 1], ids[i, 1:len(w)])
        out.append(F.pad(lp, (1, 0)))
    return out, ids.numel()


@torch.no_grad()
def naive_context_logprobs(model, windows: list[list[int]], contexts: list[Context], pad_id: int) -> tuple[torch.Tensor, int]:
    """The reference S_ema: one forward per context over x_<t+H, scoring its H targets. [B, H]."""
    device = next(model.parameters()).device
    horizon = len(contexts[0].targets)
    rows = [windows[c.doc_index][:c.position + horizon] for c in contexts]
    ids, mask = _right_pad(rows, pad_id, device)
    logits, _ = forward(model, ids, mask, _positions(mask))
    out = torch.stack([_token_logp(logits[i, c.position - 1:c.position - 1 + horizon],
                                   ids[i, c.position:c.position + horizon]) for i, c in enumerate(contexts)])
    return out, ids.numel()


@torch.no_grad()
def naive_s_pred(model, contexts: list[Context], rollouts: Rollouts, num_rollouts: int, close_id: int,
                 pad_id: int) -> tuple[torch.Tensor, int]:
    """The reference S_pred: re-encode prompt + thought + </think> + targets per rollout. [N, H]."""
    device = rollouts.seq.device
    rows, starts = [], []
    for i in range(rollouts.seq.shape[0]):
        c = contexts[i // num_rollouts]
        length = int(rollouts.thought_lengths[i])
        thought = rollouts.seq[i, :length].tolist()
        if not bool(rollouts.closed[i]):
            thought = thought + [close_id]
        row = c.prompt + thought + c.targets
        starts.append(len(c.prompt) + len(thought))
        rows.append(row)
    ids, mask = _right_pad(rows, pad_id, device)
    logits, _ = forward(model, ids, mask, _positions(mask))
    horizon = len(contexts[0].targets)
    out = torch.stack([_token_logp(logits[i, s - 1:s - 1 + horizon], ids[i, s:s + horizon])
                       for i, s in enumerate(starts)])
    return out, ids.numel()
