"""Vectorised gymnasium envs stepped in one process, with truncation kept apart from termination.

``VecEnv.step`` auto-resets finished envs and returns, besides the observation to act on next,
the *real* next observation (the final one on episode end), so a trainer can bootstrap
``V(s_final)`` through a time-limit truncation and cut it on a true termination.
"""
from __future__ import annotations

import difflib

import numpy as np
import torch
from torch import nn

from rlhf.errors import UserError


def make_env(env_id: str):
    import gymnasium as gym

    if env_id not in gym.envs.registry:
        close = difflib.get_close_matches(env_id, list(gym.envs.registry), n=3)
        hint = f"did you mean {' or '.join(close)}?" if close else "e.g. CartPole-v1, Acrobot-v1, Pendulum-v1"
        raise UserError(f"unknown gymnasium env {env_id!r}; {hint}")
    try:
        return gym.make(env_id, disable_env_checker=True)
    except Exception as exc:  # a registered env whose extra (box2d, mujoco) is missing
        raise UserError(f"env {env_id!r} cannot be created here ({type(exc).__name__}: {exc}); "
                        "install its gymnasium extra or pick another env") from exc


def space_kind(space) -> str:
    """'discrete', 'box' or the space's class name."""
    from gymnasium import spaces

    if isinstance(space, spaces.Discrete):
        return "discrete"
    if isinstance(space, spaces.Box):
        return "box"
    return type(space).__name__


class VecEnv:
    """N copies of one env. Actions [N] (discrete) or [N, A] (continuous, clipped to bounds).

    ``processes=True`` steps each copy in its own worker process (gymnasium's AsyncVectorEnv):
    worth it when one env step costs much more than the inter-process round trip (physics
    simulators, games), not for CartPole-sized envs. Both modes give the same transitions."""

    def __init__(self, env_id: str, n: int, seed: int, processes: bool = False):
        self.envs = [make_env(env_id) for _ in range(1 if processes else n)]
        self.vec = _async_envs(env_id, n) if processes else None
        self.n = n
        self.observation_space = self.envs[0].observation_space
        self.action_space = self.envs[0].action_space
        self.discrete = space_kind(self.action_space) == "discrete"
        if not self.discrete:
            self.low, self.high = self.action_space.low, self.action_space.high
        if self.vec is not None:
            self.obs = self.vec.reset(seed=[seed + i for i in range(n)])[0].astype(np.float32)
        else:
            self.obs = np.stack([e.reset(seed=seed + i)[0] for i, e in enumerate(self.envs)]).astype(np.float32)
        for i, e in enumerate(self.envs):
            e.action_space.seed(seed + i)
        self.ep_return = np.zeros(n)
        self.ep_len = np.zeros(n, dtype=np.int64)
        self.finished: list[tuple[float, int]] = []  # (return, length) of episodes since last drain

    def step(self, actions: np.ndarray):
        """Returns ``(obs, rewards, terminated, truncated, next_obs)``; ``obs`` is what to act on
        next (already reset where an episode ended), ``next_obs`` the true successor state."""
        if not self.discrete:
            actions = np.clip(actions, self.low, self.high)
        if self.vec is not None:
            return self._step_processes(actions)
        n = self.n
        obs = np.empty_like(self.obs)
        next_obs = obs
        rewards = np.empty(n, dtype=np.float32)
        terminated = np.zeros(n, dtype=np.float32)
        truncated = np.zeros(n, dtype=np.float32)
        for i, env in enumerate(self.envs):
            o, r, term, trunc, _ = env.step(actions[i])
            rewards[i] = r
            self.ep_return[i] += r
            self.ep_len[i] += 1
            if term or trunc:
                if next_obs is obs:
                    next_obs = obs.copy()
                next_obs[i] = o
                terminated[i], truncated[i] = term, trunc
                self.finished.append((float(self.ep_return[i]), int(self.ep_len[i])))
                self.ep_return[i], self.ep_len[i] = 0.0, 0
                o, _ = env.reset()
            obs[i] = o
        if next_obs is not obs:  # rows without an episode end: the successor is the new obs
            same = (terminated + truncated) == 0
            next_obs[same] = obs[same]
        self.obs = obs
        return obs, rewards, terminated, truncated, next_obs

    def _step_processes(self, actions: np.ndarray):
        obs, rewards, term, trunc, info = self.vec.step(actions)
        obs = obs.astype(np.float32)
        rewards = rewards.astype(np.float32)
        terminated, truncated = term.astype(np.float32), trunc.astype(np.float32)
        self.ep_return += rewards
        self.ep_len += 1
        next_obs = obs
        for i in np.flatnonzero(term | trunc):  # the worker has already reset it (same step)
            if next_obs is obs:
                next_obs = obs.copy()
            next_obs[i] = info["final_obs"][i]
            self.finished.append((float(self.ep_return[i]), int(self.ep_len[i])))
            self.ep_return[i], self.ep_len[i] = 0.0, 0
        self.obs = obs
        return obs, rewards, terminated, truncated, next_obs

    def drain_episodes(self) -> list[tuple[float, int]]:
        out, self.finished = self.finished, []
        return out

    def close(self) -> None:
        for e in self.envs:
            e.close()
        if self.vec is not None:
            self.vec.close()


def _async_envs(env_id: str, n: int):
    """``n`` copies of ``env_id``, one worker process each, reset in the step that ends an episode."""
    import functools

    import gymnasium as gym
    from gymnasium.vector import AutoresetMode

    return gym.vector.AsyncVectorEnv([functools.partial(make_env, env_id)] * n,
                                     autoreset_mode=AutoresetMode.SAME_STEP)


class ObsNormalizer(nn.Module):
    """Running mean / variance of observations (Chan et al. parallel update); buffers are saved
    with the policy so evaluation normalises exactly as training did. Identity when disabled."""

    def __init__(self, dim: int, enabled: bool, clip: float = 10.0):
        super().__init__()
        self.enabled, self.clip = enabled, clip
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("var", torch.ones(dim))
        self.register_buffer("count", torch.tensor(1e-4))

    @torch.no_grad()
    def update(self, x: torch.Tensor) -> None:
        if not self.enabled:
            return
        b_mean, b_var, b = x.mean(0), x.var(0, unbiased=False), x.shape[0]
        delta, total = b_mean - self.mean, self.count + b
        self.mean += delta * b / total
        self.var.copy_((self.var * self.count + b_var * b + delta**2 * self.count * b / total) / total)
        self.count.copy_(total)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return x
        return ((x - self.mean) / torch.sqrt(self.var + 1e-8)).clamp(-self.clip, self.clip)

    def numpy(self):
        """This forward in NumPy over views of the statistics (``update`` is in place)."""
        if not self.enabled:
            return lambda x: x
        mean, var, clip = self.mean.numpy(), self.var.numpy(), self.clip
        return lambda x: np.clip((x - mean) / np.sqrt(var + 1e-8), -clip, clip)


class RewardScaler:
    """Divide rewards by a running std of the discounted return (SB3's VecNormalize scheme):
    keeps value targets O(1) on tasks with large rewards, such as Pendulum."""

    def __init__(self, n: int, gamma: float, enabled: bool, clip: float = 10.0):
        self.enabled, self.gamma, self.clip = enabled, gamma, clip
        self.ret = np.zeros(n)
        self.stats = ObsNormalizer(1, True)

    def __call__(self, rewards: np.ndarray, dones: np.ndarray) -> np.ndarray:
        if not self.enabled:
            return rewards
        self.ret = self.ret * self.gamma + rewards
        self.stats.update(torch.as_tensor(self.ret, dtype=torch.float32)[:, None])
        self.ret[dones > 0] = 0.0
        scaled = rewards / np.sqrt(self.stats.var.item() + 1e-8)
        return np.clip(scaled, -self.clip, self.clip).astype(np.float32)
