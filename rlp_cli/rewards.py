"""Rewards for a thought, in a registry: adding one is one decorated function.

A reward receives a `RewardInputs` for a batch of N = B*G rollouts and returns a tensor [N]. It
declares what it needs, so the trainer computes only that:
- "s_pred": log p_theta(targets | context, thought), scored from the generation cache;
- "s_ema":  log p_ema(targets | context), from the EMA teacher's one forward per document;
- "prediction": the model writes its guess of the continuation after `</think>` (RPT).

`info_gain` is RLP's dense reward (eq. 5, with an optional multi-token horizon); the `rpt_*` and
`prefix_match` / `first_token` rewards are RPT's sparse family (RLP_SPEC section 4).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from rlp_cli.objective import discounted_info_gain


@dataclass
class RewardInputs:
    num_rollouts: int  # G; rollouts of one context are consecutive
    target_ids: torch.Tensor  # [N, H] the true next tokens x_t ..
    continuation_tokens: list[list[str]]  # [N] the true continuation, token by token, as text
    gamma: float = 1.0
    s_pred: torch.Tensor | None = None  # [N, H]
    s_ema: torch.Tensor | None = None  # [N, H]
    predictions: list[str] | None = None  # [N] the text written after </think>
    prediction_ids: list[list[int]] | None = None
    prediction_first_prob: torch.Tensor | None = None  # [N] the policy's probability of its first predicted token


@dataclass
class RewardSpec:
    fn: Callable[[RewardInputs], torch.Tensor]
    needs: frozenset[str]
    kind: str  # "dense" or "sparse"
    description: str


REWARDS: dict[str, RewardSpec] = {}


def register_reward(name: str, needs: tuple[str, ...], kind: str, description: str):
    def wrap(fn):
        REWARDS[name] = RewardSpec(fn=fn, needs=frozenset(needs), kind=kind, description=description)
        return fn
    return wrap


# --------------------------------------------------------------------------------------------
# Plain per-example scorers (public API)


def prefix_match(prediction: str, continuation_tokens: list[str]) -> float:
    """RPT's binary reward: 1 if the prediction's bytes are a prefix of the true continuation's bytes
    AND that prefix ends on a token boundary of the continuation; else 0. Empty predictions score 0.
    """
    pred = prediction.encode("utf-8")
    if not pred:
        return 0.0
    boundaries, offset = set(), 0
    for tok in continuation_tokens:
        offset += len(tok.encode("utf-8"))
        boundaries.add(offset)
    truth = "".join(continuation_tokens).encode("utf-8")
    return 1.0 if truth.startswith(pred) and len(pred) in boundaries else 0.0


# --------------------------------------------------------------------------------------------
# Registered rewards


@register_reward("info_gain", needs=("s_pred", "s_ema"), kind="dense",
                 description="RLP (eq. 5): log p_theta(x_t | x_<t, c) - log p_ema(x_t | x_<t); horizon H discounted by gamma")
def info_gain_reward(x: RewardInputs) -> torch.Tensor:
    return discounted_info_gain(x.s_pred, x.s_ema, x.gamma)


@register_reward("prefix_match", needs=("prediction",), kind="sparse",
                 description="RPT: 1 if the written prediction is a byte prefix of the continuation ending on a token boundary")
def prefix_match_reward(x: RewardInputs) -> torch.Tensor:
    return torch.tensor([prefix_match(p, c) for p, c in zip(x.predictions, x.continuation_tokens)])


@register_reward("first_token", needs=("prediction",), kind="sparse",
                 description="RPT: 1 if the first predicted token is the true next token")
def first_token_reward(x: RewardInputs) -> torch.Tensor:
    truth = x.target_ids[:, 0].tolist()
    return torch.tensor([float(bool(p) and p[0] == t) for p, t in zip(x.prediction_ids, truth)])


@register_reward("rpt_dense", needs=("prediction",), kind="sparse",
                 description="RPT dense: 1 if the prefix matches, else the probability the model gave its own first predicted token")
def rpt_dense_reward(x: RewardInputs) -> torch.Tensor:
    correct = prefix_match_reward(x)
    return torch.where(correct > 0, correct, x.prediction_first_prob.float().cpu())


@register_reward("rpt_conditional_dense", needs=("prediction",), kind="sparse",
                 description="RPT conditional dense: rpt_dense in groups where some rollout is correct, else 0")
def rpt_conditional_dense_reward(x: RewardInputs) -> torch.Tensor:
    correct = prefix_match_reward(x).view(-1, x.num_rollouts)
    dense = rpt_dense_reward(x).view(-1, x.num_rollouts)
    any_correct = (correct > 0).any(dim=-1, keepdim=True)
    return torch.where(any_correct, dense, torch.zeros_like(dense)).view(-1)


def get_reward(name: str) -> RewardSpec:
    from rlp_cli.errors import UserError

    if name not in REWARDS:
        raise UserError(f"objective.reward '{name}' is not a registered reward. Fix: use one of "
                        f"{', '.join(sorted(REWARDS))} (see `rlp ls rewards`).")
    return REWARDS[name]
