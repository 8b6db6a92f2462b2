"""Truncated importance sampling of the sampler against the trainer (rlhf/core/importance.py),
by hand: exactly 1 where the two agree, the ratio where it is under the cap, the cap above it."""
import math

import pytest
import torch

from rlhf.core.importance import tis_weights

T = torch.tensor


def test_weights_are_exactly_one_where_sampler_and_trainer_agree():
    logp = torch.randn(3, 5) - 2.0
    mask = T([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]], dtype=torch.float32)
    for level in ("token", "sequence"):
        w, stats = tis_weights(logp, logp.clone(), mask, level, cap=2.0)
        assert torch.equal(w, mask)  # exactly 1 on the tokens, 0 off them
        assert stats["tis/mean_weight"].item() == 1.0 and stats["tis/frac_capped"].item() == 0.0


def test_token_weights_are_the_ratio_under_the_cap_and_the_cap_above_it():
    # log-ratios old - rollout: 0.5 -> e^0.5 = 1.6487 (< 2), 1.0 -> e = 2.718 capped at 2, -1 -> e^-1 = 0.3679
    old = T([[-1.0, -1.0, -3.0, -1.0]])
    rollout = T([[-1.5, -2.0, -2.0, -9.0]])
    mask = T([[1.0, 1.0, 1.0, 0.0]])  # the last token is padding: weight 0, not counted
    w, stats = tis_weights(old, rollout, mask, "token", cap=2.0)
    torch.testing.assert_close(w, T([[math.exp(0.5), 2.0, math.exp(-1.0), 0.0]]))
    torch.testing.assert_close(stats["tis/mean_weight"], T((math.exp(0.5) + 2.0 + math.exp(-1.0)) / 3))
    torch.testing.assert_close(stats["tis/frac_capped"], T(1 / 3))


def test_sequence_weights_multiply_the_token_ratios_of_a_row_then_cap():
    # row 0: log-ratios 0.25 + 0.25 = 0.5 -> e^0.5 on both its tokens; row 1: 0.6 + 0.6 = 1.2 -> e^1.2 > 2: 2
    # row 2 has no token: weight 0; the stats count tokens (a row's weight once per token)
    old = T([[-1.0, -1.0], [-1.0, -1.0], [0.0, 0.0]])
    rollout = T([[-1.25, -1.25], [-1.6, -1.6], [-5.0, -5.0]])
    mask = T([[1.0, 1.0], [1.0, 1.0], [0.0, 0.0]])
    w, stats = tis_weights(old, rollout, mask, "sequence", cap=2.0)
    torch.testing.assert_close(w, T([[math.exp(0.5)] * 2, [2.0, 2.0], [0.0, 0.0]]))
    torch.testing.assert_close(stats["tis/mean_weight"], T((2 * math.exp(0.5) + 2 * 2.0) / 4))
    torch.testing.assert_close(stats["tis/frac_capped"], T(0.5))


@pytest.mark.parametrize("dtype,level", [("bfloat16", "token"), ("float16", "token"), ("float32", "none")])
def test_auto_corrects_where_sampler_and_trainer_round_differently(dtype, level):
    from rlhf.core.importance import tis_level

    assert tis_level("auto", dtype) == level
    assert tis_level("sequence", "float32") == "sequence" and tis_level("none", "bfloat16") == "none"


def test_a_huge_log_ratio_caps_without_overflow_and_weights_are_constants():
    old = T([[0.0]], requires_grad=True)
    w, _ = tis_weights(old, T([[-1e4]]), T([[1.0]]), "sequence", cap=3.0)
    assert w.item() == 3.0 and not w.requires_grad


@pytest.mark.parametrize("kw", [{"level": "row"}, {"cap": 0.5}])
def test_bad_settings_are_refused(kw):
    with pytest.raises(ValueError):
        tis_weights(torch.zeros(1, 2), torch.zeros(1, 2), torch.ones(1, 2), **kw)


def test_the_weight_multiplies_the_policy_gradient_term_and_not_the_kl_term():
    """policy_loss with is_weight on three tokens, one on-policy step (ratio 1, nothing clipped):
    d loss / d logp_t = (-A w_t + kl_coef * d k3+_t / d logp_t) / n, and on-policy
    d k3+ / d logp = log(pi / ref) = logp - ref_logp.
    logp -1, -2, -0.5; the sampler's -1, -3, -0.2 -> log-ratios 0, 1, -0.3 -> w 1, 2 (e capped), e^-0.3;
    A = 0.5, kl_coef 0.1, ref -1.5, -2, -0.5 -> logp - ref 0.5, 0, 0; n = 3 tokens:
    grad = ((-0.5 + 0.05) / 3, -1 / 3, -0.5 e^-0.3 / 3)."""
    from rlhf.core import policy_loss

    logp = T([[-1.0, -2.0, -0.5]], requires_grad=True)
    mask = torch.ones(1, 3)
    w, _ = tis_weights(logp.detach(), T([[-1.0, -3.0, -0.2]]), mask, "token", cap=2.0)
    ref = T([[-1.5, -2.0, -0.5]])
    loss, stats = policy_loss(logp, T([0.5]), mask, ref_logp=ref, kl_coef=0.1, kl_estimator="k3+", is_weight=w)
    loss.backward()
    torch.testing.assert_close(logp.grad, T([[(-0.5 + 0.05) / 3, -1.0 / 3, -0.5 * math.exp(-0.3) / 3]]))
    _, plain = policy_loss(logp.detach(), T([0.5]), mask, ref_logp=ref, kl_coef=0.1, kl_estimator="k3+")
    assert stats["kl"] == plain["kl"]  # the KL term is not weighted
    torch.testing.assert_close(stats["pg_loss"], T(-0.5 * (1 + 2 + math.exp(-0.3)) / 3))
