"""A batch of token sequences extended block by block against one KV cache (Cursor), and its padding.

The trainer's rollout and update and `rlp eval` all run the model through a Cursor: prompts are
forwarded once (on a CPU without their padding, where that pays), the cache repeated per thought,
and decoding appends into room reserved in the cache instead of re-concatenating it at every step.
"""

from __future__ import annotations

import functools
import weakref

import torch
import torch.nn.functional as F

from rlp_cli.models import forward


def left_pad(rows: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - len(r):] = torch.tensor(r, dtype=torch.long)
        mask[i, width - len(r):] = 1
    return ids.to(device), mask.to(device)


def right_pad(rows: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(1, max(len(r) for r in rows))
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, :len(r)] = torch.tensor(r, dtype=torch.long)
        mask[i, :len(r)] = 1
    return ids.to(device), mask.to(device)


def _plain_dynamic_cache(cache) -> bool:
    """A cache made only of transformers' plain DynamicLayers, whose keys/values we may reshape by hand."""
    from transformers.cache_utils import DynamicLayer

    layers = getattr(cache, "layers", None)
    return bool(layers) and all(type(layer) is DynamicLayer and layer.is_initialized for layer in layers)


def _is_left_padded(mask: torch.Tensor) -> bool:
    """Every row is padding followed only by real tokens."""
    return bool((mask[:, 1:] >= mask[:, :-1]).all())


def positions(mask: torch.Tensor, start: torch.Tensor | None = None) -> torch.Tensor:
    """Position ids that advance only over real tokens; masked slots reuse their neighbour's id."""
    pos = mask.long().cumsum(-1) - 1
    if start is not None:
        pos = pos + start.unsqueeze(-1)
    return pos.clamp(min=0)


def _append_in_place(layer, key_states, value_states, *args, **kwargs):
    """DynamicLayer.update for a layer given spare room by Cursor.reserve: write the new positions into it."""
    start, stop = layer.keys.shape[-2], layer.keys.shape[-2] + key_states.shape[-2]
    if stop > layer._room_keys.shape[-2]:  # out of room: back to concatenation
        del layer.update, layer._room_keys, layer._room_values
        return layer.update(key_states, value_states, *args, **kwargs)
    layer._room_keys[..., start:stop, :] = key_states
    layer._room_values[..., start:stop, :] = value_states
    layer.keys, layer.values = layer._room_keys[..., :stop, :], layer._room_values[..., :stop, :]
    return layer.keys, layer.values


UNPADDED_PREFILL: bool | None = None  # None: decide by cost (unpadded_prefill_pays); True/False: force (tests)


def unpadded_prefill_pays(model, mask: torch.Tensor) -> bool:
    """Whether forwarding left-padded prompts one by one beats one padded batch.

    On a CPU every padded slot costs as much as a real token (about half the prompt slots at the
    reference setting), while an extra forward call costs a few ms of Python; on a GPU a small
    batch is latency-bound, so padding is free and extra calls are not.
    """
    if UNPADDED_PREFILL is not None:
        return UNPADDED_PREFILL and mask.shape[0] > 1
    if mask.shape[0] == 1 or mask.device.type != "cpu":
        return False
    padded_slots = mask.numel() - int(mask.sum())
    padding_seconds = padded_slots * 2 * sum(p.numel() for p in model.parameters()) / 3e10  # ~30 GFLOP/s a core
    return padding_seconds > 3e-3 * (mask.shape[0] - 1)  # ~3 ms per extra call


def _prefill_groups(lengths: list[int], max_padding: float | None) -> list[list[int]]:
    """Rows forwarded together: each alone (max_padding None), or runs of consecutive rows whose own
    padding stays within max_padding of their slots."""
    groups: list[list[int]] = []
    for i, length in enumerate(lengths):
        if groups and max_padding is not None:
            group = groups[-1] + [i]
            width = max(lengths[j] for j in group)
            if width * len(group) - sum(lengths[j] for j in group) <= max_padding * width * len(group):
                groups[-1] = group
                continue
        groups.append([i])
    return groups


def _prefill_unpadded(model, ids: torch.Tensor, mask: torch.Tensor, max_padding: float | None = None):
    """The last logits [B, 1, V], cache and computed slots of left-padded prompts, without the batch's padding.

    Each prompt is forwarded alone (the trainer's prompts), or with max_padding, consecutive prompts in
    groups whose own padding stays within that share of their slots (evaluate's prompts, sorted by
    length: on a CPU with 2 threads, SmolLM2 prefilled the quick suite in groups of 8 at 127 GFLOP/s,
    one by one at 60). The caches are left-padded with zeros into one batch cache: the attention mask
    hides those slots, so the result equals the padded forward's (and gradients flow through pad and cat).
    """
    width = ids.shape[1]
    lengths = mask.sum(-1).tolist()
    parts = []
    for group in _prefill_groups(lengths, max_padding):
        start = width - max(lengths[i] for i in group)
        rows = slice(group[0], group[-1] + 1)
        group_mask = mask[rows, start:]
        parts.append(forward(model, ids[rows, start:], group_mask, positions(group_mask), None, logits_to_keep=1))
        if len(parts) == 1 and not _plain_dynamic_cache(parts[0][1]):
            return None  # sliding-window or other layers: padding them by hand is not safe
    slots = sum(c.layers[0].keys.shape[0] * c.layers[0].keys.shape[-2] for _, c in parts)
    cache = parts[0][1]
    for k, layer in enumerate(cache.layers):
        for name in ("keys", "values"):
            pieces = [getattr(c.layers[k], name) for _, c in parts]
            setattr(layer, name, torch.cat([F.pad(t, (0, 0, width - t.shape[-2], 0)) for t in pieces], dim=0))
    return torch.cat([logits[:, -1:] for logits, _ in parts], dim=0), cache, slots


class Cursor:
    """A batch of sequences being extended block by block against one KV cache."""

    def __init__(self, model, ids, mask, cache=None, logits_to_keep=0, prefill_padding: float | None = None):
        """Forward the prompts `ids` [B, T] (mask: 1 = real token). prefill_padding: see _prefill_unpadded."""
        self.model = model
        self.mask = mask
        self.next_pos = mask.sum(-1)
        unpadded = None
        if cache is None and logits_to_keep == 1 and _is_left_padded(mask) and unpadded_prefill_pays(model, mask):
            unpadded = _prefill_unpadded(model, ids, mask, prefill_padding)
        if unpadded is not None:
            self.logits, self.cache, self.tokens = unpadded
        else:
            self.logits, self.cache = forward(model, ids, mask, positions(mask), cache, logits_to_keep=logits_to_keep)
            self.tokens = ids.numel()

    def repeat(self, g: int, reserve: int = 0) -> None:
        """Each row becomes g rows sharing its prefix (the cache is repeated, not recomputed).

        reserve: room for that many more positions as well (see Cursor.reserve), written by the same copy:
        repeating and then reserving would hold the repeated cache twice (1.3 GB more at the peak of
        `rlp eval` on SmolLM2 with 240 rows) and copy it twice. No-grad decoding only, like reserve.
        """
        if reserve and _plain_dynamic_cache(self.cache):
            self._allocate_room(reserve, g)
        else:
            self.cache.batch_repeat_interleave(g)
            if reserve:
                self.reserve(reserve)
        self.mask = self.mask.repeat_interleave(g, 0)
        self.next_pos = self.next_pos.repeat_interleave(g, 0)
        self.logits = self.logits.repeat_interleave(g, 0)

    @torch.no_grad()
    def reserve(self, extra_tokens: int) -> None:
        """Make room for `extra_tokens` more positions in the cache, so decoding appends in place.

        Transformers' DynamicLayer re-concatenates the whole cache at every step (for SmolLM2 with 32 rows:
        ~6% of decoding CPU time, and more wall time when other processes compete for memory bandwidth).
        Only for no-grad decoding (writing into a buffer that autograd saved would be an in-place error);
        caches of another kind are left as they are.
        """
        if _plain_dynamic_cache(self.cache):
            self._allocate_room(extra_tokens, 1)

    @torch.no_grad()
    def _allocate_room(self, extra_tokens: int, g: int) -> None:
        """Copy each layer's keys and values, every row g times, into buffers with extra_tokens more positions."""
        for layer in self.cache.layers:
            length = layer.keys.shape[-2]
            for name in ("keys", "values"):
                old = getattr(layer, name)
                rows, rest = old.shape[0], old.shape[1:-2]
                room = old.new_empty((rows * g,) + rest + (length + extra_tokens, old.shape[-1]))
                room.view((rows, g) + room.shape[1:])[..., :length, :] = old.unsqueeze(1)
                setattr(layer, "_room_" + name, room)
                setattr(layer, name, room[..., :length, :])
            # through a weak reference: a bound method would make each layer a reference cycle, and the
            # cache (~300 MB for SmolLM2 at the reference setting) would live on until Python's cycle
            # collector happened to run, raising the update's peak memory
            layer.update = functools.partial(_append_in_place, weakref.proxy(layer))

    @torch.no_grad()
    def keep(self, index: torch.Tensor) -> None:
        """Keep only the rows at `index`: finished rows leave the batch, and later steps no longer compute them.

        The reserved room is selected with the rows (one copy of the kept rows' cache), so appending
        stays in place.
        """
        for layer in self.cache.layers:
            if hasattr(layer, "_room_keys"):
                length = layer.keys.shape[-2]
                for name in ("keys", "values"):
                    room = getattr(layer, "_room_" + name).index_select(0, index)
                    setattr(layer, "_room_" + name, room)
                    setattr(layer, name, room[..., :length, :])
            else:
                layer.batch_select_indices(index)
        self.mask, self.next_pos = self.mask[index], self.next_pos[index]
        self.logits = self.logits[index]

    def feed(self, ids: torch.Tensor, mask: torch.Tensor, logits_to_keep: int = 0) -> torch.Tensor:
        """Append a block [N, k] (mask 0 = a slot this row skips); return its logits [N, k, V] (or the last
        logits_to_keep of them)."""
        pos = positions(mask, self.next_pos)
        self.mask = torch.cat([self.mask, mask.long()], dim=1)
        attention = self.mask
        if ids.shape[1] == 1 and getattr(self.model.config, "_attn_implementation", None) == "sdpa":
            # One new token sees every real slot: pass SDPA's 4D mask directly and skip transformers'
            # mask construction (12% of a decoding call of the tiny model). Every row keeps at least
            # its prompt visible, so no query row is fully masked.
            attention = self.mask.bool()[:, None, None, :]
        self.logits, self.cache = forward(self.model, ids, attention, pos, self.cache, logits_to_keep)
        self.next_pos = self.next_pos + mask.long().sum(-1)
        self.tokens += ids.numel()
        return self.logits
