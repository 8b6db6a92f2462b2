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
    logp, ent = pol.log_prob(mu, torch.tensor([[1.5]])), pol.entropy(mu)
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


@pytest.mark.parametrize("max_norm", [0.05, 1e3])  # clipped, and left alone
def test_clip_grad_norm_matches_torch(max_norm):
    from rlhf.gym.common import clip_grad_norm

    torch.manual_seed(0)
    a, b = ActorCritic(4, 2, discrete=True), ActorCritic(4, 2, discrete=True)
    b.load_state_dict(a.state_dict())
    x = torch.randn(7, 4)
    for net in (a, b):
        net.value(x).pow(2).sum().backward()  # grads on the critic only: actor grads are None
    ours = clip_grad_norm(list(a.parameters()), max_norm)
    ref = torch.nn.utils.clip_grad_norm_(list(b.parameters()), max_norm)
    torch.testing.assert_close(ours, ref)
    for p, q in zip(a.parameters(), b.parameters()):
        assert (p.grad is None) == (q.grad is None)
        if p.grad is not None:
            torch.testing.assert_close(p.grad, q.grad)


def test_mlp_forward_is_the_sequential_forward():
    from rlhf.gym.policies import mlp

    for activation in ("tanh", "relu"):
        net = mlp([3, 8, 8, 2], activation)
        x = torch.randn(5, 3)
        torch.testing.assert_close(net(x), torch.nn.Sequential.forward(net, x))
        assert list(net.state_dict()) == ["0.weight", "0.bias", "2.weight", "2.bias", "4.weight", "4.bias"]


def test_ppo_whole_batch_loss_equals_the_shuffled_one():
    """With minibatch = rollout, the update skips the shuffle and whitens once; the loss must
    be the one of any row order with per-minibatch whitening."""
    from rlhf.core import whiten
    from rlhf.gym.config import GymConfig
    from rlhf.trainers.on_policy import Batch, actor_critic_loss

    torch.manual_seed(0)
    cfg, pol, n = GymConfig(), ActorCritic(4, 2, discrete=True), 32
    b = Batch(torch.randn(n, 4), torch.randint(0, 2, (n,)), -torch.rand(n), torch.randn(n), torch.randn(n) * 3,
              torch.randn(n))
    pre = Batch(b.obs, b.actions, b.logp, b.values, whiten(b.adv), b.ret)
    whole, _ = actor_critic_loss(cfg, pol, pre, slice(None), 0.2, 0.0, norm_adv=False)
    shuffled, _ = actor_critic_loss(cfg, pol, b, torch.randperm(n), 0.2, 0.0, norm_adv=True)
    torch.testing.assert_close(whole, shuffled)


@pytest.mark.parametrize("discrete", [True, False])
def test_numpy_sampler_agrees_with_the_torch_policy(discrete):
    """The rollout's NumPy sampler and the training loss see the same policy: its log-probs and
    values are ``log_prob`` and ``value`` of the torch modules (observation normaliser on)."""
    torch.manual_seed(0)
    pol = ActorCritic(3, 2, discrete=discrete, norm_obs=True, log_std_init=-0.3)
    pol.obs_norm.update(torch.randn(50, 3) * 4 + 1)
    obs = (np.random.default_rng(0).standard_normal((64, 3)) * 3).astype(np.float32)
    actions, logp, values = pol.sampler(np.random.default_rng(1))(obs)
    x = torch.from_numpy(obs)
    with torch.no_grad():
        ref_logp = pol.log_prob(pol.dist_params(x), torch.from_numpy(actions))
        ref_values = pol.value(x)
    torch.testing.assert_close(torch.from_numpy(logp), ref_logp, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(torch.from_numpy(values), ref_values, atol=1e-5, rtol=1e-5)
    sample = pol.sampler(np.random.default_rng(1))
    with torch.no_grad():  # in-place optimiser steps show through the weight views
        for p in pol.critic.parameters():
            p.mul_(0.5)
    np.testing.assert_allclose(sample(obs)[2], pol.value(x).detach().numpy(), atol=1e-5, rtol=1e-5)


def test_numpy_sampler_draws_the_softmax_distribution():
    pol = ActorCritic(2, 3, discrete=True)
    with torch.no_grad():
        last = pol.actor[-1]
        last.weight.zero_()
        last.bias.copy_(torch.tensor([0.0, 1.0, -1.0]))
    sample = pol.sampler(np.random.default_rng(0))
    counts = np.zeros(3)
    for _ in range(50):
        actions, logp, _ = sample(np.zeros((400, 2), dtype=np.float32))
        counts += np.bincount(actions, minlength=3)
    probs = torch.softmax(torch.tensor([0.0, 1.0, -1.0]), 0).numpy()
    np.testing.assert_allclose(counts / counts.sum(), probs, atol=0.01)  # 20k draws: std ~0.003
    np.testing.assert_allclose(logp, np.log(probs)[actions], atol=1e-6)


def test_env_worker_processes_give_the_same_transitions():
    """env_processes: the same observations, rewards, episode ends and true next observations
    (final states through auto-reset) as stepping the envs in this process."""
    import numpy as np

    from rlhf.gym.envs import VecEnv

    local, workers = VecEnv("CartPole-v1", 3, seed=7), VecEnv("CartPole-v1", 3, seed=7, processes=True)
    try:
        np.testing.assert_array_equal(local.obs, workers.obs)
        rng = np.random.default_rng(0)
        ends = 0
        for _ in range(120):
            actions = rng.integers(0, 2, size=3)
            a, b = local.step(actions), workers.step(actions)
            for x, y in zip(a, b):
                np.testing.assert_array_equal(x, y)
            ends += int(a[2].sum() + a[3].sum())
        assert ends > 0  # episodes ended and were reset inside the window
        assert local.drain_episodes() == workers.drain_episodes()
    finally:
        local.close()
        workers.close()
