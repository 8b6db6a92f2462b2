"""Tabular Q-learning (Watkins 1989) for small discrete envs such as FrozenLake.

Epsilon-greedy episodes; each transition applies ``rlhf.core.value_learning.q_learning_update``;
a time-limit truncation is not terminal, so it still bootstraps from the next state.
"""
from __future__ import annotations

import numpy as np
import torch

from rlhf.core.value_learning import linear_schedule, q_learning_update
from rlhf.gym.common import build_agent
from rlhf.gym.config import GymConfig
from rlhf.gym.envs import make_env
from rlhf.gym.progress import Progress
from rlhf.gym.resume import GymSaver


def train_q_learning(cfg: GymConfig, spec: dict, run, progress: bool, resume: bool = False):
    env = make_env(cfg.env)
    table = build_agent(cfg, spec)
    q = np.zeros((spec["n_states"], spec["n_actions"]))
    rng = np.random.default_rng(cfg.seed)
    env.action_space.seed(cfg.seed)
    bar = Progress(cfg, run, progress)
    episode = 0
    # saved at episode ends: the env is reset with its own seed at every episode's start
    saver = GymSaver(cfg, run, table, {"rng": rng, "progress": bar})
    counters = lambda: {"episode": episode, "q": torch.from_numpy(q.copy()), "eps": eps}  # noqa: E731
    if resume:
        c = saver.resume()
        episode, q = c["episode"], c["q"].numpy().copy()
    while bar.steps < cfg.total_steps:
        eps = linear_schedule(cfg.eps_start, cfg.eps_end, 1.0, episode / cfg.eps_decay_episodes)
        s, _ = env.reset(seed=cfg.seed + episode)
        done, total, length = False, 0.0, 0
        while not done:
            # ties broken at random so an all-zero row does not always pick action 0
            best = np.flatnonzero(q[s] == q[s].max())
            a = int(rng.integers(spec["n_actions"])) if rng.random() < eps else int(rng.choice(best))
            s2, r, terminated, truncated, _ = env.step(a)
            q[s, a] = q_learning_update(q[s, a], float(r), q[s2].max(), terminated, cfg.gamma, cfg.alpha_q)
            s, total, length, done = s2, total + float(r), length + 1, terminated or truncated
        episode += 1
        bar.advance(length, [(total, length)], lambda: {"charts/epsilon": eps})
        saver.maybe(bar.steps, counters)
    if bar.steps and saver.every:
        saver.final(bar.steps, counters)
    bar.close()
    env.close()
    table.q.copy_(torch.from_numpy(q))
    return table, {**bar.summary(), "episodes": episode}
