"""A uniform replay buffer in preallocated tensors (ring buffer over transitions)."""
from __future__ import annotations

import numpy as np
import torch
from torch import Tensor


class ReplayBuffer:
    """Stores ``(obs, action, reward, next_obs, terminated)``; ``next_obs`` is the true successor
    (the final observation on episode end) and ``terminated`` excludes time-limit truncation,
    so targets bootstrap through truncation."""

    def __init__(self, capacity: int, obs_dim: int, act_shape: tuple, act_dtype=torch.float32):
        self.capacity, self.size, self.pos = capacity, 0, 0
        self.obs = torch.zeros(capacity, obs_dim)
        self.next_obs = torch.zeros(capacity, obs_dim)
        self.actions = torch.zeros(capacity, *act_shape, dtype=act_dtype)
        self.rewards = torch.zeros(capacity)
        self.terminated = torch.zeros(capacity)

    def add(self, obs: np.ndarray, actions: np.ndarray, rewards: np.ndarray, next_obs: np.ndarray,
            terminated: np.ndarray) -> None:
        """Add a batch of N transitions (one per env)."""
        n = len(obs)
        idx = (self.pos + np.arange(n)) % self.capacity
        self.obs[idx] = torch.from_numpy(obs)
        self.next_obs[idx] = torch.from_numpy(next_obs)
        self.actions[idx] = torch.as_tensor(actions, dtype=self.actions.dtype)
        self.rewards[idx] = torch.from_numpy(rewards)
        self.terminated[idx] = torch.from_numpy(terminated)
        self.pos = (self.pos + n) % self.capacity
        self.size = min(self.size + n, self.capacity)

    def sample(self, batch_size: int) -> tuple[Tensor, ...]:
        idx = torch.randint(0, self.size, (batch_size,))
        return self.obs[idx], self.actions[idx], self.rewards[idx], self.next_obs[idx], self.terminated[idx]
