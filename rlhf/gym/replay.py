"""A uniform replay buffer in preallocated tensors (ring buffer over transitions).

Memory. Flat observations are stored as float32: ``2 * 4 * obs_dim`` bytes of ``obs`` and
``next_obs`` per transition, plus 4 (reward) + 4 (terminated) + the action (8 for a discrete
int64, ``4 * act_dim`` continuous).

Images are stored in the env's uint8, a quarter of float32 (the network scales them):

* MinAtar (``[C, 10, 10]`` 0/1 grids, C = 4 for Breakout): ``obs`` + ``next_obs`` =
  2 * 400 = 800 bytes + 16 = 816 bytes a transition; 100,000 transitions = 82 MB.
* Atari (4 stacked 84x84 frames), ``frame_stacked=True``: ``next_obs`` of a frame stack is
  ``obs`` shifted by one frame plus one new frame (also at an episode's end: the final
  observation is the stack's next frame, the reset happens after it), so only that new frame
  is kept. ``obs`` 4 * 7056 + the new frame 7056 = 35,280 bytes + 16 = 35,296 bytes a
  transition (a buffer keeping both stacks would need 56,464); the Pong recipe's 100,000
  transitions = 3.5 GB. Each stored frame still appears in up to 4 rows' ``obs``: a buffer
  of single frames that rebuilt stacks at sampling (as the Nature DQN's) would need ~7 KB a
  transition, 5x less, at the price of episode-boundary bookkeeping; not done here.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from rlhf.errors import UserError

TORCH_DTYPES = {np.dtype(np.float32): torch.float32, np.dtype(np.uint8): torch.uint8}


class ReplayBuffer:
    """Stores ``(obs, action, reward, next_obs, terminated)``; ``next_obs`` is the true successor
    (the final observation on episode end) and ``terminated`` excludes time-limit truncation,
    so targets bootstrap through truncation.

    ``obs_shape``: an int (flat observations) or a tuple (images, [C, H, W]); ``obs_dtype``:
    float32 or uint8. ``frame_stacked``: the first axis is a stack of frames, oldest first,
    and ``next_obs[:-1]`` equals ``obs[1:]``: only the newest frame of ``next_obs``
    is kept (checked on every ``add``: a mismatch is an env that is not a frame stack)."""

    def __init__(self, capacity: int, obs_shape, act_shape: tuple, act_dtype=torch.float32,
                 obs_dtype=np.float32, frame_stacked: bool = False):
        self.capacity, self.size, self.pos = capacity, 0, 0
        shape = (obs_shape,) if isinstance(obs_shape, int) else tuple(obs_shape)
        dtype = TORCH_DTYPES[np.dtype(obs_dtype)]
        self.frame_stacked = frame_stacked
        self.obs = torch.zeros(capacity, *shape, dtype=dtype)
        # frame-stacked: only the newest frame of each successor stack [capacity, 1, H, W]
        self.next_obs = torch.zeros(capacity, *((1,) + shape[1:] if frame_stacked else shape), dtype=dtype)
        self.actions = torch.zeros(capacity, *act_shape, dtype=act_dtype)
        self.rewards = torch.zeros(capacity)
        self.terminated = torch.zeros(capacity)

    def nbytes(self) -> int:
        """Bytes held by the preallocated tensors (the whole capacity)."""
        return sum(t.numel() * t.element_size() for t in (self.obs, self.next_obs, self.actions, self.rewards,
                                                          self.terminated))

    def add(self, obs: np.ndarray, actions: np.ndarray, rewards: np.ndarray, next_obs: np.ndarray,
            terminated: np.ndarray) -> None:
        """Add a batch of N transitions (one per env)."""
        n = len(obs)
        idx = (self.pos + np.arange(n)) % self.capacity
        self.obs[idx] = torch.from_numpy(obs)
        if self.frame_stacked:
            if not np.array_equal(next_obs[:, :-1], obs[:, 1:]):
                raise UserError("the replay buffer was told the observations are frame stacks, but a next "
                                "observation is not the previous stack shifted by one frame")
            self.next_obs[idx] = torch.from_numpy(next_obs[:, -1:])
        else:
            self.next_obs[idx] = torch.from_numpy(next_obs)
        self.actions[idx] = torch.as_tensor(actions, dtype=self.actions.dtype)
        self.rewards[idx] = torch.from_numpy(rewards)
        self.terminated[idx] = torch.from_numpy(terminated)
        self.pos = (self.pos + n) % self.capacity
        self.size = min(self.size + n, self.capacity)

    def sample(self, batch_size: int) -> tuple[Tensor, ...]:
        """``(obs, actions, rewards, next_obs, terminated)`` of ``batch_size`` uniform rows;
        observations in their stored dtype (uint8 images: the network scales them)."""
        idx = torch.randint(0, self.size, (batch_size,))
        obs = self.obs[idx]
        next_obs = torch.cat([obs[:, 1:], self.next_obs[idx]], 1) if self.frame_stacked else self.next_obs[idx]
        return obs, self.actions[idx], self.rewards[idx], next_obs, self.terminated[idx]
