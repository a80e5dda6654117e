"""The trainer: RLP's Algorithm 1 and the objectives it is compared against.

`thought_policy_step` is one step of Algorithm 1 for any registered reward (RLP's information gain
or RPT's matches); `ntp_step` is next-token continued pretraining (the paper's CPT baseline).
`Trainer` owns the state a run needs to resume exactly (model, optimizer, EMA teacher, RNG states,
data position); rlp_cli/run.py drives it step by step and writes the run folder.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import os
import random
import time
from pathlib import Path

import numpy as np
import torch

from rlp_cli import distributed
from rlp_cli import objective as O
from rlp_cli import runio
from rlp_cli.config import TrainConfig
from rlp_cli.data import (WindowStream, answer_positions, load_documents, select_positions, split_documents,
                          token_windows)
from rlp_cli.errors import RunFailed, UserError
from rlp_cli.faults import failpoint
from rlp_cli.models import configure_cpu, forward, load_model, resolve_device, token_classes
from rlp_cli.rewards import RewardInputs, get_reward
from rlp_cli.runfolder import RunFolder
from rlp_cli.rollout import Context, sample_thoughts, thought_context
from rlp_cli.scoring import (context_logprobs, empty_thought_logprobs, naive_context_logprobs, naive_s_pred,
                             window_logprobs)
from rlp_cli.update import policy_logprobs, policy_update

CONTINUATION_TOKENS = 32  # how much of the true text the rpt rewards may match against
# Metrics that count things are added up over data-parallel ranks; every other metric is averaged.
SUMMED_OVER_RANKS = ("_generated", "_num_tokens", "_flops", "num_contexts")


class PhaseTimer:
    """Wall time per phase of a step (synchronising CUDA so a phase is not billed to the next one), and
    counts a phase may add (`rlp bench --eval`: tokens generated and forwarded)."""

    def __init__(self, device: torch.device):
        self.device, self.seconds, self.counts = device, {}, {}

    def count(self, key: str, n) -> None:
        self.counts[key] = self.counts.get(key, 0) + int(n)

    def __call__(self, name: str):
        timer = self

        class _Phase:
            def __enter__(self):
                if timer.device.type == "cuda":
                    torch.cuda.synchronize(timer.device)
                self.start = time.perf_counter()

            def __exit__(self, *exc):
                if timer.device.type == "cuda":
                    torch.cuda.synchronize(timer.device)
                timer.seconds[name] = timer.seconds.get(name, 0.0) + time.perf_counter() - self.start

        return _Phase()


class NonFiniteError(RunFailed):
    """A reward, loss or gradient became NaN or infinite: the run stops at that step, weights untouched."""


def check_finite(step: int, **values) -> None:
    bad = [name for name, v in values.items() if not bool(torch.isfinite(torch.as_tensor(v)).all())]
    if bad:
        error = NonFiniteError(f"step {step}: non-finite {', '.join(bad)}: the run diverged. The optimizer step that "
                               "would have used it was skipped; the last checkpoint is intact. Fix: lower optim.lr, "
                               "or check the data.")
        error.step = step
        raise error


class MasterWeights:
    """float32 master copies of a low-precision model's parameters.

    AdamW updates the float32 copies and the model gets them rounded; the EMA teacher (float32 too)
    follows the masters. A float32 model is its own master: no copy is made.
    """

    def __init__(self, model: torch.nn.Module):
        self.model_params = list(model.parameters())
        self.copied = any(p.dtype != torch.float32 for p in self.model_params)
        self.params = [p.detach().float().clone().requires_grad_(True) if self.copied else p
                       for p in self.model_params]

    def take_grads(self) -> None:
        if self.copied:
            for m, p in zip(self.params, self.model_params):
                m.grad = None if p.grad is None else p.grad.float()
                p.grad = None

    @torch.no_grad()
    def push_weights(self) -> None:
        if self.copied:
            for m, p in zip(self.params, self.model_params):
                p.copy_(m)


def matmul_params(model) -> int:
    """Parameters used in matrix products per token (the embedding lookup is free; a tied head is not)."""
    n_unique = sum(p.numel() for p in model.parameters())
    emb = model.get_input_embeddings().weight
    out = model.get_output_embeddings()
    tied = out is not None and out.weight.data_ptr() == emb.data_ptr()
    return n_unique if tied else n_unique - emb.numel()


def make_optimizer(params: list[torch.nn.Parameter], optim, device: torch.device) -> torch.optim.AdamW:
    """AdamW, fused into one kernel where torch has one for the device (CPU and CUDA).

    The default multi-tensor (foreach) AdamW forms several parameter-sized temporaries: on SmolLM2 it
    took 0.41 s a step and ~0.5 GB of peak memory; the fused one 0.17 s (docs/performance.md).
    Both compute the same update to float rounding.
    """
    fused = device.type in ("cpu", "cuda")  # the params are MasterWeights': float32, a dtype both kernels take
    return torch.optim.AdamW(params, lr=optim.lr, betas=optim.betas, weight_decay=optim.weight_decay,
                             **({"fused": True} if fused else {}))


def sparse_embedding_gradient(model) -> None:
    """Let a tied input embedding send its gradient as the few rows it used, not a [V, H] tensor.

    The dense embedding backward zero-fills a vocabulary-sized tensor per forward call and adds it to
    the head's gradient (SmolLM2: 113 MB, twice per update chunk). With tied weights the head's dense
    gradient reaches the same leaf in the same backward, so the parameter's .grad stays dense and
    AdamW and clipping see exactly the same numbers. An untied embedding keeps its dense gradient
    (AdamW takes no sparse one).
    """
    emb, out = model.get_input_embeddings(), model.get_output_embeddings()
    if isinstance(emb, torch.nn.Embedding) and out is not None and out.weight is emb.weight:
        emb.sparse = True


class Trainer:
    def __init__(self, config: TrainConfig, out_dir: Path | None = None):
        self.cfg = config
        self.out = Path(out_dir) if out_dir else None
        self.threads = configure_cpu(config.threads)
        world = distributed.world_from_env()
        self.device = resolve_device(distributed.device_for(config.device, world))
        self.world = distributed.start(world, self.device)
        self._seed_everything(config.seed)
        loaded = load_model(config.model.name, config.model.dtype, self.device)
        self.model, self.tok = loaded.model, loaded.tokenizer
        distributed.broadcast_parameters(self.model, self.world)
        self.model_source = loaded.source
        self.open_id, self.close_id = loaded.think_open_id, loaded.think_close_id
        self.pad_id = self.tok.pad_token_id
        self.token_classes = token_classes(self.tok, self.open_id, self.close_id,
                                           self.model.get_output_embeddings().weight.shape[0])
        self.banned = self.token_classes.banned.to(self.device)
        self.blank_ids = set(torch.nonzero(self.token_classes.blank).flatten().tolist())
        self.answer_marker = self.tok(config.data.answer_marker, add_special_tokens=False).input_ids
        self.model.train()

        obj = config.objective
        self.reward = None if obj.name == "ntp" else get_reward(obj.reward_name())
        if self.reward is not None and "prediction" in self.reward.needs and "s_pred" in self.reward.needs \
                and obj.horizon > 1:
            raise UserError("objective.horizon > 1 cannot be combined with a reward that writes a prediction. "
                            "Fix: set objective.horizon: 1.")
        self.needs_ema = self.reward is not None and ("s_ema" in self.reward.needs or config.data.positions == "surprise")
        self.teacher = None  # the EMA teacher phi: lazily initialised from theta on the first batch
        self.reference = None
        if obj.kl_beta > 0 and self.reward is not None:
            self.reference = copy.deepcopy(self.model).eval().requires_grad_(False)

        self.master = MasterWeights(self.model)
        self.trainable = list(self.model.parameters())
        self.optimizer = make_optimizer(self.master.params, config.optim, self.device)
        sparse_embedding_gradient(self.model)
        self.flops_per_token = 2 * matmul_params(self.model)

        docs = load_documents(config.data.corpus, config.data.num_documents, config.seed, config.data.text_field,
                              config.data.txt_split)
        train_docs, self.heldout_docs = split_documents(docs, config.data.heldout_fraction)
        min_len = config.data.min_prefix_tokens + max(obj.horizon, 1)
        # Every rank walks the same stream of global batches and keeps its share (distributed.py).
        windows = token_windows(train_docs, self.tok, config.data.max_context_tokens, min_len)
        self.stream = WindowStream(windows, config.seed)
        self.prompt_ids = self.tok(obj.thought_prompt, add_special_tokens=False).input_ids if obj.thought_prompt else []

        # Thoughts: each rank samples its own; positions: drawn over the global batch, the same on every rank.
        self.generator = torch.Generator(device=self.device).manual_seed(config.seed * 1009 + self.world.rank)
        self.position_rng = np.random.default_rng([config.seed, 0, 7])
        self.step = 0
        self.checkpoint_sha256: str | None = None  # of checkpoint/state.pt as this process last wrote or read it
        self.totals = {"input_tokens": 0, "generated_tokens": 0, "num_tokens": 0, "flops": 0.0}

    @staticmethod
    def _seed_everything(seed: int) -> None:
        random.seed(seed)
        np.random.seed(seed % 2**32)
        torch.manual_seed(seed)

    # ----------------------------------------------------------------------------------------
    # Budgets and schedule

    def done(self) -> bool:
        b = self.cfg.budget
        return (b.steps is not None and self.step >= b.steps) or \
            (b.input_tokens is not None and self.totals["input_tokens"] >= b.input_tokens)

    def progress_fraction(self) -> float:
        b = self.cfg.budget
        fractions = []
        if b.steps:
            fractions.append(self.step / b.steps)
        if b.input_tokens:
            fractions.append(self.totals["input_tokens"] / b.input_tokens)
        return min(1.0, max(fractions)) if fractions else 0.0

    def learning_rate(self) -> float:
        o = self.cfg.optim
        if o.lr_end is None:
            return o.lr
        return o.lr + (o.lr_end - o.lr) * self.progress_fraction()

    # ----------------------------------------------------------------------------------------
    # One step

    def train_step(self) -> tuple[dict, dict | None]:
        for group in self.optimizer.param_groups:
            group["lr"] = self.learning_rate()
        batch = self.stream.next_batch(self.cfg.optim.batch_documents)
        windows, positions = batch, None
        if self.world.active:
            windows = distributed.my_share(batch, self.world)
            if self.reward is not None and self.cfg.data.positions != "surprise":
                # drawn for the whole global batch, so every world size trains on the same positions
                positions = distributed.my_share([self.positions_in(w, self.position_rng) for w in batch], self.world)
        start = time.perf_counter()
        if self.reward is None:
            metrics, sample = self.ntp_step(windows)
        else:
            metrics, sample = self.thought_policy_step(windows, positions)
        metrics = distributed.reduce_metrics(metrics, self.world, self.device, SUMMED_OVER_RANKS)
        self.step += 1
        input_tokens = sum(len(w) for w in batch)
        self.totals["input_tokens"] += input_tokens
        self.totals["generated_tokens"] += int(metrics.pop("_generated", 0))
        self.totals["num_tokens"] += int(metrics.pop("_num_tokens", 0))
        self.totals["flops"] += metrics.pop("_flops", 0.0)
        metrics.update(step=self.step, epoch=self.stream.epoch, learning_rate=self.learning_rate(),
                       step_time=time.perf_counter() - start, **self.totals)
        return metrics, sample

    def positions_in(self, window: list[int], rng: np.random.Generator, ema_logprobs=None) -> list[int]:
        d = self.cfg.data
        answers = answer_positions(window, self.answer_marker, self.blank_ids) if d.positions == "answer" else None
        return select_positions(d.positions, len(window), d.min_prefix_tokens, len(window) - self.cfg.objective.horizon,
                                rng, stride=d.stride, k=d.surprise_k, cap=d.max_positions_per_document,
                                ema_logprobs=ema_logprobs, answers=answers)

    def context_at(self, window: list[int], t: int, doc_index: int) -> Context:
        """The thought format (docs/method.md): [prompt] x_<t <think> thought </think> [x_{t-k}..x_{t-1}] x_t."""
        obj = self.cfg.objective
        return thought_context(window, t, prompt_ids=self.prompt_ids, open_id=self.open_id, restate=obj.restate_tokens,
                               horizon=obj.horizon, continuation=CONTINUATION_TOKENS, doc_index=doc_index)

    def contexts_for(self, windows: list[list[int]], ema_logprobs) -> list[Context]:
        return [self.context_at(w, t, i) for i, w in enumerate(windows)
                for t in self.positions_in(w, self.position_rng, None if ema_logprobs is None else ema_logprobs[i])]

    def no_think_logprobs(self, model, windows: list[list[int]], contexts: list[Context]) -> tuple[torch.Tensor, int]:
        """S_ema (or any no-think score) of the contexts' targets, conditioned on the same instruction as S_pred."""
        windows, contexts = self.with_prompt(windows, contexts)
        if self.cfg.fast_path:
            return context_logprobs(model, windows, contexts, self.pad_id)
        return naive_context_logprobs(model, windows, contexts, self.pad_id)

    def with_prompt(self, windows, contexts):
        """The windows with thought_prompt in front and positions shifted to match (both sides of eq. 5 see it)."""
        if not self.prompt_ids:
            return windows, contexts
        shift = len(self.prompt_ids)
        return ([self.prompt_ids + w for w in windows],
                [dataclasses.replace(c, position=c.position + shift) for c in contexts])

    def token_strings(self, ids: list[int]) -> list[str]:
        """Each token's text, decoded in context so multi-byte characters split across tokens survive."""
        out, prev = [], ""
        for k in range(1, len(ids) + 1):
            text = self.tok.decode(ids[:k])
            out.append(text[len(prev):])
            prev = text
        return out

    def thought_policy_step(self, windows: list[list[int]], positions: list[list[int]] | None = None
                            ) -> tuple[dict, dict]:
        """Algorithm 1: sample G thoughts per context, reward them, clipped policy-gradient update(s)."""
        cfg, obj = self.cfg, self.cfg.objective
        g, fast, needs = obj.num_rollouts, cfg.fast_path, self.reward.needs
        flop_tokens = {"forward": 0, "train": 0}
        phase = self.phases = PhaseTimer(self.device)

        # Lazy EMA init: phi <- theta on the first batch (kept in float32 whatever the model's dtype).
        if self.needs_ema and self.teacher is None:
            self.teacher = copy.deepcopy(self.model).float().eval().requires_grad_(False)
        # S_ema: the `surprise` rule needs it at every position to choose them (one forward per window);
        # any other rule chooses first, and only the chosen positions are scored.
        ema_lp, h = None, obj.horizon
        if self.teacher is not None and cfg.data.positions == "surprise":
            with phase("ema_scoring"):
                prompted, _ = self.with_prompt(windows, [])
                ema_lp, n = window_logprobs(self.teacher, prompted, self.pad_id)
                ema_lp = [lp[len(self.prompt_ids):] for lp in ema_lp]
            flop_tokens["forward"] += n
        contexts = self.contexts_for(windows, ema_lp) if positions is None else \
            [self.context_at(w, t, i) for i, w in enumerate(windows) for t in positions[i]]

        # theta_old = theta: the policy that samples is the current weights.
        self.model.eval()
        with phase("rollout"):
            rollouts = sample_thoughts(self.model, contexts, num_rollouts=g, max_thought_tokens=obj.thought_tokens,
                                       temperature=obj.temperature, close_id=self.close_id, pad_id=self.pad_id,
                                       generator=self.generator, score_targets="s_pred" in needs and fast,
                                       prediction_tokens=obj.prediction_tokens if "prediction" in needs else 0,
                                       token_classes=self.token_classes)
        flop_tokens["forward"] += rollouts.forward_tokens

        # Rewards (constants): r = S_pred - S_ema (eq. 5), or RPT's matches.
        inputs = RewardInputs(num_rollouts=g, gamma=obj.gamma,
                              target_ids=torch.tensor([c.targets for c in contexts]).repeat_interleave(g, 0),
                              continuation_tokens=[strings for c in contexts
                                                   for strings in [self.token_strings(c.continuation)] * g]
                              if "prediction" in needs else [])
        s_empty = None
        if "s_pred" in needs:
            if fast:
                inputs.s_pred = rollouts.s_pred
            else:
                with phase("s_pred_scoring"):
                    inputs.s_pred, n = naive_s_pred(self.model, contexts, rollouts, g, self.close_id, self.pad_id)
                flop_tokens["forward"] += n
            with phase("s_empty_scoring"):  # what the format alone does to x_t: s_pred - s_empty is the content
                s_empty, n = empty_thought_logprobs(self.model, contexts, self.close_id, self.pad_id)
            flop_tokens["forward"] += n
        if "s_ema" in needs:
            with phase("ema_scoring"):
                if ema_lp is not None:
                    inputs.s_ema = torch.stack([ema_lp[c.doc_index][c.position:c.position + h] for c in contexts])
                else:
                    inputs.s_ema, n = self.no_think_logprobs(self.teacher, windows, contexts)
                    flop_tokens["forward"] += n
            inputs.s_ema = inputs.s_ema.repeat_interleave(g, 0)
        if "prediction" in needs:
            inputs.prediction_ids = rollouts.prediction_ids
            inputs.predictions = [self.tok.decode(p) for p in rollouts.prediction_ids]
            inputs.prediction_first_prob = rollouts.prediction_first_prob
        self.model.train()
        rewards = self.reward.fn(inputs).to(self.device).float()  # [N]
        if not self.world.active:  # data parallel: a NaN reward reaches every rank through the gradient sum,
            check_finite(self.step + 1, reward=rewards)  # so all ranks fail together at the grad_norm check

        # Group-relative advantages (eq. 7) and the clipped surrogate over sampled tokens (eq. 8).
        advantages = O.group_advantages(rewards.view(-1, g)).view(-1)
        mask, logp_ref, logp_old = rollouts.action_mask, None, None
        if self.reference is not None:
            with torch.no_grad(), phase("update"):
                logp_ref, _, n = policy_logprobs(self.reference, contexts, rollouts, g, obj.temperature,
                                                 self.pad_id, fast, self.banned)
            flop_tokens["forward"] += n
        clipped, kl_shares = [], []
        for iteration in range(obj.num_iterations):
            def chunk_loss(rows: slice, logp: torch.Tensor) -> torch.Tensor:
                # The loss is a mean over thoughts: a chunk of them contributes its mean times its share.
                # First iteration: pi_theta_old is this same forward, detached (rho = 1).
                share = (rows.stop - rows.start) / len(advantages)
                old = logp.detach() if logp_old is None else logp_old[rows]
                loss = O.clipped_surrogate(logp, old, advantages[rows], mask[rows], obj.clip_eps_low,
                                           obj.clip_eps_high)
                if logp_ref is not None:
                    kl = O.kl_penalty(logp, logp_ref[rows], mask[rows])
                    kl_shares.append(kl.detach() * share / obj.num_iterations)
                    loss = loss + obj.kl_beta * kl
                return loss * share

            with phase("update"):
                self.optimizer.zero_grad(set_to_none=True)
                # forward + backward a chunk of contexts at a time (exact gradient accumulation)
                logp, entropy, n, loss = policy_update(self.model, contexts, rollouts, g, obj.temperature,
                                                       self.pad_id, chunk_loss, fast, banned=self.banned)
                flop_tokens["train"] += n
                distributed.sum_weighted_gradients(self.trainable, len(advantages), self.world)  # data parallel
                clipped.append(O.clip_fractions(logp, logp if logp_old is None else logp_old, advantages, mask,
                                                obj.clip_eps_low, obj.clip_eps_high))
                if logp_old is None:
                    logp_old, entropy_old = logp, entropy
                self.master.take_grads()
                grad_norm = torch.nn.utils.clip_grad_norm_(self.master.params, cfg.optim.grad_clip)
                check_finite(self.step + 1, loss=loss, grad_norm=grad_norm)
                self.optimizer.step()
                self.master.push_weights()
            if self.teacher is not None:
                with phase("ema_update"):
                    O.ema_update(self.teacher, self.ema_source(), obj.ema_tau)
        kl = sum(kl_shares) if kl_shares else torch.zeros(())

        # Metrics under TRL's names, plus RLP's own.
        lengths = rollouts.thought_lengths.float()
        m = mask.bool()
        generated = int(mask.sum())
        reward_name = obj.reward_name()
        metrics = {
            "loss": loss.item(), "reward": float(rewards.mean()),
            "reward_std": float(rewards.view(-1, g).std(dim=-1).mean()),
            f"rewards/{reward_name}/mean": float(rewards.mean()),
            "completions/mean_length": float(lengths.mean()),
            "completions/clipped_ratio": float((~rollouts.closed).float().mean()),
            "clip_ratio/low_mean": float(np.mean([c[0] for c in clipped])),
            "clip_ratio/high_mean": float(np.mean([c[1] for c in clipped])),
            "kl": float(kl), "entropy": float(entropy_old[m].mean()) if m.any() else 0.0,
            "grad_norm": float(grad_norm), "num_contexts": len(contexts),
            **{f"time/{k}": v for k, v in phase.seconds.items()},
            "_generated": generated,
            "_num_tokens": sum(len(c.prompt) for c in contexts) * g + generated,
            "_flops": self.flops_per_token * (flop_tokens["forward"] + 3 * flop_tokens["train"]),
        }
        if inputs.s_pred is not None:
            s_pred = inputs.s_pred[:, 0]
            empty = s_empty[:, 0].repeat_interleave(g, 0)
            metrics.update({"rlp/s_pred": float(s_pred.mean()), "rlp/s_empty": float(empty.mean()),
                            "rlp/content_gain": float((s_pred - empty).mean())})
        if inputs.s_pred is not None and inputs.s_ema is not None:
            gain = O.info_gain(inputs.s_pred[:, 0], inputs.s_ema[:, 0])
            metrics.update({"rlp/s_ema": float(inputs.s_ema[:, 0].mean()),
                            "rlp/info_gain": float(gain.mean()),
                            "rlp/frac_positive": float((gain > 0).float().mean())})
        self.last_batch = {"windows": windows, "contexts": contexts, "rollouts": rollouts, "rewards": rewards,
                           "advantages": advantages}  # kept for inspection (tests, debugging)
        sample = self._sample_record(windows, contexts, rollouts, rewards, inputs)
        if s_empty is not None:
            sample["s_empty"] = float(s_empty[0, 0])
        return metrics, sample

    def ema_source(self) -> list[torch.Tensor]:
        """What the EMA teacher follows: the float32 master weights, and the model's float buffers."""
        return self.master.params + [b for b in self.model.buffers() if b.dtype.is_floating_point]

    def _sample_record(self, windows, contexts, rollouts, rewards, inputs) -> dict:
        g, c = self.cfg.objective.num_rollouts, contexts[0]
        thoughts = []
        for i in range(g):
            length = int(rollouts.thought_lengths[i])
            row = {"thought": self.tok.decode(rollouts.seq[i, :length].tolist()), "tokens": length,
                   "closed": bool(rollouts.closed[i]), "reward": float(rewards[i])}
            if inputs.predictions is not None:
                row["prediction"] = inputs.predictions[i]
            if inputs.s_pred is not None:
                row["s_pred"] = float(inputs.s_pred[i, 0])
            thoughts.append(row)
        return {"context_tail": self.tok.decode(windows[c.doc_index][max(0, c.position - 48):c.position]),
                "target": self.tok.decode(c.targets), "position": c.position,
                "s_ema": None if inputs.s_ema is None else float(inputs.s_ema[0, 0]), "thoughts": thoughts}

    def ntp_step(self, windows: list[list[int]]) -> tuple[dict, dict | None]:
        """Continued pretraining: mean next-token cross-entropy over the same document windows."""
        width = max(len(w) for w in windows)
        ids = torch.full((len(windows), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, w in enumerate(windows):
            ids[i, :len(w)] = torch.tensor(w)
            mask[i, :len(w)] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        logits, _ = forward(self.model, ids, mask, (mask.cumsum(-1) - 1).clamp(min=0))
        labels = ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]),
                                                 labels.reshape(-1), ignore_index=-100)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        distributed.sum_weighted_gradients(self.trainable, int((labels != -100).sum()), self.world)  # data parallel
        self.master.take_grads()
        grad_norm = torch.nn.utils.clip_grad_norm_(self.master.params, self.cfg.optim.grad_clip)
        check_finite(self.step + 1, loss=loss, grad_norm=grad_norm)
        self.optimizer.step()
        self.master.push_weights()
        tokens = int(mask.sum())
        return {"loss": loss.item(), "perplexity": math.exp(min(float(loss), 50.0)), "grad_norm": float(grad_norm),
                "_num_tokens": tokens, "_flops": self.flops_per_token * 3 * ids.numel()}, None

    # ----------------------------------------------------------------------------------------
    # Checkpoints: everything needed to continue the same trajectory

    def rng_state(self) -> dict:
        return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
                "generator": self.generator.get_state(), "positions": self.position_rng.bit_generator.state}

    def state_dict(self) -> dict:
        """The run's state; under torchrun every rank calls it (it gathers each rank's sampling state)."""
        return {
            "step": self.step, "totals": dict(self.totals), "world_size": self.world.size,
            "rank_rng": distributed.gather(self.rng_state(), self.world),
            "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
            "master": [p.detach() for p in self.master.params] if self.master.copied else None,
            "teacher": None if self.teacher is None else self.teacher.state_dict(),
            "stream": self.stream.state_dict(),
        }

    def load_state_dict(self, state: dict) -> None:
        saved_world = state.get("world_size", 1)
        if saved_world != self.world.size:
            raise UserError(f"{self.out or 'this run'}: the checkpoint was written by {saved_world} process(es) and "
                            f"this run has {self.world.size}; each process's sampling state is in it, so it resumes "
                            f"only with the same number. Fix: resume with --nproc {saved_world}, or pass another --out.")
        self.step, self.totals = state["step"], dict(state["totals"])
        self.model.load_state_dict(state["model"])
        with torch.no_grad():
            if state.get("master") is not None:
                for m, saved in zip(self.master.params, state["master"]):
                    m.copy_(saved)
            elif self.master.copied:  # a checkpoint without masters: start them from the loaded weights
                for m, p in zip(self.master.params, self.master.model_params):
                    m.copy_(p.float())
        kernel = [{k: g.get(k) for k in ("fused", "foreach")} for g in self.optimizer.param_groups]
        self.optimizer.load_state_dict(state["optimizer"])
        for group, settings in zip(self.optimizer.param_groups, kernel):  # a checkpoint's kernel choice is not state
            group.update(settings)
        if state["teacher"] is not None:
            self.teacher = copy.deepcopy(self.model).float().eval().requires_grad_(False)
            self.teacher.load_state_dict(state["teacher"])
        self.stream.load_state_dict(state["stream"])
        rng = state["rank_rng"][self.world.rank] if "rank_rng" in state else state["rng"]
        random.setstate(rng["python"])
        np.random.set_state(rng["numpy"])
        torch.set_rng_state(rng["torch"])
        self.generator.set_state(rng["generator"])
        self.position_rng.bit_generator.state = rng["positions"]

    def save_checkpoint(self, directory: Path) -> None:
        """Write state.pt atomically, with a checksum file that a resume verifies (a flipped byte loads silently).

        While the rename is pending the checksum file lists both the new and the current checkpoint, so a
        kill at any moment leaves a state.pt that verifies.
        """
        state = self.state_dict()  # under torchrun every rank takes part; rank 0 writes
        if not self.world.is_main:
            return
        directory.mkdir(parents=True, exist_ok=True)
        path, sums = directory / RunFolder.CHECKPOINT_STATE, directory / RunFolder.CHECKPOINT_SUMS
        tmp = path.with_name(path.name + ".tmp")
        try:
            try:
                with open(tmp, "wb") as fh:  # through a Python file, a full disk raises OSError(ENOSPC)
                    torch.save(state, fh)
                    fh.flush()
                    os.fsync(fh.fileno())
            except RuntimeError as e:
                # torch's zip writer fails again while closing when a write failed (a full disk) or was cut by
                # Ctrl-C / SIGTERM (the handler raises inside the write): the first exception is the real one
                if isinstance(e.__context__, (OSError, KeyboardInterrupt)):
                    raise e.__context__ from None
                raise
            failpoint("checkpoint-tmp-written", self.step)
            new = runio.sha256_of(tmp)
            runio.atomic_write_text(sums, "".join(f"{h}\n" for h in (new, self.checkpoint_sha256) if h))
            os.replace(tmp, path)
            failpoint("checkpoint-renamed", self.step)
            self.checkpoint_sha256 = new
            runio.atomic_write_text(sums, new + "\n")
        finally:
            tmp.unlink(missing_ok=True)

    def load_checkpoint(self, directory: Path) -> bool:
        path, sums = directory / RunFolder.CHECKPOINT_STATE, directory / RunFolder.CHECKPOINT_SUMS
        if not path.is_file():
            return False
        corrupt = (f"{path}: the checkpoint is corrupt ({{}}); resuming from it would silently continue another "
                   f"trajectory. Nothing was changed. Fix: restore the file, or delete {directory} to restart this "
                   "run from step 0 (its logs are rewritten).")
        digest = runio.sha256_of(path)
        if sums.is_file() and digest not in sums.read_text().split():
            raise UserError(corrupt.format("its checksum differs from the one written with it"))
        try:
            state = torch.load(path, map_location=self.device, weights_only=False)
        except Exception as e:  # truncated zip, unpickling garbage
            raise UserError(corrupt.format(f"{type(e).__name__}: {str(e).splitlines()[0][:120]}")) from None
        self.load_state_dict(state)
        self.checkpoint_sha256 = digest
        return True
