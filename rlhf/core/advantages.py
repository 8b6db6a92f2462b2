"""Advantage estimators: pure functions over reward / value tensors.

Layout is time-last everywhere: ``rewards, values, mask : [B, T]``. A gym rollout of N
envs and T steps is ``[N, T]``; an LM batch is ``[B, T]`` over completion tokens; a batch of
independent one-step decisions (GRPO's per-sequence rewards, a bandit) is ``[B]``.
"""
from __future__ import annotations

import torch
from torch import Tensor

from rlhf.core.logprobs import wide_dtype

__all__ = [
    "discounted_cumsum",
    "discounted_returns",
    "gae",
    "group_normalize",
    "last_index",
    "leave_one_out",
    "whiten",
    "explained_variance",
]


def _check_same_shape(**tensors: Tensor | None) -> None:
    shapes = {k: tuple(v.shape) for k, v in tensors.items() if v is not None}
    if len(set(shapes.values())) > 1:
        raise ValueError(f"shape mismatch: {shapes}")


def discounted_cumsum(x: Tensor, discount: Tensor | float) -> Tensor:
    """Reverse scan ``y_t = x_t + discount_t * y_{t+1}`` along the last axis, ``y_T = 0``.

    The one recursion behind returns and GAE. ``discount`` is a scalar or a tensor shaped
    like ``x`` (it carries gamma, lambda and the episode cuts).
    """
    if not torch.is_tensor(discount):
        discount = torch.full_like(x, float(discount))
    _check_same_shape(x=x, discount=discount)
    out = torch.empty_like(x)
    running = torch.zeros_like(x[..., 0])
    for t in range(x.shape[-1] - 1, -1, -1):
        running = x[..., t] + discount[..., t] * running
        out[..., t] = running
    return out


def discounted_returns(
    rewards: Tensor,
    gamma: float,
    dones: Tensor | None = None,
    last_value: Tensor | None = None,
) -> Tensor:
    """Monte-Carlo returns ``G_t = r_t + gamma * (1 - done_t) * G_{t+1}``.

    rewards, dones: [B, T]; ``dones[t] = 1`` when the episode ended at step t (the sum is
    cut there). ``last_value`` [B] bootstraps the tail of a segment that did not end.
    """
    dones = torch.zeros_like(rewards) if dones is None else dones.to(rewards.dtype)
    _check_same_shape(rewards=rewards, dones=dones)
    x = rewards.clone()
    if last_value is not None:
        x[..., -1] = x[..., -1] + gamma * (1 - dones[..., -1]) * last_value
    return discounted_cumsum(x, gamma * (1 - dones))


def gae(
    rewards: Tensor,
    values: Tensor,
    gamma: float = 1.0,
    gae_lambda: float = 0.95,
    mask: Tensor | None = None,
    next_values: Tensor | None = None,
    terminated: Tensor | None = None,
    dones: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Generalised advantage estimation (Schulman et al. 2016). Returns ``(adv, ret)``.

        delta_t = r_t + gamma * (1 - terminated_t) * V(s_{t+1}) - V(s_t)
        A_t     = delta_t + gamma * gae_lambda * (1 - done_t) * A_{t+1}
        ret_t   = A_t + V(s_t)

    LM use: pass ``mask`` [B, T] over completion tokens; the value after the last real token
    is 0 (the sequence ends there). Gym use: pass ``next_values`` (V of the next observation,
    the final observation's value on truncation), ``terminated`` (no bootstrap) and ``dones``
    (terminated or truncated: the advantage recursion is cut).
    """
    if mask is not None and next_values is None and terminated is None and dones is None and has_gaps(mask):
        # a multi-turn episode: the environment's tokens (mask 0) sit between the policy's; they
        # are no steps of the policy's, so GAE runs over its tokens alone (s_{t+1}: its next one)
        idx, steps = masked_steps(mask)
        adv, ret = gae(rewards.gather(-1, idx), values.gather(-1, idx), gamma, gae_lambda, mask=steps)
        return (torch.zeros_like(rewards).scatter(-1, idx, adv * steps),
                torch.zeros_like(rewards).scatter(-1, idx, ret * steps))
    mask = torch.ones_like(rewards) if mask is None else mask.to(rewards.dtype)
    if next_values is None:  # V(s_{t+1}) from the same row; 0 past the last real step
        next_values = torch.zeros_like(values)
        next_values[..., :-1] = values[..., 1:] * mask[..., 1:]
    terminated = torch.zeros_like(rewards) if terminated is None else terminated.to(rewards.dtype)
    dones = terminated if dones is None else dones.to(rewards.dtype)
    _check_same_shape(rewards=rewards, values=values, mask=mask, next_values=next_values,
                      terminated=terminated, dones=dones)
    deltas = (rewards + gamma * (1 - terminated) * next_values - values) * mask
    adv = discounted_cumsum(deltas, gamma * gae_lambda * (1 - dones)) * mask
    return adv, (adv + values) * mask


def has_gaps(mask: Tensor) -> bool:
    """Whether some row of ``mask`` [B, T] has a 0 before a nonzero entry (not a prefix of ones)."""
    m = mask != 0
    return bool((m[..., 1:] & ~m[..., :-1]).any())


def masked_steps(mask: Tensor) -> tuple[Tensor, Tensor]:
    """``(idx, steps)`` [B, K]: the positions of each row's nonzero ``mask`` entries, in order and
    left-aligned (K: the most any row has), and 1 where a row has that many (0: filler)."""
    nonzero = mask != 0
    k = int(nonzero.sum(-1).max()) if mask.numel() else 0
    idx = torch.argsort((~nonzero).to(torch.int8), dim=-1, stable=True)[..., :k]
    return idx, nonzero.gather(-1, idx).to(mask.dtype)


def last_index(mask: Tensor) -> Tensor:
    """[N] long: the position of the last nonzero entry of each row of ``mask`` [N, C], -1 where
    the row has none. For a mask that is a prefix of ones this is ``mask.sum(1) - 1``."""
    if mask.shape[1] == 0:
        return torch.full((mask.shape[0],), -1, dtype=torch.long, device=mask.device)
    pos = torch.arange(1, mask.shape[1] + 1, device=mask.device)
    return ((mask != 0).long() * pos).amax(1) - 1


def group_normalize(
    rewards: Tensor, group_size: int, scale_rewards: str = "group", eps: float = 1e-4, valid: Tensor | None = None
) -> Tensor:
    """GRPO's advantage (Shao et al. 2024): ``A_i = (r_i - mean_group) / (std + eps)``.

    rewards: [N] with N = prompts * group_size, each prompt's completions contiguous.
    scale_rewards: "group" divides by the group's std (GRPO), "batch" by the whole batch's std,
    "none" only centres (Dr. GRPO). std is Bessel-corrected, as in TRL.
    valid: [N] bool, False for rows without a reward (no reward function scored them): their
    advantage is 0 and the means and stds are over the valid rows only (TRL's nanmean / nanstd).
    A group with fewer than 2 valid rows has no std; its one valid row is its own mean (A = 0).
    """
    groups = _as_groups(rewards, group_size)
    v = _valid_groups(valid, groups)
    groups = _zero_invalid(groups, v)
    n = v.sum(dim=1, keepdim=True)
    mean = groups.sum(dim=1, keepdim=True) / n.clamp(min=1)
    centred = (groups - mean) * v
    if scale_rewards == "group":
        std = ((centred**2).sum(dim=1, keepdim=True) / (n - 1).clamp(min=1)).sqrt()
        centred = centred / (std + eps)
    elif scale_rewards == "batch":
        m = v.reshape(-1)
        n_all = m.sum()
        flat = groups.reshape(-1)
        batch_mean = flat.sum() / n_all.clamp(min=1)
        batch_std = ((((flat - batch_mean) * m) ** 2).sum() / (n_all - 1).clamp(min=1)).sqrt()
        centred = centred / (batch_std + eps)
    elif scale_rewards != "none":
        raise ValueError(f"scale_rewards must be 'group', 'batch' or 'none', got {scale_rewards!r}")
    return centred.reshape(-1)


def leave_one_out(rewards: Tensor, group_size: int, valid: Tensor | None = None) -> Tensor:
    """RLOO baseline (Kool et al. 2019): ``A_i = r_i - mean_{j != i} r_j``. rewards: [N].
    valid: [N] bool, False for rows without a reward: their advantage is 0 and the baseline of a
    valid row is the mean of the group's *other valid* rows (TRL); a valid row with no valid
    sibling has no baseline and gets A = 0."""
    groups = _as_groups(rewards, group_size)
    v = _valid_groups(valid, groups)
    groups = _zero_invalid(groups, v)
    others = v.sum(dim=1, keepdim=True) - v  # valid siblings of each row
    baseline = (groups.sum(dim=1, keepdim=True) - groups) / others.clamp(min=1)
    return ((groups - baseline) * v * (others > 0)).reshape(-1)


def whiten(x: Tensor, mask: Tensor | None = None, shift_mean: bool = True, eps: float = 1e-8,
           reduce=None) -> Tensor:
    """Normalise ``x`` to unit variance (and zero mean if ``shift_mean``) over masked entries.
    ``reduce`` sums a tensor over processes, so mean and variance are those of every
    process's entries together (default: this process's only)."""
    reduce = reduce or (lambda t: t)
    mask = torch.ones_like(x) if mask is None else mask.to(x.dtype)
    n = reduce(mask.sum())
    mean = reduce((x * mask).sum()) / n
    var = reduce((((x - mean) * mask) ** 2).sum()) / n
    out = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return out * mask


def explained_variance(values: torch.Tensor, ret: torch.Tensor, mask: torch.Tensor, reduce=None) -> float:
    """1 - Var(ret - V) / Var(ret) over masked tokens: 1 is a perfect critic, <= 0 a useless one.
    ``reduce`` sums over processes (population variances, from sums of x and x^2)."""
    reduce = reduce or (lambda x: x)
    wide = wide_dtype(mask.device)  # float64 on the CPU; float32 on an accelerator (no float64 there)
    m = mask.to(wide)
    n = reduce(m.sum())

    def var(x):  # two passes (mean, then centred squares): no cancellation in float32
        x = x.to(wide)
        mean = reduce((x * m).sum()) / n
        return reduce(((x - mean) ** 2 * m).sum()) / n

    v = var(ret)
    return float(1 - var(ret - values) / v) if n > 1 and v > 0 else float("nan")


def _valid_groups(valid: Tensor | None, groups: Tensor) -> Tensor:
    """The valid mask [G, group_size] in the rewards' dtype (all ones when ``valid`` is None)."""
    if valid is None:
        return torch.ones_like(groups)
    if valid.shape != (groups.numel(),):
        raise ValueError(f"valid must be [N] = [{groups.numel()}], got shape {tuple(valid.shape)}")
    return valid.reshape(groups.shape).to(groups.dtype)


def _zero_invalid(groups: Tensor, v: Tensor) -> Tensor:
    """The rewards with invalid rows set to 0 (whatever they held, NaN included: 0 * NaN is NaN)."""
    return torch.where(v > 0, groups, torch.zeros_like(groups))


def _as_groups(rewards: Tensor, group_size: int) -> Tensor:
    if rewards.dim() != 1:
        raise ValueError(f"rewards must be 1-D [N], got shape {tuple(rewards.shape)}")
    if group_size < 2 or rewards.numel() % group_size:
        raise ValueError(
            f"group_size must be >= 2 and divide the batch ({rewards.numel()}), got {group_size}"
        )
    return rewards.reshape(-1, group_size)
