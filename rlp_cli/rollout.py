"""Thought sampling: the policy's distribution, the decoding engine, and the trainer's rollouts.

The fast path (RLP_SPEC section 5):
- one teacher-forced EMA forward per document window gives S_ema at all its positions
  (scoring.context_logprobs: only at the chosen ones, the window cut after the last);
- one forward per prefix, its KV cache repeated G times, all G thoughts decoded in parallel into
  room reserved in the cache (no re-concatenation per step); on a CPU each prefix is forwarded
  without its padding (cursor.Cursor);
- S_pred from the generation cache: `</think>` and the target tokens fed after each thought, with
  per-rollout positions and masks, instead of re-encoding prefix + thought;
- the update (rlp_cli/update.py) forwards each prefix once with gradients and runs the G thoughts
  against its cache;
- log-probabilities as logit - logsumexp in chunks (token_logprobs): no [N, S, V] log_softmax.
- one decoding loop (decode) for the trainer's thoughts and rpt predictions and for `rlp eval`'s greedy
  and sampled thoughts and answers: one sampler, per-row stop rules, finished rows can leave the batch.
The naive path (scoring.naive_s_pred, scoring.naive_context_logprobs) re-encodes prefix + thought
for every scoring and runs one EMA forward per context. Both give the same numbers to floating-point
tolerance (tests/test_rollout.py).

Layout: context b has rollouts b*G ... b*G+G-1 (rollout index = b*G + g).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from rlp_cli.cursor import Cursor, left_pad
from rlp_cli.models import TokenClasses


@dataclass
class Context:
    """One scored position t of a document window: the model thinks after `prompt`, then predicts `targets`."""
    prompt: list[int]  # thought_prompt + x_<t + <think>
    targets: list[int]  # x_t .. x_{t+H-1}
    continuation: list[int]  # x_t .. (the true text the rpt rewards compare against)
    doc_index: int  # which window of the batch it came from
    position: int  # t
    # Teacher-forced after </think>, before x_t is scored: the last k context tokens restated
    # (objective.restate_tokens). No reward and no gradient: they only put x_t back in its place.
    bridge: list[int] = field(default_factory=list)


def thought_context(window: list[int], t: int, *, prompt_ids: list[int], open_id: int, restate: int, horizon: int,
                    continuation: int, doc_index: int) -> Context:
    """The thought format (docs/method.md): [prompt] x_<t <think> thought </think> [x_{t-k}..x_{t-1}] x_t..x_{t+H-1}."""
    return Context(prompt=prompt_ids + window[:t] + [open_id], targets=window[t:t + horizon],
                   continuation=window[t:t + continuation], doc_index=doc_index, position=t,
                   bridge=window[t - restate:t] if restate else [])


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
    forward_tokens: int = 0  # token slots computed (padding included where it was computed), for the FLOP estimate

    def select(self, rows: slice) -> "Rollouts":
        """The rollouts in `rows`, cut to the longest of them (for the update's chunks)."""
        width = max(1, int(self.seq_mask[rows].sum(1).max()))
        return Rollouts(seq=self.seq[rows, :width], seq_mask=self.seq_mask[rows, :width],
                        action_mask=self.action_mask[rows, :width], thought_lengths=self.thought_lengths[rows],
                        closed=self.closed[rows], sample_logp=self.sample_logp[rows, :width],
                        s_pred=None if self.s_pred is None else self.s_pred[rows],
                        prediction_ids=self.prediction_ids[rows])


CHUNK_ELEMENTS = 1 << 22  # vocabulary-wide temporaries are formed for this many logits at a time (16 MB)


class _TokenLogProb(torch.autograd.Function):
    """log softmax(logits / T)[token] and the entropy of softmax(logits / T), without a full log_softmax.

    logp = z[token] - logsumexp(z) with z = logits / T, computed over chunks of rows. Only the logits
    and the per-row logsumexp are saved for backward (no [N, S, V] log_softmax output, no
    temperature-scaled copy): with a 49k vocabulary each such copy of a batch of thoughts is hundreds
    of MB. p = exp(z - lse) reuses the logsumexp, here and in backward, instead of a second softmax.
    The entropy is a metric and carries no gradient.
    """

    @staticmethod
    def forward(ctx, logits, tokens, temperature, banned):
        vocab = logits.shape[-1]
        flat, flat_tokens = logits.reshape(-1, vocab), tokens.reshape(-1, 1)
        dtype = torch.promote_types(logits.dtype, torch.float32)  # bf16 logits are scored in float32
        logp = torch.empty(flat.shape[0], dtype=dtype, device=logits.device)
        entropy, lse = torch.empty_like(logp), torch.empty_like(logp)
        step = max(1, CHUNK_ELEMENTS // vocab)
        for a in range(0, flat.shape[0], step):
            z = _scaled(flat[a:a + step], dtype, temperature, banned)
            chunk_lse = lse[a:a + step] = torch.logsumexp(z, dim=-1)
            logp[a:a + step] = z.gather(-1, flat_tokens[a:a + step]).squeeze(-1) - chunk_lse
            # H = -sum p log p = lse - sum p z; banned slots have p = 0 and z = -inf: zeroed, 0 * 0 = 0
            p = (z - chunk_lse.unsqueeze(-1)).exp_()
            if banned is not None:
                z.index_fill_(-1, banned, 0.0)
            entropy[a:a + step] = chunk_lse - torch.linalg.vecdot(p, z)
        ctx.save_for_backward(logits, tokens, lse)
        ctx.temperature, ctx.banned = temperature, banned
        logp, entropy = logp.view(tokens.shape), entropy.view(tokens.shape)
        ctx.mark_non_differentiable(entropy)
        return logp, entropy

    @staticmethod
    def backward(ctx, grad_logp, grad_entropy):
        logits, tokens, lse = ctx.saved_tensors
        t, vocab = ctx.temperature, logits.shape[-1]
        flat, flat_tokens = logits.reshape(-1, vocab), tokens.reshape(-1, 1)
        flat_grad = grad_logp.reshape(-1, 1)
        grad_logits = torch.empty(flat.shape, dtype=logits.dtype, device=logits.device)
        step = max(1, CHUNK_ELEMENTS // vocab)
        for a in range(0, flat.shape[0], step):
            g = flat_grad[a:a + step]
            # d logp / d z = onehot(token) - softmax(z); d z / d logits = 1 / T
            chunk = _scaled(flat[a:a + step], g.dtype, t, ctx.banned).sub_(lse[a:a + step].unsqueeze(-1)).exp_()
            chunk.mul_(-g).scatter_add_(-1, flat_tokens[a:a + step], g)
            grad_logits[a:a + step] = chunk.div_(t)
        return grad_logits.view(logits.shape), None, None, None


def _scaled(logits: torch.Tensor, dtype, temperature: float, banned: torch.Tensor | None) -> torch.Tensor:
    """logits / T in `dtype`, banned ids at -inf: always a new tensor, which callers may change in place."""
    z = logits.to(dtype) / temperature
    return z if banned is None else z.index_fill_(-1, banned, float("-inf"))


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor, temperature: float = 1.0,
                   banned: torch.Tensor | None = None):
    """(log p(token), entropy) under softmax(logits / T), both [...] for logits [..., V]; logp has a gradient.

    banned: token ids with probability 0 (the policy's restriction, see _sample)."""
    return _TokenLogProb.apply(logits, tokens, temperature, banned)


def token_logp(logits: torch.Tensor, tokens: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    return token_logprobs(logits, tokens, temperature)[0]


def _sample(logits: torch.Tensor, temperature: float, generator: torch.Generator,
            banned: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One token per row from softmax(logits / T) by inverse-CDF sampling, and its log-prob. [N, V] -> [N], [N].

    banned: token ids the policy never emits (EOS, chat-control tokens, <think>): their logits are -inf,
    here and in token_logprobs, so the sampled and the trained distribution are the same one.
    torch.multinomial took 4x as long as the whole log_softmax on a 49k vocabulary on CPU. The CDF is
    the running sum of exp(z - max z), unnormalised (u is drawn in [0, total)): three passes over the
    vocabulary instead of a log_softmax, an exp and a cumsum. A float32 cumsum changes any token's
    probability by at most ~1 ulp of the total (6e-8), far below sampling noise.
    """
    z = _scaled(logits, torch.float32, temperature, banned)
    top = z.amax(-1, keepdim=True)
    cdf = (z - top).exp_().cumsum_(-1)
    total = cdf[:, -1:]
    u = torch.rand((z.shape[0], 1), generator=generator, device=z.device) * total
    tok = torch.searchsorted(cdf, u, right=True).clamp_(max=z.shape[-1] - 1)
    logp = z.gather(-1, tok) - top - total.log()
    return tok.squeeze(-1), logp.squeeze(-1)


def _compact(tokens: torch.Tensor, keep: torch.Tensor, actions: torch.Tensor, logps: torch.Tensor, pad_id: int):
    """Move each row's kept slots to its front, in order, right-padded: (tokens, mask, action mask, logps)."""
    n, k = tokens.shape
    target = torch.where(keep, keep.long().cumsum(1) - 1, k)  # dropped slots land in a spare last column
    width = max(1, int(keep.sum(1).max()))

    def put(values, fill):
        out = torch.full((n, k + 1), fill, dtype=values.dtype, device=values.device)
        return out.scatter_(1, target, values)[:, :width].contiguous()

    return put(tokens, pad_id), put(keep.long(), 0), put(actions.long(), 0), put(logps, 0.0)


# --------------------------------------------------------------------------------------------
# The decoding engine: one token-by-token loop for the trainer's thoughts and predictions and for `rlp eval`


DROP_FINISHED_FRACTION = 0.25  # decode(drop_finished=True) compacts the batch once this share of its rows is done


@dataclass
class Decoded:
    """What decode emitted, step by step: [N, U], U <= max_tokens (the loop ends once every row has stopped)."""
    tokens: torch.Tensor  # [N, U] the emitted tokens; pad_id where the row had already ended
    mask: torch.Tensor  # [N, U] bool: the row emitted this token
    logp: torch.Tensor  # [N, U] log-prob of a sampled token under softmax(logits / T); 0 for greedy picks and pads
    stopped: torch.Tensor  # [N] bool: ended by the stop rule; the other rows were cut at max_tokens, and their
    #                        last token is not in the cache yet


def _pick(logits: torch.Tensor, temperature: float, generator: torch.Generator, banned: torch.Tensor | None,
          greedy: torch.Tensor | bool) -> tuple[torch.Tensor, torch.Tensor]:
    """One token per row and its sampling log-prob: argmax where greedy (log-prob 0), else _sample.

    Random numbers are drawn for the sampled rows only, so an all-sampled batch (the trainer's) draws
    exactly what _sample alone would.
    """
    if greedy is False:
        return _sample(logits, temperature, generator, banned)
    z = logits if banned is None else logits.index_fill(-1, banned, float("-inf"))
    tok, logp = z.argmax(-1), torch.zeros(logits.shape[0], device=logits.device)
    if greedy is not True:
        sampled = (~greedy).nonzero().squeeze(-1)
        if sampled.numel():
            tok[sampled], logp[sampled] = _sample(logits[sampled], temperature, generator, banned)
    return tok, logp


@torch.no_grad()
def decode(cur: Cursor, logits: torch.Tensor, *, max_tokens: int, temperature: float, generator: torch.Generator,
           pad_id: int, stop=None, keep_stop_token: bool = True, greedy: torch.Tensor | bool = False,
           banned: torch.Tensor | None = None, drop_finished: bool = False) -> Decoded:
    """Extend every row of `cur` token by token, starting from `logits` [N, V] (after its last fed token).

    Each step picks one token per live row (_pick: argmax where `greedy` is True or a row's mask is set,
    or temperature is 0; else the inverse-CDF sampler, without the `banned` tokens). `stop(tokens, alive)`
    -> [N] bool ends a row at this step's token (a rule with state, such as an answer's first newline,
    keeps it per row); keep_stop_token: that token is the row's last output (a sampled </think>), or it
    is not part of the output (the first token of the next word after an rpt prediction). Ended rows emit
    pad_id. The picks are fed back into the cache (ended rows as masked slots, into the room reserved by
    Cursor.reserve), except after the last step: a row cut at max_tokens has its last token still to feed.
    drop_finished: once DROP_FINISHED_FRACTION of the cursor's rows have ended, they leave it (Cursor.keep)
    and later steps compute only the live rows; the caller must not use the cursor afterwards.
    """
    n, device = logits.shape[0], logits.device
    greedy = True if temperature == 0 else greedy
    alive = torch.ones(n, dtype=torch.bool, device=device)
    stopped = torch.zeros_like(alive)
    rows = None  # the row of each cursor row once ended rows have left the cursor (None: all n, in order)
    tokens, logps, masks = [], [], []
    for u in range(max_tokens):
        row_greedy = greedy if isinstance(greedy, bool) or rows is None else greedy[rows]
        tok, lp = _pick(logits, temperature, generator, banned, row_greedy)
        if rows is not None:  # back to all n rows
            tok = torch.full((n,), pad_id, dtype=tok.dtype, device=device).index_copy_(0, rows, tok)
            lp = torch.zeros(n, dtype=lp.dtype, device=device).index_copy_(0, rows, lp)
        ends = alive & stop(tok, alive) if stop is not None else torch.zeros_like(alive)
        emitted = alive if keep_stop_token else alive & ~ends
        tokens.append(torch.where(emitted, tok, torch.full_like(tok, pad_id)))
        logps.append(torch.where(emitted, lp, 0.0))
        masks.append(emitted)
        stopped |= ends
        alive = alive & ~ends
        if u == max_tokens - 1 or not alive.any():
            break
        if drop_finished:
            rows = _drop_finished(cur, alive, rows)
        live = alive if rows is None else alive[rows]
        logits = cur.feed(tokens[-1].unsqueeze(-1) if rows is None else tokens[-1][rows].unsqueeze(-1),
                          live.unsqueeze(-1))[:, -1]
    return Decoded(tokens=torch.stack(tokens, 1), mask=torch.stack(masks, 1), logp=torch.stack(logps, 1),
                   stopped=stopped)


def _drop_finished(cur: Cursor, alive: torch.Tensor, rows: torch.Tensor | None) -> torch.Tensor | None:
    """Let ended rows leave the cursor once they are DROP_FINISHED_FRACTION of it; return the rows it holds.

    A dropped row saves a forward slot at every later step; dropping copies the kept rows' cache once,
    so it waits until enough rows have ended (measured in `rlp bench --eval`).
    """
    live = alive if rows is None else alive[rows]
    if int(live.sum()) > (1 - DROP_FINISHED_FRACTION) * live.numel():
        return rows
    index = live.nonzero().squeeze(-1)
    cur.keep(index)
    return index if rows is None else rows[index]


class WordEnd:
    """rpt's stop rule: a new word begins after a written one (that token is not part of the prediction)."""

    def __init__(self, classes: TokenClasses, n: int, device):
        self.classes = classes
        self.has_word = torch.zeros(n, dtype=torch.bool, device=device)

    def __call__(self, tok: torch.Tensor, alive: torch.Tensor) -> torch.Tensor:
        ends = self.has_word & self.classes.word_start[tok]
        self.has_word |= alive & ~ends & ~self.classes.blank[tok]
        return ends


@torch.no_grad()
def sample_thoughts(model, contexts: list[Context], *, num_rollouts: int, max_thought_tokens: int,
                    temperature: float, close_id: int, pad_id: int, generator: torch.Generator,
                    score_targets: bool, prediction_tokens: int = 0,
                    token_classes: TokenClasses | None = None) -> Rollouts:
    """Sample G thoughts per context from the current policy (theta_old), then score and/or predict.

    After each thought comes `</think>` (sampled, or forced at the length limit), then the context's
    bridge (the restated last k context tokens, teacher-forced), then:
    score_targets: the targets, teacher-forced, and S_pred = their log-probs (the info-gain reward);
    prediction_tokens > 0: the model writes its prediction of the next word (the rpt rewards); it
    stops where a new word would begin, or after prediction_tokens tokens.
    """
    device = next(model.parameters()).device
    g = num_rollouts
    classes = token_classes.to(device) if token_classes is not None else None
    banned = classes.banned if classes is not None else None
    ids, mask = left_pad([c.prompt for c in contexts], pad_id, device)
    k_bridge = len(contexts[0].bridge)
    if any(len(c.bridge) != k_bridge for c in contexts):
        raise ValueError("every context of a batch must restate the same number of tokens")
    cur = Cursor(model, ids, mask, logits_to_keep=1)
    # room for the thought, the pending token, </think>, the bridge and the scored or written tokens
    cur.repeat(g, reserve=max_thought_tokens + 2 + k_bridge + max(len(contexts[0].targets), prediction_tokens))
    n = ids.shape[0] * g

    thought = decode(cur, cur.logits[:, -1], max_tokens=max_thought_tokens, temperature=temperature,
                     generator=generator, pad_id=pad_id, stop=lambda tok, alive: tok == close_id, banned=banned)
    thought_t, thought_m, closed = thought.tokens, thought.mask, thought.stopped
    # Rows that did not close were cut at the length limit: their last sampled token is not in the cache yet.
    alive = ~closed
    pending = torch.where(alive, thought_t[:, -1], torch.full_like(thought_t[:, -1], pad_id))
    closing = torch.full((n,), close_id, dtype=torch.long, device=device)
    bridge = torch.tensor([c.bridge for c in contexts], dtype=torch.long, device=device).view(len(contexts), k_bridge)
    bridge = bridge.repeat_interleave(g, 0)  # [N, k]

    s_pred = None
    ones = torch.ones_like(alive)
    block = [pending, closing] + [bridge[:, j] for j in range(k_bridge)]
    block_mask = [alive, ones] + [ones] * k_bridge
    horizon = len(contexts[0].targets)
    if score_targets:
        targets = torch.tensor([c.targets for c in contexts], device=device).repeat_interleave(g, 0)  # [N, H]
        block += [targets[:, k] for k in range(horizon - 1)]
        block_mask += [ones] * (horizon - 1)
    block_logits = cur.feed(torch.stack(block, 1), torch.stack(block_mask, 1).long())
    first_target = 1 + k_bridge  # the logits after </think> and the bridge predict x_t
    if score_targets:
        s_pred = token_logp(block_logits[:, first_target:first_target + horizon], targets)

    prediction_ids: list[list[int]] = [[] for _ in range(n)]
    pred_first_prob = None
    pred_t = torch.zeros((n, 0), dtype=torch.long, device=device)
    pred_logp_t = torch.zeros((n, 0), device=device)
    pred_m = torch.zeros((n, 0), dtype=torch.bool, device=device)
    if prediction_tokens > 0:
        if score_targets and horizon > 1:
            raise ValueError("a reward that needs both S_pred with horizon > 1 and a written prediction is not supported")
        stop = WordEnd(classes, n, device) if classes is not None else None  # else: at the length limit only
        pred = decode(cur, block_logits[:, first_target], max_tokens=prediction_tokens, temperature=temperature,
                      generator=generator, pad_id=pad_id, stop=stop, keep_stop_token=False, banned=banned)
        pred_t, pred_logp_t, pred_m = pred.tokens, pred.logp, pred.mask
        pred_first_prob = pred_logp_t[:, 0].exp()  # no row ends at its first token: a word needs one written first
        prediction_ids = [[t for t, m in zip(row, row_mask) if m]
                          for row, row_mask in zip(pred_t.tolist(), pred_m.tolist())]

    # Compact each rollout into [thought tokens, (</think> if forced), bridge, prediction tokens], right-padded.
    thought_lengths = thought_m.sum(1)
    pieces = [(thought_t, thought_m, thought_m, thought.logp)]
    if prediction_tokens > 0:
        forced = ~closed.unsqueeze(1)
        bridge_m = torch.ones_like(bridge, dtype=torch.bool)
        pieces += [(closing.unsqueeze(1), forced, torch.zeros_like(forced), torch.zeros(n, 1, device=device)),
                   (bridge, bridge_m, torch.zeros_like(bridge_m), torch.zeros(n, k_bridge, device=device)),
                   (pred_t, pred_m, pred_m, pred_logp_t)]
    seq, seq_mask, action_mask, sample_logp = _compact(*(torch.cat(parts, 1) for parts in zip(*pieces)),
                                                       pad_id=pad_id)
    return Rollouts(seq=seq, seq_mask=seq_mask, action_mask=action_mask, thought_lengths=thought_lengths,
                    closed=closed, sample_logp=sample_logp, s_pred=s_pred, prediction_ids=prediction_ids,
                    prediction_first_prob=pred_first_prob, forward_tokens=cur.tokens)


