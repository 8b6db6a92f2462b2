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
LOW_PRECISION = ("bfloat16", "float16")


def tis_level(tis: str, dtype: str) -> str:
    """The recipe's ``tis`` for a policy computing in ``dtype``: ``auto`` is ``token`` in bf16 /
    fp16 (where sampler and trainer round differently) and ``none`` in float32."""
    if tis == "auto":
        return "token" if dtype in LOW_PRECISION else "none"
    return tis


def tis_weights(old_logp: Tensor, rollout_logp: Tensor, mask: Tensor, level: str = "token",
                cap: float = 2.0) -> tuple[Tensor, dict[str, Tensor]]:
    """Truncated importance weights ``w`` [B, T] (detached, 0 off ``mask``) of the trainer's
    rollout policy against the sampler, and their stats over the masked tokens (a row's weight
    counts once per token at the sequence level too): ``tis/mean_weight`` and
    ``tis/frac_capped`` (the share of tokens whose weight the cap bound). ``old_logp``,
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
    log_w = log_ratio if level == "token" else log_ratio.sum(-1, keepdim=True)  # [B, T] or [B, 1]
    capped = (log_w > log_cap).float() * m
    w = torch.exp(log_w.clamp(max=log_cap)) * m     # clamp first: exp never overflows
    n = m.sum().clamp(min=1)
    stats = {"tis/mean_weight": w.sum() / n, "tis/frac_capped": capped.sum() / n}
    return w.detach(), stats
