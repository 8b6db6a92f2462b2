"""Rollouts from the LM policy: today's source (single-turn sampling, ``SamplerSource``; the
record it fills is ``rlhf.lm.rollout_record``), the per-prompt sampling noise, and the no-grad
passes over a rollout that the update needs.

Shapes: N = prompts * group_size rows, C completion tokens; ``logp, ref_logp, mask : [N, C]``.
"""
from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor

from rlhf.config import LMConfig
from rlhf.core import kl_estimate
from rlhf.lm.policy import LMPolicy
from rlhf.lm.rollout_record import RewardInputs, Rollout


@dataclass
class RolloutPass:
    """What the update compares the trained policy with, computed once per rollout, no grad:
    ``ref_logp`` the reference's log-probs (None when kl_coef = 0), ``old_logp`` / ``old_values``
    the rollout policy's log-probs and values (None when one on-policy step needs neither),
    all [N, C]; ``seconds`` the time the passes took."""

    ref_logp: Tensor | None
    old_logp: Tensor | None
    old_values: Tensor | None
    seconds: float = 0.0


class KLTerms(NamedTuple):
    """Where the KL(pi || ref) term goes: its coefficient in the reward and in the loss (one of
    them is 0) and its estimator."""

    reward_coef: float
    loss_coef: float
    estimator: str


def kl_terms(cfg: LMConfig) -> KLTerms:
    """The one reader of ``kl_coef``, ``kl_placement`` and ``kl_estimator``."""
    in_reward = cfg.kl_placement == "reward"
    return KLTerms(cfg.kl_coef if in_reward else 0.0, 0.0 if in_reward else cfg.kl_coef, cfg.kl_estimator)


def sampling_uniforms(seed: int, prompt_ids, group_size: int, max_new_tokens: int) -> torch.Tensor:
    """The random numbers of every draw, [len(prompt_ids) * group_size, max_new_tokens], from a
    generator per prompt keyed by (seed, the prompt's position in the run). A completion thus
    does not depend on which process sampled it or on what else shared its batch: one process
    and several give the same samples (up to float rounding of the logits)."""
    parts = []
    for j in prompt_ids:
        key = hashlib.blake2b(f"{seed}/{j}".encode(), digest_size=8).digest()
        gen = torch.Generator().manual_seed(int.from_bytes(key, "little") & (2**63 - 1))
        parts.append(torch.rand(group_size, max_new_tokens, dtype=torch.float64, generator=gen))
    return torch.cat(parts)


@dataclass
class SamplerSource:
    """Today's rollout source (``rlhf.lm.rollout_record.RolloutSource``): a single turn per
    prompt, sampled by the policy's decode loop (``LMPolicy.generate``, ``rlhf.lm.sampler``),
    ``group_size`` completions of at most ``max_new_tokens`` tokens each (greedy: one)."""

    policy: LMPolicy
    group_size: int
    max_new_tokens: int

    def __call__(self, rows: list[dict], *, greedy: bool = False, adapter: bool = True,
                 uniforms: Tensor | None = None) -> Rollout:
        g = 1 if greedy else self.group_size
        prompts = [r["prompt"] for r in rows]
        ids, attn = self.policy.encode_prompts(prompts)
        roll = self.policy.generate(ids, attn, g, self.max_new_tokens, greedy=greedy, adapter=adapter,
                                    uniforms=uniforms)
        texts = self.policy.decode(roll.completion_ids, roll.attention)
        conversational = not isinstance(prompts[0], str)
        completions = [[{"role": "assistant", "content": t}] for t in texts] if conversational else texts
        columns = {k: [r[k] for r in rows for _ in range(g)] for k in rows[0] if k != "prompt"}
        roll.reward_inputs = RewardInputs([p for p in prompts for _ in range(g)], completions, columns)
        return roll


def collect(policy: LMPolicy, rows: list[dict], cfg: LMConfig, greedy: bool = False, adapter: bool = True,
            uniforms: torch.Tensor | None = None):
    """Sample group_size completions per prompt (greedy: one argmax completion) with the
    recipe's sampler source; return the rollout and, unpacked from it, what reward functions
    take: prompts, completions and dataset columns, one per row."""
    roll = SamplerSource(policy, cfg.group_size, cfg.max_new_tokens)(rows, greedy=greedy, adapter=adapter,
                                                                      uniforms=uniforms)
    inputs = roll.reward_inputs
    return roll, inputs.prompts, inputs.completions, inputs.columns


@torch.no_grad()
def rollout_pass(policy: LMPolicy, roll: Rollout, cfg: LMConfig) -> RolloutPass:
    """No-grad passes over the rollout: the reference's log-probs (when kl_coef > 0), and the
    rollout policy's log-probs and values when the update needs them (several optimiser steps
    per rollout make it off-policy; PPO needs V(s_t) for GAE)."""
    t = time.time()
    policy.eval_mode()  # the policy itself (no dropout): these are the ratio's and the KL's denominators
    ref_logp = policy.logp(roll, adapter=False) if any(kl_terms(cfg)[:2]) else None
    old_logp = old_values = None
    if cfg.algo == "ppo" or cfg.epochs * cfg.minibatches > 1:
        out = policy.forward(roll, values=cfg.algo == "ppo")
        old_logp, old_values = out["logp"], out.get("values")
    return RolloutPass(ref_logp, old_logp, old_values, seconds=time.time() - t)


@torch.no_grad()
def kl_after_update(policy: LMPolicy, roll: Rollout, old_logp: Tensor, mask: Tensor, reduce=None) -> float:
    """KL(pi_old || pi) per token on the rollout, pi the policy as the update left it: what the
    adaptive-KL controller measures (PPO paper, sec. 4). One no-grad forward over the rollout;
    per token the k3 estimate ``rho - 1 - log rho``, ``rho = pi / pi_old``, whose expectation
    over tokens sampled by pi_old is KL(pi_old || pi); averaged over ``mask`` tokens (``reduce``
    sums over processes: the mean is the whole batch's)."""
    reduce = reduce or (lambda t: t)
    policy.eval_mode()
    kl = kl_estimate(old_logp, policy.forward(roll)["logp"], "k3") * mask
    return float(reduce(kl.sum()) / reduce(mask.sum()).clamp(min=1))
