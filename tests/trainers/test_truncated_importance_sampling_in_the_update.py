"""tis in the update: the trainer's rollout-policy log-probs against the sampler's, per token or
per sequence, capped. Where the two agree the update is exactly the uncorrected one; where the
sampler saw every token as far less likely, the cap doubles the policy-gradient term exactly."""
import pytest
import torch

from rlhf.config import LMConfig
from rlhf.distributed import OneProcess
from rlhf.lm.rollout import RolloutPass
from rlhf.tasks import arith_row
from rlhf.trainers.lm import minibatch_gradients

from conftest import policy_with_adapter


def _setup(tiny_model):
    policy = policy_with_adapter(tiny_model)
    ids, attn = policy.encode_prompts([arith_row(12, 34)["prompt"], arith_row(5, 6)["prompt"]])
    uniforms = torch.rand(6, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    roll = policy.generate(ids, attn, group_size=3, max_new_tokens=5, uniforms=uniforms)
    adv = torch.randn(6, generator=torch.Generator().manual_seed(5))
    return policy, roll, adv


def _gradient(policy, roll, adv, cfg, passes=RolloutPass(None, None, None)):
    params = policy.trainable_parameters()
    for p in params:
        p.grad = None
    stats, _, bad = minibatch_gradients(policy, roll, torch.arange(2), adv, None, passes, roll.mask, cfg,
                                        OneProcess(), None, first=True)
    assert not bad
    return [p.grad.clone() for p in params], stats


@pytest.mark.parametrize("level", ["token", "sequence"])
def test_agreeing_log_probs_leave_the_update_exactly_uncorrected(tiny_model, level):
    """One on-policy step: no rollout pass ran, so the trainer's log-probs are the update's own
    forward (no extra one); the sampler's are set to exactly those: every weight is 1."""
    policy, roll, adv = _setup(tiny_model)
    cfg = LMConfig(max_new_tokens=5, kl_coef=0.0, tis="none")
    plain, _ = _gradient(policy, roll, adv, cfg)
    with torch.no_grad():
        roll.rollout_logp = policy.logp(roll)
    cfg.tis = level
    corrected, stats = _gradient(policy, roll, adv, cfg)
    assert all(torch.equal(a, b) for a, b in zip(plain, corrected))
    assert stats["tis/mean_weight"] == 1.0 and stats["tis/frac_capped"] == 0.0


@pytest.mark.parametrize("level", ["token", "sequence"])
def test_a_sampler_far_below_the_trainer_is_capped(tiny_model, level):
    """The sampler's log-probs 5 nats below the trainer's on every token: each weight is
    min(e^5, 2) = 2 (sequence: min(e^(5 len), 2) = 2), so the policy-gradient term, here the whole
    loss (kl_coef 0), doubles, and so does its gradient: exactly, a factor 2 being exact in
    floating point. With a rollout pass (two minibatches) its old log-probs are the trainer's."""
    policy, roll, adv = _setup(tiny_model)
    cfg = LMConfig(max_new_tokens=5, kl_coef=0.0, tis="none", tis_cap=2.0)
    with torch.no_grad():
        old = policy.logp(roll)
    passes = RolloutPass(None, old, None)
    plain, _ = _gradient(policy, roll, adv, cfg, passes)
    roll.rollout_logp = old - 5.0
    cfg.tis = level
    corrected, stats = _gradient(policy, roll, adv, cfg, passes)
    assert all(torch.equal(2 * a, b) for a, b in zip(plain, corrected))
    assert stats["tis/mean_weight"] == pytest.approx(2.0) and stats["tis/frac_capped"] == pytest.approx(1.0)
