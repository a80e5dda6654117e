"""RPT's sparse rewards on edge cases, and the registry."""

import torch

from rlp_cli.rewards import REWARDS, RewardInputs, prefix_match, register_reward


def test_prefix_match_on_token_boundaries():
    cont = [" The", " cat", " sat", "."]
    assert prefix_match(" The", cont) == 1.0
    assert prefix_match(" The cat sat.", cont) == 1.0
    assert prefix_match(" The ca", cont) == 0.0  # stops mid-token
    assert prefix_match(" Th", cont) == 0.0
    assert prefix_match(" A", cont) == 0.0  # wrong
    assert prefix_match("", cont) == 0.0  # empty prediction
    assert prefix_match(" The cat sat. And", cont) == 0.0  # longer than the continuation
    assert prefix_match("The", cont) == 0.0  # bytes differ (missing space)


def test_prefix_match_multibyte_characters():
    cont = [" caf", "é", " au", " lait"]
    assert prefix_match(" café", cont) == 1.0
    assert prefix_match(" caf", cont) == 1.0
    assert prefix_match(" cafe", cont) == 0.0  # e is not é
    # a token holding one multi-byte character: a prediction ending inside the character's bytes
    # cannot be expressed as str, but ending before the token is a boundary and after it too
    assert prefix_match(" café au", cont) == 1.0
    emoji = ["I", " ❤", "️", " it"]
    assert prefix_match("I ❤", emoji) == 1.0
    assert prefix_match("I ❤️ it", emoji) == 1.0


def _inputs(preds, pred_ids, targets, conts, first_prob, g=2):
    return RewardInputs(num_rollouts=g, target_ids=torch.tensor(targets), continuation_tokens=conts,
                        predictions=preds, prediction_ids=pred_ids, prediction_first_prob=torch.tensor(first_prob))


def test_rpt_family():
    conts = [[" a", " b"]] * 4
    x = _inputs([" a", " c", " x", " y"], [[5], [7], [9], []], [[5], [5], [5], [5]], conts, [0.9, 0.3, 0.2, 0.1])
    assert REWARDS["prefix_match"].fn(x).tolist() == [1.0, 0.0, 0.0, 0.0]
    assert REWARDS["first_token"].fn(x).tolist() == [1.0, 0.0, 0.0, 0.0]  # empty prediction scores 0
    dense = REWARDS["rpt_dense"].fn(x)
    assert torch.allclose(dense, torch.tensor([1.0, 0.3, 0.2, 0.1]))
    cond = REWARDS["rpt_conditional_dense"].fn(x)  # group 1 has a correct rollout, group 2 none
    assert torch.allclose(cond, torch.tensor([1.0, 0.3, 0.0, 0.0]))


def test_adding_a_reward_is_one_function():
    @register_reward("negative_length", needs=("prediction",), kind="sparse", description="test only")
    def negative_length(x):
        return -torch.tensor([float(len(p)) for p in x.predictions])

    try:
        x = _inputs(["ab", ""], [[1], []], [[1], [1]], [["a"], ["a"]], [0.5, 0.5])
        assert REWARDS["negative_length"].fn(x).tolist() == [-2.0, 0.0]
        assert REWARDS["info_gain"].kind == "dense" and REWARDS["prefix_match"].kind == "sparse"
    finally:
        REWARDS.pop("negative_length")
