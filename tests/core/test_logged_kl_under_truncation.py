"""The KL logged under truncated sampling is KL(pi_t || ref), pi_t the truncated distribution the
run samples from and trains: the five-action example, expectations taken exactly by weighting
each kept action by its probability under pi_t (policy_loss's token mean with those weights as
the mask and denom 1 is exactly E_pi_t[estimate])."""
from __future__ import annotations

import math

import pytest
import torch

from rlhf.core import policy_loss

# five actions; the policy equals the reference, and sampling keeps the top three
REF = torch.tensor([0.5, 0.25, 0.1643, 0.05, 0.0357], dtype=torch.float64)
KEPT = 3
MASS = float(REF[:KEPT].sum())                                   # 0.9143: ref's mass on the kept tokens
PI_T = REF[:KEPT] / MASS                                         # the truncated, renormalised policy
TRUE_KL = float((PI_T * (PI_T.log() - REF[:KEPT].log())).sum())  # = -log(MASS) = 0.0896


def logged_kl(estimator: str, logged: str | None) -> float:
    logp = PI_T.log()[None, :]
    _, stats = policy_loss(logp, torch.zeros_like(logp), PI_T[None, :], ref_logp=REF[:KEPT].log()[None, :],
                           kl_estimator=estimator, kl_logged=logged, denom=1.0)
    return float(stats["kl"])


def test_the_example_by_hand():
    assert TRUE_KL == pytest.approx(-math.log(MASS), abs=1e-12) and TRUE_KL == pytest.approx(0.0896, abs=1e-4)


@pytest.mark.parametrize("estimator", ["k3", "k3+"])
def test_k3_values_miss_the_dropped_mass(estimator):
    """E_pi_t[r - 1 - log r] = M - 1 + KL: 23 times too low here (0.0039)."""
    assert logged_kl(estimator, None) == pytest.approx(TRUE_KL - (1 - MASS), abs=1e-12)
    assert logged_kl(estimator, None) == pytest.approx(0.0039, abs=1e-4)


@pytest.mark.parametrize("estimator", ["k2", "k3", "k3+"])
def test_k1_logged_is_the_kl_between_the_distributions_the_run_uses(estimator):
    assert logged_kl(estimator, "k1") == pytest.approx(TRUE_KL, abs=1e-12)


def test_the_logged_estimator_changes_the_number_not_the_gradient():
    logp = PI_T.log()[None, :].clone().requires_grad_()
    grads = []
    for logged in (None, "k1"):
        loss, _ = policy_loss(logp, torch.zeros(1, KEPT, dtype=torch.float64), PI_T[None, :],
                              ref_logp=REF[:KEPT].log()[None, :], kl_coef=0.1, kl_logged=logged, denom=1.0)
        grads.append(torch.autograd.grad(loss, logp)[0])
    assert torch.equal(grads[0], grads[1])


def test_the_trainer_logs_k1_exactly_when_sampling_is_truncated(tiny_model, monkeypatch):
    """Through the real LM update: the trainer asks policy_loss for k1's value iff top_k / top_p /
    min_p truncate the distribution."""
    import rlhf.trainers.lm as lm
    from rlhf.config import LMConfig
    from rlhf.lm.policy import LMPolicy

    seen = []
    real = lm.policy_loss
    monkeypatch.setattr(lm, "policy_loss", lambda *a, **k: seen.append(k.get("kl_logged")) or real(*a, **k))
    for options, expected in (({}, None), ({"top_k": 3}, "k1"), ({"top_p": 0.9}, "k1"), ({"min_p": 0.1}, "k1")):
        cfg = LMConfig(model=tiny_model, prompts_per_step=1, group_size=2, max_new_tokens=3, **options)
        policy = LMPolicy(tiny_model, lora_r=2, lora_alpha=4)
        policy.set_options(**options)
        roll = policy.generate(*policy.encode_prompts(["What is 1 + 2?"]), 2, 3)
        passes = lm.rollout_pass(policy, roll, cfg)
        seen.clear()
        lm.minibatch_loss(policy, roll, torch.arange(1), torch.zeros(2), None, passes, roll.mask, cfg,
                          lm.ONE_PROCESS, None, first=False)
        assert seen == [expected], options
