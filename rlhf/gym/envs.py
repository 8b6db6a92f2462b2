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
from rlhf.extras import install_line


# Atari: the Nature DQN pipeline (Mnih et al. 2015): 30 no-op starts, the max of the last two of
# every 4 frames, 84x84 greyscale, 4 frames stacked; uint8 throughout (the network scales).
ATARI_FRAME_STACK = 4
# optional packages that register pixel envs on import: id prefix -> (module, the pip line)
# MinAtar registers its games without a time limit: a policy that never loses (Breakout's
# bricks respawn) would never end an evaluation. Episodes are truncated here instead (training
# bootstraps through truncation); random play ends within ~70 steps, Freeway at 2500 by its rules.
MINATAR_MAX_STEPS = 10_000
PIXEL_PACKAGES = {"ALE/": ("ale_py", install_line("ale_py")), "MinAtar/": ("minatar", install_line("minatar"))}


def _register_pixel_envs(env_id: str) -> None:
    """Import the package that registers ``env_id`` (ale-py: ALE/..., *NoFrameskip-v4;
    MinAtar: MinAtar/...); one clear sentence when it is an ALE/MinAtar id and missing."""
    import gymnasium as gym

    for prefix, (module, pip) in PIXEL_PACKAGES.items():
        try:
            if module == "ale_py":
                import ale_py

                gym.register_envs(ale_py)
            else:
                from minatar.gym import register_envs

                if not any(k.startswith("MinAtar/") for k in gym.envs.registry):
                    register_envs()
        except ImportError:
            if env_id.startswith(prefix):
                raise UserError(f"env {env_id!r} needs the {module} package, which is not installed; "
                                f"run `{pip}`") from None


def make_env(env_id: str):
    import gymnasium as gym

    if env_id.startswith("rlhf/"):  # ours: random FrozenLake maps, the language-model agents' task
        from rlhf.gym.random_lake import register

        register()
    if env_id not in gym.envs.registry:
        _register_pixel_envs(env_id)
    if env_id not in gym.envs.registry:
        close = difflib.get_close_matches(env_id, list(gym.envs.registry), n=3)
        hint = f"did you mean {' or '.join(close)}?" if close else "e.g. CartPole-v1, Acrobot-v1, Pendulum-v1"
        raise UserError(f"unknown gymnasium env {env_id!r}; {hint}")
    atari = "ale_py" in str(gym.spec(env_id).entry_point)
    try:
        # AtariPreprocessing skips frames itself: the ALE env must return every frame
        extra = {"frameskip": 1} if atari else {}
        if env_id.startswith("MinAtar/") and gym.spec(env_id).max_episode_steps is None:
            extra["max_episode_steps"] = MINATAR_MAX_STEPS
        env = gym.make(env_id, disable_env_checker=True, **extra)
        if atari:
            from gymnasium.wrappers import AtariPreprocessing, FrameStackObservation

            env = FrameStackObservation(AtariPreprocessing(env, noop_max=30, frame_skip=4, screen_size=84),
                                        ATARI_FRAME_STACK)
    except Exception as exc:  # a registered env whose extra (box2d, mujoco, opencv) is missing
        raise UserError(f"env {env_id!r} cannot be created here ({type(exc).__name__}: {exc}); "
                        "install its gymnasium extra or pick another env") from exc
    if env_id.startswith("MinAtar/"):
        env = channels_first(env)
    return env


def space_kind(space) -> str:
    """'discrete', 'box' or the space's class name."""
    from gymnasium import spaces

    if isinstance(space, spaces.Discrete):
        return "discrete"
    if isinstance(space, spaces.Box):
        return "box"
    return type(space).__name__


def is_image_space(space) -> bool:
    """A Box of images: 3 dims (channels first after ``make_env``), uint8 or bool."""
    return space_kind(space) == "box" and len(space.shape) == 3 and space.dtype in (np.uint8, np.bool_)


def is_frame_stack(env) -> bool:
    """Whether ``env`` (or a wrapper inside it) stacks frames on the first observation axis."""
    from gymnasium.wrappers import FrameStackObservation

    while env is not None:
        if isinstance(env, FrameStackObservation):
            return True
        env = getattr(env, "env", None)
    return False


def obs_dtype(space) -> type:
    """What ``VecEnv`` stores observations as: images stay uint8 (4x smaller than float32,
    scaled inside the network), everything else is float32."""
    return np.uint8 if is_image_space(space) else np.float32


def obs_batch(obs, space) -> torch.Tensor:
    """One observation as a batch of one, in the dtype ``VecEnv`` gives: [1, D] float32 or
    [1, C, H, W] uint8."""
    return torch.from_numpy(np.asarray(obs, dtype=obs_dtype(space)).reshape(1, *space.shape))


def channels_first(env):
    """MinAtar's [10, 10, C] bool grids as [C, 10, 10] uint8 in {0, 1}: the layout of torch's
    conv layers and the dtype the replay buffer stores (the network divides by the space's
    high, 1 here, 255 for Atari)."""
    from gymnasium.spaces import Box
    from gymnasium.wrappers import TransformObservation

    h, w, c = env.observation_space.shape
    return TransformObservation(env, _hwc_to_chw_uint8, Box(0, 1, (c, h, w), np.uint8))


def _hwc_to_chw_uint8(obs: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(np.moveaxis(obs, -1, 0), dtype=np.uint8)


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
        self.obs_dtype = obs_dtype(self.observation_space)
        if not self.discrete:
            self.low, self.high = self.action_space.low, self.action_space.high
        if self.vec is not None:
            self.obs = self.vec.reset(seed=[seed + i for i in range(n)])[0].astype(self.obs_dtype)
        else:
            self.obs = np.stack([e.reset(seed=seed + i)[0] for i, e in enumerate(self.envs)]).astype(self.obs_dtype)
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
        obs = obs.astype(self.obs_dtype)
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
