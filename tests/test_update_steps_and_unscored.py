"""Issue 13, items 5, 8 and 9: the adaptive-KL controller's input, refused one-step ratio
objectives, off-policy REINFORCE refused, and samples no reward function scored.

Names carry "kl", "none" or "reinforce" so ``pytest -k "kl or none or reinforce"`` selects them.
"""
import pytest

from rlhf.config import load_recipe
from rlhf.errors import UserError


# --- refusals at config load (items 5 and 9) ---------------------------------------------------

@pytest.mark.parametrize("algo", ["grpo", "rloo", "ppo"])
@pytest.mark.parametrize("objective", ["kl_penalty", "adaptive_kl", "none"])
def test_kl_ratio_objectives_with_one_update_step_are_refused(algo, objective):
    with pytest.raises(UserError, match=rf"objective {objective} with one optimiser step per rollout .*"
                                        r"set epochs or minibatches > 1"):
        load_recipe(None, [f"algo={algo}", f"objective={objective}", "epochs=1", "minibatches=1"])
    # two steps per rollout, by either knob, make the ratio and its penalty mean something
    assert load_recipe(None, [f"algo={algo}", f"objective={objective}", "epochs=2"]).epochs == 2
    assert load_recipe(None, [f"algo={algo}", f"objective={objective}", "minibatches=2"]).minibatches == 2


@pytest.mark.parametrize("objective", ["kl_penalty", "adaptive_kl"])
def test_gym_kl_objectives_with_one_update_step_are_refused(objective):
    base = ["env=CartPole-v1", "algo=ppo", f"objective={objective}", "n_envs=2", "n_steps=64"]
    with pytest.raises(UserError, match=rf"objective {objective} with one optimiser step per rollout.*"
                                        r"set epochs > 1 or minibatch_size < n_steps x n_envs"):
        load_recipe(None, base + ["epochs=1", "minibatch_size=128"])
    with pytest.raises(UserError, match="one optimiser step per rollout"):  # the minibatch is capped at n
        load_recipe(None, base + ["epochs=1", "minibatch_size=1000"])
    assert load_recipe(None, base + ["epochs=2", "minibatch_size=128"]).ppo_steps_per_rollout() == 2
    assert load_recipe(None, base + ["epochs=1", "minibatch_size=64"]).ppo_steps_per_rollout() == 2
    assert load_recipe(None, base[:2] + ["n_envs=2", "n_steps=64", "epochs=1", "minibatch_size=128"]).epochs == 1


@pytest.mark.parametrize("items", [["epochs=2"], ["minibatches=2"], ["epochs=3", "minibatches=2"]])
def test_reinforce_with_several_update_steps_is_refused(items):
    with pytest.raises(UserError, match=r"algo reinforce with epochs=\d x minibatches=\d > 1 trains off-policy "
                                        r"without importance weights.*use algo grpo, rloo or ppo.*"
                                        r"or epochs=1 and minibatches=1"):
        load_recipe(None, ["algo=reinforce", "prompts_per_step=4", *items])
    assert load_recipe(None, ["algo=reinforce"]).algo == "reinforce"  # one step: on-policy, accepted


# --- rows no reward function scored: the core estimators (item 8) ------------------------------

import math  # noqa: E402

import torch  # noqa: E402

from rlhf.core import group_normalize, leave_one_out  # noqa: E402

NAN = float("nan")
# float64 throughout: the expected values are exact up to one rounding of each operation


def T(x):
    return torch.tensor(x, dtype=torch.float64)


def test_group_normalize_leaves_none_rows_out_of_the_group_stats():
    # group 1: [1, 3, 5, None] -> mean 3, Bessel std over 3 rows sqrt((4 + 0 + 4) / 2) = 2 -> [-1, 0, 1, 0]
    # group 2: [2, 2, 4, 4] all scored -> mean 3, std sqrt(4 / 3)
    r = T([1.0, 3.0, 5.0, NAN, 2.0, 2.0, 4.0, 4.0])
    valid = torch.tensor([True, True, True, False, True, True, True, True])
    s = math.sqrt(4 / 3)
    torch.testing.assert_close(group_normalize(r, 4, eps=0.0, valid=valid),
                               T([-1.0, 0.0, 1.0, 0.0, -1 / s, -1 / s, 1 / s, 1 / s]))
    # scale none: only centred on the valid rows' mean
    torch.testing.assert_close(group_normalize(r, 4, scale="none", valid=valid),
                               T([-2.0, 0.0, 2.0, 0.0, -1.0, -1.0, 1.0, 1.0]))
    # scale batch: std over the 7 scored rows [1,3,5,2,2,4,4]: mean 3, sum of squares 12 / 6 -> sqrt 2
    torch.testing.assert_close(group_normalize(r, 4, scale="batch", eps=0.0, valid=valid),
                               T([-2.0, 0.0, 2.0, 0.0, -1.0, -1.0, 1.0, 1.0]) / math.sqrt(2))
    # the same rows without the None row, as a group of 3, give the same advantages
    torch.testing.assert_close(group_normalize(T([1.0, 3.0, 5.0]), 3, eps=0.0), T([-1.0, 0.0, 1.0]))


def test_group_normalize_with_none_groups_of_one_or_zero_scored_rows_gives_zero():
    r = T([7.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0])
    valid = torch.tensor([True, False, False, False, False, False, False, False])
    for scale in ("group", "batch", "none"):
        torch.testing.assert_close(group_normalize(r, 4, scale=scale, valid=valid), torch.zeros(8, dtype=torch.float64))


def test_leave_one_out_with_none_rows_averages_the_other_scored_rows():
    # [1, 2, 6, None]: baselines (2 + 6) / 2 = 4, (1 + 6) / 2 = 3.5, (1 + 2) / 2 = 1.5; None -> 0
    # [5, None, None, None]: no scored sibling -> no baseline -> 0
    r = T([1.0, 2.0, 6.0, NAN, 5.0, NAN, 0.0, 9.0])
    valid = torch.tensor([True, True, True, False, True, False, False, False])
    torch.testing.assert_close(leave_one_out(r, 4, valid=valid), T([-3.0, -1.5, 4.5, 0.0, 0.0, 0.0, 0.0, 0.0]))
    # all scored: the usual leave-one-out
    torch.testing.assert_close(leave_one_out(T([1.0, 2.0, 6.0, 3.0]), 4, valid=torch.ones(4, dtype=torch.bool)),
                               T([1 - 11 / 3, 2 - 10 / 3, 6 - 6 / 3, 3 - 9 / 3]))


def test_none_mask_of_the_wrong_shape_is_an_error():
    with pytest.raises(ValueError, match="valid must be"):
        group_normalize(T([1.0, 2.0]), 2, valid=torch.ones(3, dtype=torch.bool))
