"""Value-learning targets and losses: pure functions over Q-values and rewards.

Shapes: a batch of N transitions; ``rewards, terminated : [N]``; Q-values over a discrete
action set ``[N, A]``. ``terminated`` is 1 only on a true terminal state: a time-limit
truncation is *not* terminal, so its target still bootstraps from the next state.
"""
from __future__ import annotations

import torch
from torch import Tensor

__all__ = [
    "td_target",
    "double_q_target",
    "soft_q_target",
    "sac_actor_loss",
    "temperature_loss",
    "q_learning_update",
    "linear_schedule",
]


def td_target(rewards: Tensor, next_q_target: Tensor, terminated: Tensor, gamma: float) -> Tensor:
    """DQN's one-step target (Mnih et al. 2015): ``y = r + gamma * (1 - term) * max_a' Q_tgt(s', a')``.

    next_q_target: [N, A] from the target network. Returns [N] (no gradient should flow:
    callers compute it under ``torch.no_grad``).
    """
    _check(rewards, next_q_target, terminated)
    return rewards + gamma * (1 - terminated) * next_q_target.max(-1).values


def double_q_target(
    rewards: Tensor, next_q_online: Tensor, next_q_target: Tensor, terminated: Tensor, gamma: float
) -> Tensor:
    """Double DQN (van Hasselt et al. 2016): the online net picks, the target net evaluates:
    ``y = r + gamma * (1 - term) * Q_tgt(s', argmax_a' Q_online(s', a'))``."""
    _check(rewards, next_q_target, terminated)
    if next_q_online.shape != next_q_target.shape:
        raise ValueError(f"online {tuple(next_q_online.shape)} and target {tuple(next_q_target.shape)} differ")
    best = next_q_online.argmax(-1, keepdim=True)
    return rewards + gamma * (1 - terminated) * next_q_target.gather(-1, best).squeeze(-1)


def soft_q_target(
    rewards: Tensor, next_q1: Tensor, next_q2: Tensor, next_logp: Tensor, terminated: Tensor,
    gamma: float, alpha: Tensor | float,
) -> Tensor:
    """SAC's soft Bellman target (Haarnoja et al. 2018) with clipped double-Q:
    ``y = r + gamma * (1 - term) * (min(Q1', Q2') - alpha * log pi(a'|s'))``, a' ~ pi(.|s').
    All inputs [N]."""
    for name, t in (("next_q1", next_q1), ("next_q2", next_q2), ("next_logp", next_logp),
                    ("terminated", terminated)):
        if t.shape != rewards.shape:
            raise ValueError(f"{name} {tuple(t.shape)} must match rewards {tuple(rewards.shape)}")
    soft_v = torch.minimum(next_q1, next_q2) - alpha * next_logp
    return rewards + gamma * (1 - terminated) * soft_v


def sac_actor_loss(logp: Tensor, q1: Tensor, q2: Tensor, alpha: Tensor | float) -> Tensor:
    """SAC's policy loss, per sample: ``alpha * log pi(a|s) - min(Q1, Q2)(s, a)``, a reparameterised."""
    return alpha * logp - torch.minimum(q1, q2)


def temperature_loss(log_alpha: Tensor, logp: Tensor, target_entropy: float) -> Tensor:
    """Automatic entropy tuning (Haarnoja et al. 2018b), per sample:
    ``-log_alpha * (log pi(a|s) + H_target)``; logp detached. Its gradient raises alpha when
    the policy's entropy ``-E[log pi]`` is below the target and lowers it when above."""
    return -log_alpha * (logp.detach() + target_entropy)


def q_learning_update(q_sa: float, reward: float, next_q_max: float, terminated: bool, gamma: float,
                      alpha_q: float) -> float:
    """Tabular Q-learning (Watkins 1989):
    ``Q(s,a) <- Q(s,a) + alpha_q * (r + gamma * (1 - term) * max_a' Q(s',a') - Q(s,a))``."""
    target = reward + gamma * (0.0 if terminated else next_q_max)
    return q_sa + alpha_q * (target - q_sa)


def linear_schedule(start: float, end: float, fraction: float, progress: float) -> float:
    """Linear interpolation from ``start`` to ``end`` over the first ``fraction`` of training
    (``progress`` in [0, 1]), then constant ``end`` (DQN's epsilon)."""
    if fraction <= 0:
        return end
    return start + (end - start) * min(1.0, progress / fraction)


def _check(rewards: Tensor, next_q: Tensor, terminated: Tensor) -> None:
    if rewards.dim() != 1 or terminated.shape != rewards.shape or next_q.shape[:1] != rewards.shape:
        raise ValueError(f"rewards {tuple(rewards.shape)} and terminated {tuple(terminated.shape)} must be [N], "
                         f"next Q-values [N, A], got {tuple(next_q.shape)}")
