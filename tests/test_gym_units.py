"""Behaviour of the gym building blocks: truncation vs termination, normalisers, policies."""
import math

import numpy as np
import pytest
import torch

pytest.importorskip("gymnasium")

from rlhf.gym.envs import ObsNormalizer, VecEnv  # noqa: E402
from rlhf.gym.policies import ActorCritic, QNetwork  # noqa: E402


def test_vec_env_reports_truncation_apart_from_termination():
    import gymnasium as gym

    env = VecEnv("Pendulum-v1", 2, seed=0)  # Pendulum never terminates; it truncates at 200
    assert isinstance(env.envs[0], gym.Wrapper)
    for t in range(200):
        obs, rewards, terminated, truncated, next_obs = env.step(np.zeros((2, 1), dtype=np.float32))
    assert terminated.tolist() == [0.0, 0.0] and truncated.tolist() == [1.0, 1.0]
    assert not np.allclose(obs, next_obs)  # obs is the reset state, next_obs the final one
    assert len(env.drain_episodes()) == 2


def test_vec_env_next_obs_is_the_new_obs_when_nothing_ended():
    env = VecEnv("CartPole-v1", 3, seed=0)
    obs, *_, next_obs = env.step(np.zeros(3, dtype=np.int64))
    np.testing.assert_array_equal(obs, next_obs)


def test_obs_normalizer_matches_batch_statistics():
    norm = ObsNormalizer(2, True)
    x = torch.tensor([[1.0, 10.0], [3.0, 30.0], [5.0, 50.0], [7.0, 70.0]])
    norm.update(x[:1])
    norm.update(x[1:])
    torch.testing.assert_close(norm.mean, x.mean(0), atol=1e-3, rtol=1e-4)
    torch.testing.assert_close(norm.var, x.var(0, unbiased=False), atol=1e-2, rtol=1e-3)


def test_gaussian_logp_and_entropy_by_hand():
    pol = ActorCritic(3, 1, discrete=False, log_std_init=math.log(2.0))
    mu = torch.tensor([[0.5]])
    # log N(1.5 | 0.5, 2^2) = -0.5 * (1/2)^2 - log 2 - 0.5 log(2 pi)
    logp, ent = pol.logp_entropy(mu, torch.tensor([[1.5]]))
    torch.testing.assert_close(logp, torch.tensor([-0.125 - math.log(2) - 0.5 * math.log(2 * math.pi)]))
    torch.testing.assert_close(ent, torch.tensor([math.log(2) + 0.5 * (1 + math.log(2 * math.pi))]))


def test_exact_kl_is_zero_at_the_old_policy_and_positive_after_a_move():
    for discrete in (True, False):
        pol = ActorCritic(4, 2, discrete=discrete)
        obs = torch.randn(5, 4)
        old = pol.dist_params(obs).detach()
        old_log_std = None if discrete else pol.log_std.detach().clone()
        assert pol.kl_from(old, pol.dist_params(obs), old_log_std).abs().max() < 1e-6
        assert (pol.kl_from(old, old + torch.tensor([0.5, -0.5]), old_log_std) > 0).all()


def test_dueling_head_is_value_plus_centred_advantage():
    q = QNetwork(4, 3, hidden=8, dueling=True)
    obs = torch.randn(6, 4)
    h = q.body(obs)
    adv = q.adv_head(h)
    # mean over actions of Q equals V: the advantage stream is centred
    torch.testing.assert_close(q(obs).mean(-1), q.value_head(h).squeeze(-1))
    torch.testing.assert_close(q(obs) - q(obs).mean(-1, keepdim=True), adv - adv.mean(-1, keepdim=True))
