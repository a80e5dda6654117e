"""The equations of rlp_cli.objective against hand computations."""

import math

import pytest
import torch

from rlp_cli.objective import (clipped_surrogate, discounted_info_gain, ema_update, group_advantages, info_gain,
                               kl_penalty)


def test_info_gain_broadcasts():
    s_pred = torch.tensor([[-1.0, -2.0], [-0.5, -3.0]])
    s_ema = torch.tensor([[-1.5], [-1.0]])
    assert torch.allclose(info_gain(s_pred, s_ema), torch.tensor([[0.5, -0.5], [0.5, -2.0]]))


def test_discounted_info_gain_by_hand():
    s_pred = torch.tensor([[-1.0, -2.0, -3.0]])
    s_ema = torch.tensor([[-2.0, -2.0, -2.0]])
    # 1*(1) + 0.5*(0) + 0.25*(-1)
    assert discounted_info_gain(s_pred, s_ema, 0.5).item() == pytest.approx(0.75)


def test_group_advantages_has_the_g_over_g_minus_1_factor():
    r = torch.tensor([[1.0, 2.0, 3.0, 6.0]])  # mean 3
    expected = 4 / 3 * torch.tensor([[-2.0, -1.0, 0.0, 3.0]])
    assert torch.allclose(group_advantages(r), expected)
    # no division by the std: scaling rewards scales advantages
    assert torch.allclose(group_advantages(10 * r), 10 * expected)
    # groups are independent along the last dim
    two = torch.tensor([[0.0, 2.0], [5.0, 5.0]])
    assert torch.allclose(group_advantages(two), torch.tensor([[-2.0, 2.0], [0.0, 0.0]]))
    with pytest.raises(ValueError):
        group_advantages(torch.tensor([[1.0]]))


def _surrogate_by_hand(logp, logp_old, adv, mask, lo, hi):
    total = 0.0
    for i in range(len(logp)):
        terms = []
        for u in range(len(logp[i])):
            if not mask[i][u]:
                continue
            rho = math.exp(logp[i][u] - logp_old[i][u])
            terms.append(min(rho * adv[i], min(max(rho, 1 - lo), 1 + hi) * adv[i]))
        total += sum(terms) / len(terms)
    return -total / len(logp)


def test_clipped_surrogate_clips_both_sides_for_both_signs_with_ragged_masks():
    logp_old = torch.zeros(4, 3)
    # ratios: exp(0.5)=1.65 (above 1+hi), exp(-0.5)=0.61 (below 1-lo), exp(0.05)=1.05 (inside)
    logp = torch.tensor([[0.5, -0.5, 0.05], [0.5, -0.5, 0.05], [0.5, 0.0, 0.0], [-0.5, 0.05, 0.0]])
    adv = torch.tensor([1.0, -1.0, 2.0, -0.5])
    mask = torch.tensor([[1, 1, 1], [1, 1, 1], [1, 0, 0], [1, 1, 0]])
    lo, hi = 0.2, 0.28
    got = clipped_surrogate(logp, logp_old, adv, mask, lo, hi)
    want = _surrogate_by_hand(logp.tolist(), logp_old.tolist(), adv.tolist(), mask.tolist(), lo, hi)
    assert got.item() == pytest.approx(want, rel=1e-6)
    # positive advantage, ratio above 1+hi: the clipped term (1+hi)*A wins; negative advantage,
    # ratio below 1-lo: (1-lo)*A wins. Check one row each explicitly.
    one = clipped_surrogate(torch.tensor([[0.5]]), torch.zeros(1, 1), torch.tensor([1.0]), torch.ones(1, 1), lo, hi)
    assert one.item() == pytest.approx(-(1 + hi))
    neg = clipped_surrogate(torch.tensor([[-0.5]]), torch.zeros(1, 1), torch.tensor([-1.0]), torch.ones(1, 1), lo, hi)
    assert neg.item() == pytest.approx(1 - lo)
    # the unclipped side is kept when it is smaller (pessimistic bound)
    keep = clipped_surrogate(torch.tensor([[-0.5]]), torch.zeros(1, 1), torch.tensor([1.0]), torch.ones(1, 1), lo, hi)
    assert keep.item() == pytest.approx(-math.exp(-0.5))


def test_clipped_surrogate_gradient_at_ratio_one_is_the_policy_gradient():
    logp = torch.tensor([[-1.0, -2.0, -0.5]], requires_grad=True)
    adv = torch.tensor([0.7])
    mask = torch.tensor([[1, 1, 0]])
    clipped_surrogate(logp, logp.detach(), adv, mask, 0.2, 0.2).backward()
    assert torch.allclose(logp.grad, torch.tensor([[-0.35, -0.35, 0.0]]))


def test_kl_penalty_is_zero_for_equal_policies_and_positive_otherwise():
    logp = torch.tensor([[-1.0, -2.0]])
    mask = torch.ones(1, 2)
    assert kl_penalty(logp, logp, mask).item() == pytest.approx(0.0)
    d = 0.3
    by_hand = math.exp(d) - d - 1
    assert kl_penalty(logp, logp + d, mask).item() == pytest.approx(by_hand, rel=1e-6)


def test_ema_update_after_several_steps():
    teacher, student = torch.nn.Linear(2, 1, bias=False), torch.nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        teacher.weight.fill_(1.0)
    tau, expected = 0.9, 1.0
    for step in range(5):
        with torch.no_grad():
            student.weight.fill_(float(step))
        ema_update(teacher, student, tau)
        expected = tau * expected + (1 - tau) * step
    assert torch.allclose(teacher.weight, torch.full((1, 2), expected))
