"""Advantage settings of the LM loop, against values computed by hand."""
import math

import pytest
import torch

from rlhf.config import load_recipe
from rlhf.lm.rollout_record import Rollout
from rlhf.core import explained_variance
from rlhf.lm.rollout import RolloutPass
from rlhf.trainers.lm import Baseline, advantages


def roll_of(mask, logp=None):
    mask = torch.tensor(mask, dtype=torch.float32)
    n, c = mask.shape
    return Rollout(torch.zeros(1, 2, dtype=torch.long), torch.ones(1, 2), torch.zeros(n, c, dtype=torch.long),
                   mask, torch.zeros(n, dtype=torch.bool), n, logp)


def cfg(*items):
    return load_recipe(None, list(items))


def test_ppo_puts_the_sequence_reward_on_the_last_token_and_runs_gae():
    # row 0: 3 tokens, reward 1; row 1: 1 token, reward 0. V = 0 everywhere, gamma 1, lam 0.5
    r = roll_of([[1, 1, 1], [1, 0, 0]])
    passes = RolloutPass(ref_logp=None, old_logp=None, old_values=torch.zeros(2, 3))
    adv, ret, _ = advantages(torch.tensor([1.0, 0.0]), r, passes,
                          cfg("algo=ppo", "gae_lambda=0.5", "norm_adv=false", "kl_coef=0"), Baseline())
    # deltas row 0 = [0, 0, 1] -> A = [0.25, 0.5, 1]; row 1 = [0]
    torch.testing.assert_close(adv, torch.tensor([[0.25, 0.5, 1.0], [0.0, 0.0, 0.0]]))
    torch.testing.assert_close(ret, adv)


def test_ppo_kl_in_reward_is_per_token():
    # one row of 2 tokens; k1 KL per token = logp - ref = [0.5, 0.25]; kl_coef 0.1
    r = roll_of([[1, 1]])
    passes = RolloutPass(ref_logp=torch.tensor([[-1.5, -1.25]]), old_logp=torch.tensor([[-1.0, -1.0]]),
                         old_values=torch.zeros(1, 2))
    adv, _, _ = advantages(torch.tensor([1.0]), r, passes,
                        cfg("algo=ppo", "gae_lambda=1", "norm_adv=false", "kl_coef=0.1",
                            "kl_estimator=k1", "kl_placement=reward"), Baseline())
    # token rewards [-0.05, 1 - 0.025]; gamma = lam = 1: A0 = -0.05 + 0.975, A1 = 0.975
    torch.testing.assert_close(adv, torch.tensor([[0.925, 0.975]]))


def test_grpo_kl_in_reward_subtracts_sequence_kl_before_normalising():
    r = roll_of([[1, 1], [1, 0]], logp=torch.tensor([[-1.0, -1.0], [-1.0, 0.0]]))
    passes = RolloutPass(ref_logp=torch.tensor([[-2.0, -1.0], [-1.0, 0.0]]), old_logp=None, old_values=None)
    c = cfg("algo=grpo", "group_size=2", "kl_coef=0.5", "kl_estimator=k1", "kl_placement=reward",
            "scale_rewards=none")
    adv, ret, _ = advantages(torch.tensor([1.0, 1.0]), r, passes, c, Baseline())
    # sequence KL (k1) = [1, 0] -> rewards [0.5, 1.0] -> centred [-0.25, 0.25]
    torch.testing.assert_close(adv, torch.tensor([-0.25, 0.25]))
    assert ret is None


def test_rloo_and_reinforce_baselines():
    r = roll_of([[1], [1], [1]])
    passes = RolloutPass(ref_logp=None, old_logp=None, old_values=None)
    adv, _, _ = advantages(torch.tensor([1.0, 2.0, 6.0]), r, passes, cfg("algo=rloo", "group_size=3"), Baseline())
    torch.testing.assert_close(adv, torch.tensor([-3.0, -1.5, 4.5]))
    b = Baseline(decay=0.5)
    rc = cfg("algo=reinforce", "group_size=3")
    adv1, _, _ = advantages(torch.tensor([1.0, 2.0, 3.0]), r, passes, rc, b)  # first batch: own mean 2
    torch.testing.assert_close(adv1, torch.tensor([-1.0, 0.0, 1.0]))
    adv2, _, _ = advantages(torch.tensor([5.0, 5.0, 5.0]), r, passes, rc, b)  # baseline still 2, then 3.5
    torch.testing.assert_close(adv2, torch.tensor([3.0, 3.0, 3.0]))
    assert b.value == pytest.approx(3.5)


def test_explained_variance_by_hand():
    ret = torch.tensor([[1.0, 2.0, 3.0, 99.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    assert explained_variance(ret, ret, mask) == pytest.approx(1.0)
    # residual [1, 1, 1] has zero variance -> EV 1; a constant 2 predictor: 1 - var([-1,0,1])/var = 0
    assert explained_variance(torch.full_like(ret, 2.0), ret, mask) == pytest.approx(0.0)
    assert math.isnan(explained_variance(torch.zeros(1, 2), torch.ones(1, 2), torch.ones(1, 2)))
