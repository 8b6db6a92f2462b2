"""The built-in advantage estimators, registered under the recipe's ``adv_estimator`` names.

Thin adapters over the pure functions of ``rlhf/core/advantages.py``: each reads the fields of
one ``AdvInput`` it needs and returns ``(adv, ret-or-None)``. The LM rows give one reward per
completion (``rewards`` [N]); gym rollouts give one per step (``rewards`` [N, T]).

    adv_estimator  LM (one reward per completion)         gym (per-step rewards)
    grpo           group-normalised reward (Shao 2024)    -
    rloo           leave-one-out baseline (Kool 2019)     -
    reinforce      reward - moving-average baseline       Monte-Carlo return - V(s_t)
    gae            token GAE from the value head          GAE with bootstrap and episode cuts
"""
from __future__ import annotations

import torch
from torch import Tensor

from rlhf.core.advantages import discounted_returns, gae, group_normalize, last_index, leave_one_out
from rlhf.core.registry import AdvInput, register_adv_est


def sequence_rewards(x: AdvInput) -> Tensor:
    """The whole batch's rewards [N] with the KL placed in the reward subtracted (its sum over
    each completion's tokens): what a sequence-level estimator baselines."""
    if x.kl is None:
        return x.rewards
    return x.rewards - x.kl_coef * x.gather(x.kl.sum(1))


def token_rewards(x: AdvInput) -> Tensor:
    """This process's rewards per token [n, C]: each completion's reward on its last token, minus
    the per-token KL placed in the reward."""
    last = last_index(x.mask).clamp(min=0)  # (the mask is not a prefix in a multi-turn episode)
    out = torch.zeros_like(x.mask)
    out[torch.arange(len(out)), last] = x.local(x.rewards)  # sequence reward on its last token
    if x.kl is not None:
        out = out - x.kl_coef * x.kl
    return out


@register_adv_est("grpo")
def grpo(x: AdvInput) -> tuple[Tensor, None]:
    """``(r - mean_group) / (std_group + eps)`` (``scale_rewards`` picks the std)."""
    return x.local(group_normalize(sequence_rewards(x), x.group_size, x.scale_rewards, valid=x.valid)), None


@register_adv_est("rloo")
def rloo(x: AdvInput) -> tuple[Tensor, None]:
    """``r_i - mean_{j != i} r_j`` within each prompt's group."""
    return x.local(leave_one_out(sequence_rewards(x), x.group_size, valid=x.valid)), None


@register_adv_est("reinforce")
def reinforce(x: AdvInput) -> tuple[Tensor, Tensor | None]:
    """REINFORCE's return minus a baseline. Without a critic (LM): the reward minus a moving
    average of past rewards (``x.baseline``); with one (gym): the Monte-Carlo return
    ``G_t`` minus ``V(s_t)``, a truncation adding ``gamma * V(final obs)`` as its tail."""
    if x.values is None:
        r, valid = sequence_rewards(x), x.valid
        adv = r - x.baseline(r) if valid is None else (r - x.baseline(r, valid)) * valid
        return x.local(adv), None
    truncated = x.dones - x.terminated
    boot = x.rewards + x.gamma * truncated * x.next_values
    ret = discounted_returns(boot, x.gamma, dones=x.dones, last_value=x.last_value)
    return ret - x.values, ret


@register_adv_est("gae")
def gae_estimator(x: AdvInput) -> tuple[Tensor, Tensor]:
    """GAE over the critic's values. LM: the completion's reward on its last token, the value
    after it 0; a row without a reward (``valid`` False) gets advantage 0 and its own values as
    targets (no regression signal). Gym: ``next_values`` bootstraps, ``terminated`` / ``dones``
    cut."""
    rewards = token_rewards(x) if x.rewards.dim() == 1 else x.rewards
    adv, ret = gae(rewards, x.values, x.gamma, x.gae_lambda, mask=x.mask, next_values=x.next_values,
                   terminated=x.terminated, dones=x.dones)
    if x.valid is not None:
        keep = x.mask * x.local(x.valid)[:, None].to(x.mask.dtype)
        adv, ret = adv * keep, torch.where(keep > 0, ret, x.values * x.mask)
    return adv, ret
