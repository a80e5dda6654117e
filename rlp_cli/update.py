"""The update's forward and backward: log pi_theta(thought token | prompt, earlier thought tokens), with gradients.

Fast path (RLP_SPEC section 5): each prompt is forwarded once with gradients and its G thoughts run
against its cache. The gradient still flows through the shared prompt, and the result equals
re-encoding prompt + thought for every rollout (the naive path; tests/test_rollout.py).

Memory (docs/performance.md): the batch is updated a chunk of contexts at a time, and a chunk's
thoughts a slice of rows at a time. Between the two, the prompt's keys, values and last logits are
cut from its graph (PromptBoundary): each slice of thoughts runs its backward into them, then the
prompt's backward runs once with their summed gradients. This is exact, and it computes nothing
twice. Only one slice of thought activations is alive at a time, next to the prompt's.

Layout: context b has rollouts b*G ... b*G+G-1 (rollout index = b*G + g).
"""

from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F

from rlp_cli.models import forward
from rlp_cli.cursor import Cursor, left_pad, positions, right_pad
from rlp_cli.rollout import Context, Rollouts, token_logprobs


def _thought_logprobs(cur: Cursor, seq: torch.Tensor, seq_mask: torch.Tensor, temperature: float,
                      banned: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(logp, entropy) [N, S] of seq after the prompts in cur (one row of cur per row of seq).

    The prompt's last logits predict seq[:, 0]; the thought's own logits predict the rest. Scored
    apart, so the [N, S, V] logits are never concatenated into a second copy.
    """
    parts = [token_logprobs(cur.logits[:, -1:], seq[:, :1], temperature, banned)]
    if seq.shape[1] > 1:
        parts.append(token_logprobs(cur.feed(seq[:, :-1], seq_mask[:, :-1]), seq[:, 1:], temperature, banned))
    logp, entropy = (torch.cat(p, dim=1) for p in zip(*parts))
    return logp, entropy


def _only_actions(logp: torch.Tensor, action_mask: torch.Tensor) -> torch.Tensor:
    # Padding and teacher-forced slots (a forced </think>, the bridge) are no actions: a banned pad token
    # would give -inf there, and a ratio of exp(-inf - -inf) would poison the loss with NaN.
    return torch.where(action_mask.bool(), logp, 0.0)


def policy_logprobs(model, contexts: list[Context], rollouts: Rollouts, num_rollouts: int, temperature: float,
                    pad_id: int, fast: bool = True, banned: torch.Tensor | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor, int]:
    """log pi_theta(seq_u | prompt, seq_<u) for every action slot of rollouts.seq (0 elsewhere), and the entropy.

    Fast: each prompt is forwarded once, its cache repeated G times, and the thought tokens run
    against it. Naive: every prompt + thought re-encoded from scratch. Returns (logp [N, S],
    entropy [N, S], token slots). With gradients unless called under torch.no_grad() (the KL
    reference's scores).
    """
    device = rollouts.seq.device
    seq, seq_mask = rollouts.seq, rollouts.seq_mask
    if fast:
        ids, mask = left_pad([c.prompt for c in contexts], pad_id, device)
        cur = Cursor(model, ids, mask, logits_to_keep=1)
        cur.repeat(num_rollouts)
        logp, entropy = _thought_logprobs(cur, seq, seq_mask, temperature, banned)
        tokens = cur.tokens
    else:
        prompts = [c.prompt for c in contexts for _ in range(num_rollouts)]
        rows = [p + seq[i, :int(seq_mask[i].sum())].tolist() for i, p in enumerate(prompts)]
        ids, mask = right_pad(rows, pad_id, device)
        out, _ = forward(model, ids, mask, positions(mask))
        width = seq.shape[1]
        out = F.pad(out, (0, 0, 0, width))  # a long prompt with a short thought may end before its slice does
        logits = torch.stack([out[i, len(p) - 1:len(p) - 1 + width] for i, p in enumerate(prompts)])
        logp, entropy = token_logprobs(logits, seq, temperature, banned)
        tokens = ids.numel()
    return _only_actions(logp, rollouts.action_mask), entropy, tokens


class PromptBoundary:
    """The prompts' keys and values (every layer) and last logits, cut from the prompts' graph.

    Thoughts run on caches of the cut tensors (leaves), so each slice's backward stops at the boundary
    and adds into the leaves' .grad; backward() then runs the prompts' backward once with those sums.
    By the chain rule this is the gradient of one backward through everything. Each extra backward adds
    a parameter-sized gradient into .grad, so where one slice takes every row (a GPU, a small model)
    nothing is cut and one backward does it all. (Running the prompts' backward in the last slice's pass
    instead raised the peak: the engine starts on the prompts while that slice's activations are alive.)
    """

    def __init__(self, cur: Cursor):
        self.cur = cur
        self.outputs = [t for layer in cur.cache.layers for t in (layer.keys, layer.values)] + [cur.logits]
        self.leaves = [t.detach().requires_grad_(t.requires_grad) for t in self.outputs]

    def rows(self, index: torch.Tensor, cut: bool = True) -> Cursor:
        """A cursor over the prompts at `index` (one entry per thought row), on a cache of the leaves; with
        cut=False, on the prompts' own tensors (one slice takes every row: one backward does it all)."""
        *kv, logits = (t.index_select(0, index) for t in (self.leaves if cut else self.outputs))
        cache = copy.copy(self.cur.cache)  # the same kind of cache and layers (sliding windows stay sliding)
        cache.layers = [copy.copy(layer) for layer in self.cur.cache.layers]
        for i, layer in enumerate(cache.layers):
            layer.keys, layer.values = kv[2 * i], kv[2 * i + 1]
        branch = copy.copy(self.cur)
        branch.cache, branch.logits, branch.tokens = cache, logits, 0
        branch.mask, branch.next_pos = self.cur.mask[index], self.cur.next_pos[index]
        return branch

    def backward(self) -> None:
        pairs = [(out, leaf.grad) for out, leaf in zip(self.outputs, self.leaves) if leaf.grad is not None]
        if pairs:
            torch.autograd.backward([p[0] for p in pairs], [p[1] for p in pairs])


ACTIVATION_BUDGET_BYTES = {"cpu": 512 * 2**20}  # per backward; other devices: a quarter of their memory
MIN_SLICE_TOKENS = 128  # thought tokens per backward at least: smaller matrix products run far under the limit


def _activation_bytes_per_token(model) -> int:
    """Saved activations: about 34 floats per hidden unit per layer per token (measured on SmolLM2, GQA
    attention over a repeated prefix included), plus the logits and their gradient."""
    cfg = model.config
    return 4 * (34 * cfg.hidden_size * cfg.num_hidden_layers + 2 * cfg.vocab_size)


def _activation_budget(device: torch.device) -> int:
    budget = ACTIVATION_BUDGET_BYTES.get(device.type)
    if budget is None:
        budget = torch.cuda.get_device_properties(device).total_memory // 4 if device.type == "cuda" else 2**31
    return budget


def _contexts_per_chunk(model, contexts: list[Context], rollouts: Rollouts, num_rollouts: int) -> int:
    """How many contexts' forward+backward fit the activation budget at once (at least one)."""
    tokens = num_rollouts * rollouts.seq.shape[1] + max(len(c.prompt) for c in contexts)
    return max(1, _activation_budget(rollouts.seq.device) // (_activation_bytes_per_token(model) * tokens))


def _rows_per_backward(model, contexts: list[Context], rollouts: Rollouts) -> int:
    """How many thought rows one backward takes, next to the prompts' activations, which stay alive."""
    per_token, width = _activation_bytes_per_token(model), rollouts.seq.shape[1]
    room = _activation_budget(rollouts.seq.device) - per_token * sum(len(c.prompt) for c in contexts)
    fitting = room // (per_token * width)
    return int(max(fitting, math.ceil(MIN_SLICE_TOKENS / width), 1))


def policy_update(model, contexts: list[Context], rollouts: Rollouts, num_rollouts: int, temperature: float,
                  pad_id: int, chunk_loss, fast: bool = True, contexts_per_chunk: int | None = None,
                  rows_per_backward: int | None = None, banned: torch.Tensor | None = None):
    """The update's forward and backward, a few contexts and a slice of their thoughts at a time.

    chunk_loss(rows, logp) -> those rows' share of the batch loss, where rows is a slice of the N rollouts
    and logp [rows, S] their log-probs (with gradient); a mean over thoughts is shared as
    (mean over the slice's thoughts) * slice_rows / N. backward() runs on each share, so the
    parameters' .grad accumulate exactly the gradient of the whole-batch loss (the caller zeroes
    them first). On a CPU at the reference setting a chunk is one context, its 8 thoughts go
    through in two slices of 4, and about 0.7 GB of activations live at once instead of 3 GB.
    Returns (logp detached [N, S], entropy [N, S], token slots, loss = sum of the shares, detached).
    """
    g, (n, width) = num_rollouts, rollouts.seq.shape
    per = contexts_per_chunk or _contexts_per_chunk(model, contexts, rollouts, g)
    logp = torch.zeros(n, width, device=rollouts.seq.device)
    entropy = torch.zeros_like(logp)
    tokens, loss = 0, torch.zeros((), device=rollouts.seq.device)

    def loss_of(rows: slice, lp: torch.Tensor, ent: torch.Tensor) -> torch.Tensor:
        nonlocal loss
        share = chunk_loss(rows, F.pad(lp, (0, width - lp.shape[1])))
        logp[rows, :lp.shape[1]], entropy[rows, :lp.shape[1]] = lp.detach(), ent.detach()
        loss = loss + share.detach()
        return share

    for first in range(0, len(contexts), per):
        chunk = contexts[first:first + per]
        rows = slice(first * g, (first + len(chunk)) * g)
        if not fast:
            lp, ent, t = policy_logprobs(model, chunk, rollouts.select(rows), g, temperature, pad_id, False, banned)
            loss_of(rows, lp, ent).backward()
            tokens += t
            continue
        ids, mask = left_pad([c.prompt for c in chunk], pad_id, rollouts.seq.device)
        cur = Cursor(model, ids, mask, logits_to_keep=1)
        boundary = PromptBoundary(cur)
        step = rows_per_backward or _rows_per_backward(model, chunk, rollouts.select(rows))
        for start in range(rows.start, rows.stop, step):
            part = slice(start, min(rows.stop, start + step))
            part_rollouts = rollouts.select(part)
            branch = boundary.rows(torch.arange(part.start - rows.start, part.stop - rows.start,
                                                device=ids.device) // g, cut=step < rows.stop - rows.start)
            lp, ent = _thought_logprobs(branch, part_rollouts.seq, part_rollouts.seq_mask, temperature, banned)
            loss_of(part, _only_actions(lp, part_rollouts.action_mask), ent).backward()
            tokens += branch.tokens
        boundary.backward()
        tokens += cur.tokens
    return logp, entropy, tokens, loss
