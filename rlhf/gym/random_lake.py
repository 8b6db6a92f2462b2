"""FrozenLake on a fresh random map per episode: the task the language-model agent
(``FrozenLakeRandom-v0``, ``rlhf.agents.text_envs``) and the classic gym agents
(``rlhf/FrozenLakeRandom-v0``) both play, on the same maps.

A map is drawn by gymnasium's ``generate_random_map`` (a path from S to G always exists) from a
seed; maps are split by a hash of their layout into training maps and held-out maps (one layout
in ``eval_every``), which never meet. ``reset(seed=s)`` plays seed ``s``'s map (a GRPO group:
episodes of one map); ``reset()`` without a seed draws the next map from the env's generator
(a vectorised env's auto-reset).

``shaping`` adds potential-based shaping (Ng, Harada & Russell 1999), which keeps the optimal
policies: with Phi(s) = -shaping * d(s) / d_max (d: Manhattan distance to G, d_max: that of S),
each move earns Phi(s') - Phi(s); the whole episode earns shaping * (d_max - d_end) / d_max on
top of the goal's 1. A move toward G is worth shaping / d_max, a bump into a wall 0.

The classic agents' observation: three one-hot planes of size x size (holes, goal, the agent),
flattened: the map is in the observation, as it is in the text the language model reads.
"""
from __future__ import annotations

import hashlib

import gymnasium as gym
import numpy as np
from gymnasium import spaces


def map_hash(desc: list[str]) -> int:
    return int.from_bytes(hashlib.blake2b("/".join(desc).encode(), digest_size=4).digest(), "little")


class RandomLake(gym.Env):
    metadata = {"render_modes": []}

    def __init__(self, size: int = 4, p: float = 0.8, is_slippery: bool = False, split: str = "train",
                 eval_every: int = 5, max_episode_steps: int = 100, shaping: float = 0.0):
        if split not in ("train", "eval"):
            raise ValueError(f"split must be train or eval, got {split!r}")
        self.size, self.p, self.split, self.eval_every = size, p, split, eval_every
        self.slippery, self.max_steps, self.shaping = is_slippery, max_episode_steps, float(shaping)
        self.observation_space = spaces.Box(0.0, 1.0, (3 * size * size,), np.float32)
        self.action_space = spaces.Discrete(4)  # left, down, right, up (gymnasium's FrozenLake)
        self.lake = None
        self.state = 0

    def map_for(self, seed: int | None) -> list[str]:
        """The first map of this split drawn from ``seed``'s generator."""
        from gymnasium.envs.toy_text.frozen_lake import generate_random_map

        rng = np.random.default_rng(seed)
        while True:
            desc = generate_random_map(size=self.size, p=self.p, seed=int(rng.integers(2**31)))
            if (map_hash(desc) % self.eval_every == 0) == (self.split == "eval"):
                return desc

    @property
    def desc(self):
        return self.lake.unwrapped.desc

    @property
    def ncol(self) -> int:
        return self.size

    def distance(self, state: int) -> int:
        row, col = divmod(int(state), self.size)
        return 2 * (self.size - 1) - row - col

    def reset(self, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        map_seed = seed if seed is not None else int(self.np_random.integers(2**31))
        self.lake = gym.make("FrozenLake-v1", desc=self.map_for(map_seed), is_slippery=self.slippery,
                             max_episode_steps=self.max_steps)
        self.state, info = self.lake.reset(seed=seed if seed is not None else map_seed)
        return self.observe(), info

    def step(self, action: int):
        before = self.distance(self.state)
        self.state, reward, terminated, truncated, info = self.lake.step(int(action))
        success = bool(terminated and reward > 0)  # (FrozenLake pays only at G, before the shaping)
        reward = float(reward) + self.shaping * (before - self.distance(self.state)) / (2 * (self.size - 1))
        return self.observe(), reward, bool(terminated), bool(truncated), {**info, "success": success}

    def observe(self) -> np.ndarray:
        desc = np.asarray(self.desc)
        planes = np.zeros((3, self.size, self.size), np.float32)
        planes[0], planes[1] = desc == b"H", desc == b"G"
        planes[2].flat[int(self.state)] = 1.0
        return planes.reshape(-1)


# the classic agents' ids: moves per episode as the agent recipes' max_turns, and their shaping
AGENT_RECIPE_STEPS, AGENT_RECIPE_SHAPING = 8, 0.5
REGISTERED = {"rlhf/FrozenLakeRandom-v0": "train", "rlhf/FrozenLakeRandomHeldOut-v0": "eval"}


def register() -> None:
    """Register the classic agents' ids with gymnasium (once): training maps, held-out maps."""
    for env_id, split in REGISTERED.items():
        if env_id not in gym.envs.registry:
            gym.register(env_id, entry_point=RandomLake, max_episode_steps=AGENT_RECIPE_STEPS,
                         kwargs={"split": split, "shaping": AGENT_RECIPE_SHAPING,
                                 "max_episode_steps": AGENT_RECIPE_STEPS})
