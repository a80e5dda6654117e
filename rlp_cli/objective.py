"""The equations of RLP (arXiv 2510.01265), one function each, in the paper's notation.

    eq. 5   r(c_t)  = log p_theta(x_t | x_<t, c_t) - log p_ema(x_t | x_<t)          info_gain
    eq. 7   A_i     = G/(G-1) * (r_i - mean_j r_j)                                 group_advantages
    eq. 8   L       = -mean_i (1/|c_i|) sum_u min(rho_u A_i, clip(rho_u, 1-e_lo, 1+e_hi) A_i)
                                                                                   clipped_surrogate
            phi    <- tau * phi + (1 - tau) * theta                               ema_update
    optional: beta * KL(pi_theta || pi_ref) per thought token                     kl_penalty

Rewards are constants (computed under no_grad by the caller); gradients flow only through the
log-probabilities of sampled thought tokens.
"""

from __future__ import annotations

import torch


def info_gain(s_pred: torch.Tensor, s_ema: torch.Tensor) -> torch.Tensor:
    """eq. 5: log p_theta(x_t | x_<t, c_t) - log p_ema(x_t | x_<t); elementwise, broadcasting."""
    return s_pred - s_ema


def discounted_sum(x: torch.Tensor, gamma: float) -> torch.Tensor:
    """sum_k gamma^k x_k over the last dimension (k < H): the horizon's weighting (x_0 alone at H = 1)."""
    weights = gamma ** torch.arange(x.shape[-1], dtype=x.dtype, device=x.device)
    return (x * weights).sum(-1)


def discounted_info_gain(s_pred: torch.Tensor, s_ema: torch.Tensor, gamma: float) -> torch.Tensor:
    """Multi-token horizon: sum_k gamma^k [s_pred_k - s_ema_k] over the last dimension (k < H)."""
    return discounted_sum(info_gain(s_pred, s_ema), gamma)


def group_advantages(rewards: torch.Tensor) -> torch.Tensor:
    """eq. 7: rewards [..., G] -> A = G/(G-1) * (r - mean r) over the last dim; no std division."""
    g = rewards.shape[-1]
    if g < 2:
        raise ValueError("group_advantages needs G >= 2 rollouts per context")
    return g / (g - 1) * (rewards - rewards.mean(dim=-1, keepdim=True))


def clipped_surrogate(logp: torch.Tensor, logp_old: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                      eps_low: float, eps_high: float) -> torch.Tensor:
    """eq. 8. logp, logp_old, mask: [N, U] (N thoughts, U token slots); advantages: [N].

    Per thought: the mean over its masked tokens of min(rho*A, clip(rho)*A); then the mean over
    thoughts, negated (a loss to minimise).
    """
    mask = mask.to(logp.dtype)
    ratio = torch.exp(logp - logp_old)
    adv = advantages.unsqueeze(-1)
    per_token = torch.minimum(ratio * adv, torch.clamp(ratio, 1.0 - eps_low, 1.0 + eps_high) * adv)
    per_thought = (per_token * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)
    return -per_thought.mean()


def clip_fractions(logp: torch.Tensor, logp_old: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                   eps_low: float, eps_high: float) -> tuple[float, float]:
    """TRL's clip_ratio/low_mean and clip_ratio/high_mean: share of tokens where the clip is active."""
    ratio = torch.exp(logp - logp_old)
    adv = advantages.unsqueeze(-1).expand_as(ratio)
    m = mask.bool()
    low = ((ratio < 1.0 - eps_low) & (adv < 0) & m).sum()
    high = ((ratio > 1.0 + eps_high) & (adv > 0) & m).sum()
    n = m.sum().clamp(min=1)
    return float(low / n), float(high / n)


def kl_penalty(logp: torch.Tensor, logp_ref: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-thought mean of the k3 estimator of KL(pi_theta || pi_ref), averaged over thoughts."""
    mask = mask.to(logp.dtype)
    delta = logp_ref - logp
    per_token = torch.exp(delta) - delta - 1.0
    return ((per_token * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()


@torch.no_grad()
def ema_update(teacher, student, tau: float) -> None:
    """In place: teacher <- tau * teacher + (1 - tau) * student.

    Modules (parameters and float buffers), or two lists of tensors (the trainer passes its float32
    master weights, so a bfloat16 model's teacher still moves: a bf16 lerp by 1e-3 rounds to nothing).
    """
    def tensors(x):
        if isinstance(x, torch.nn.Module):
            return list(x.parameters()) + [b for b in x.buffers() if b.dtype.is_floating_point]
        return list(x)

    for t, s in zip(tensors(teacher), tensors(student), strict=True):
        t.lerp_(s.detach().to(t.dtype), 1.0 - tau)
