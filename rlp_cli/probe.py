"""The held-out probe: a learning curve that is not batch noise.

A training step's `rlp/info_gain` is a mean over a handful of freshly drawn contexts and thoughts: it
moves by nats from one step to the next whatever the model learns. The probe holds everything but the
weights fixed: the same held-out positions (never trained on: the held-out split is by content hash),
thoughts sampled with the same generator seed, scored before training (step 0) and every
`log.probe_every` steps. Two probe rows therefore differ only by what the model learned, and a
run's curve (or two arms, or two seeds) compares position by position.

Per position, averaged over its `probe_rollouts` thoughts (discounted over the horizon as the reward is):
    s_pred        log p_theta(x_t | x_<t, thought)               the reasoned score
    s_empty       log p_theta(x_t | x_<t, empty thought)          what the format alone gives
    s_ema         log p_ema(x_t | x_<t)                           the no-think baseline (eq. 5)
    s_nothink     log p_theta(x_t | x_<t)                         the current model without a thought: the EMA
                                                                  lags it, so s_pred - s_nothink says whether
                                                                  thinking still helps the model as it is now
    info_gain     s_pred - s_ema                                  the reward
    content_gain  s_pred - s_empty                                what the thought's content adds
    frac_positive share of the thoughts with info_gain > 0
The baseline is the EMA teacher where the objective has one; an `ntp` run has none, and its probe
scores the current model without a thought instead.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import math

import numpy as np
import torch

from rlp_cli import objective as O
from rlp_cli.data import load_documents, split_documents, token_windows
from rlp_cli.rollout import Context, sample_thoughts
from rlp_cli.scoring import empty_thought_logprobs

PROBE_VERSION = 1
FIELDS = ("info_gain", "content_gain", "s_pred", "s_empty", "s_ema", "s_nothink", "frac_positive")
CHUNK_CONTEXTS = 16


class Probe:
    def __init__(self, trainer):
        """The probe's positions: from the held-out split of the run's corpus, drawn with log.probe_seed only
        (not the run's seed), so every run of a grid with the same data settings probes the same positions."""
        cfg, d = trainer.cfg, trainer.cfg.data
        self.trainer = trainer
        seed = cfg.log.probe_seed
        docs = load_documents(d.corpus, d.num_documents, seed, d.text_field, d.txt_split)
        _, heldout = split_documents(docs, d.heldout_fraction)
        min_len = d.min_prefix_tokens + max(cfg.objective.horizon, 1)
        windows = list(dict.fromkeys(map(tuple, token_windows(heldout, trainer.tok, d.max_context_tokens, min_len))))
        rng = np.random.default_rng([seed, 17])
        self.windows: list[list[int]] = []
        self.contexts: list[Context] = []
        self.ids: list[str] = []
        for w in windows:
            if len(self.contexts) >= cfg.log.probe_contexts:
                break
            w = list(w)
            # `surprise` would choose by the EMA, which changes: the probe uses one random position there.
            positions = trainer.positions_in(w, rng) if d.positions != "surprise" else \
                [int(rng.integers(d.min_prefix_tokens, len(w) - cfg.objective.horizon + 1))]
            for t in positions[:1]:
                self.contexts.append(trainer.context_at(w, t, len(self.windows)))
                self.ids.append(hashlib.sha1(f"{w}|{t}".encode()).hexdigest()[:12])
                self.windows.append(w)

    def __len__(self) -> int:
        return len(self.contexts)

    @torch.no_grad()
    def run(self, step: int) -> dict:
        """Score every probe position; returns the probe.jsonl row (per-position lists) for this step."""
        tr, obj = self.trainer, self.trainer.cfg.objective
        g = tr.cfg.log.probe_rollouts
        generator = torch.Generator(device=tr.device).manual_seed(tr.cfg.log.probe_seed * 7919 + 1)
        baseline = tr.teacher if tr.teacher is not None else tr.model
        if tr.teacher is None and tr.needs_ema and tr.model.dtype != torch.float32:
            baseline = copy.deepcopy(tr.model).float()  # what the lazy float32 EMA init will be: same baseline throughout
        was_training = tr.model.training
        tr.model.eval()
        columns = {name: [] for name in FIELDS}
        for a in range(0, len(self.contexts), CHUNK_CONTEXTS):
            contexts = self.contexts[a:a + CHUNK_CONTEXTS]
            windows = self.windows[a:a + CHUNK_CONTEXTS]
            contexts = [dataclasses.replace(c, doc_index=i) for i, c in enumerate(contexts)]
            rollouts = sample_thoughts(tr.model, contexts, num_rollouts=g, max_thought_tokens=obj.thought_tokens,
                                       temperature=obj.temperature, close_id=tr.close_id, pad_id=tr.pad_id,
                                       generator=generator, score_targets=True, token_classes=tr.token_classes)
            s_ema, _ = tr.no_think_logprobs(baseline, windows, contexts)
            s_empty, _ = empty_thought_logprobs(tr.model, contexts, tr.close_id, tr.pad_id)
            s_nothink = s_ema if baseline is tr.model else tr.no_think_logprobs(tr.model, windows, contexts)[0]

            def discounted(x):  # [*, H] -> [*]: the horizon reward's weighting (plain log-prob at H = 1)
                return O.discounted_sum(x.float().cpu(), obj.gamma)

            s_pred = discounted(rollouts.s_pred).view(-1, g)  # [B, G]
            s_ema_b, s_empty_b = discounted(s_ema), discounted(s_empty)
            gain = O.info_gain(s_pred, s_ema_b.unsqueeze(-1))
            columns["s_pred"] += s_pred.mean(-1).tolist()
            columns["s_ema"] += s_ema_b.tolist()
            columns["s_empty"] += s_empty_b.tolist()
            columns["s_nothink"] += discounted(s_nothink).tolist()
            columns["info_gain"] += gain.mean(-1).tolist()
            columns["content_gain"] += (s_pred - s_empty_b.unsqueeze(-1)).mean(-1).tolist()
            columns["frac_positive"] += (gain > 0).float().mean(-1).tolist()
        tr.model.train(was_training)
        return {"step": step, "probe_version": PROBE_VERSION, "items": self.ids, "rollouts": g, **columns}


def probe_means(row: dict) -> dict:
    """The probe/* metrics of a probe.jsonl row: the mean of each field over the positions."""
    out = {}
    for name in FIELDS:
        values = [v for v in row[name] if v is not None and math.isfinite(v)]
        out[f"probe/{name}"] = sum(values) / len(values) if values else None
    return out
