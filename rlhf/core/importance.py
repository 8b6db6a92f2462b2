"""Truncated importance sampling (TIS) of a sampler that is not quite the trainer's policy.

The tokens of a rollout were drawn by the *sampler* (log-probs ``rollout_logp``, as it saw
them: another precision, another kernel, another engine), while the policy-gradient estimator
assumes they were drawn by the trainer's rollout policy pi_old (``old_logp``, the trainer's
own no-grad forward of the same weights). The unbiased correction weights each sample by
pi_old / pi_sampler; truncating the weight at ``cap`` bounds its variance at the price of a
small bias (Ionides 2008; Yao et al. 2025, "Your efficient RL framework secretly brings you
off-policy RL training"; verl's rollout correction, token-TIS cap 2.0; TRL's
``vllm_importance_sampling_correction``, cap 3.0).

    token:     w_t = min(exp(old_logp_t - rollout_logp_t), cap)            per token
    sequence:  w   = min(exp(sum_t mask_t (old_logp_t - rollout_logp_t)), cap)  per row,
               broadcast over its tokens

``w`` multiplies the policy-gradient term of the loss only (the KL-to-reference term is an
expectation under the trained policy, not a sample-weighted estimate), and is a constant to
autograd: the gradient of ``w * l`` is ``w * grad l``. Where sampler and trainer agree the
log-ratio is exactly 0 and ``w`` is exactly 1.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

TIS_LEVELS = ("token", "sequence")


def tis_weights(old_logp: Tensor, rollout_logp: Tensor, mask: Tensor, level: str = "token",
                cap: float = 2.0) -> tuple[Tensor, dict[str, Tensor]]:
    """Truncated importance weights ``w`` [B, T] (detached, 0 off ``mask``) of the trainer's
    rollout policy against the sampler, and their stats: ``tis/mean_weight`` (the mean of ``w``
    over the masked tokens, token level; over rows with a token, sequence level) and
    ``tis/frac_capped`` (the share of those where the cap bound). ``old_logp``,
    ``rollout_logp``, ``mask``: [B, T]."""
    if not old_logp.shape == rollout_logp.shape == mask.shape:
        raise ValueError(f"old_logp {tuple(old_logp.shape)}, rollout_logp {tuple(rollout_logp.shape)} and "
                         f"mask {tuple(mask.shape)} must have the same shape")
    if level not in TIS_LEVELS:
        raise ValueError(f"tis level must be one of {TIS_LEVELS}, got {level!r}")
    if not cap >= 1.0:
        raise ValueError(f"tis cap must be >= 1 (a weight of 1 must survive it), got {cap!r}")
    m = mask.to(torch.float32)
    log_ratio = (old_logp.detach().float() - rollout_logp.detach().float()) * m   # [B, T], 0 off mask
    log_cap = math.log(cap)
    if level == "token":
        log_w, counted = log_ratio, m
    else:
        log_w, counted = log_ratio.sum(-1, keepdim=True), (m.sum(-1, keepdim=True) > 0).float()  # [B, 1]
    capped = (log_w > log_cap).float() * counted
    w = torch.exp(log_w.clamp(max=log_cap))          # clamp first: exp never overflows
    n = counted.sum().clamp(min=1)
    stats = {"tis/mean_weight": (w * counted).sum() / n, "tis/frac_capped": capped.sum() / n}
    return (w * m).detach(), stats
