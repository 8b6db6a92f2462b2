"""Numeric tests of the core math against values computed by hand (in the comments)."""
import math

import pytest
import torch

from rlhf.core import (
    aggregate,
    bradley_terry_loss,
    clipped_surrogate,
    discounted_returns,
    entropy_from_logits,
    gae,
    group_normalize,
    kl_estimate,
    leave_one_out,
    policy_loss,
    reinforce,
    selective_log_softmax,
    value_loss,
    whiten,
)

from numeric import close  # noqa: E402

T = torch.tensor



# ---------------------------------------------------------------- advantages
def test_discounted_returns_by_hand():
    # gamma 0.5: G2 = 3, G1 = 2 + 0.5*3 = 3.5, G0 = 1 + 0.5*3.5 = 2.75
    close(discounted_returns(T([[1.0, 2.0, 3.0]]), 0.5), [[2.75, 3.5, 3.0]])


def test_discounted_returns_cut_at_done_and_bootstrap():
    # done after step 0: G0 = 1; segment [2, 3] bootstraps last_value 4:
    # G2 = 3 + 0.5*4 = 5, G1 = 2 + 0.5*5 = 4.5
    r = T([[1.0, 2.0, 3.0]])
    d = T([[1.0, 0.0, 0.0]])
    close(discounted_returns(r, 0.5, dones=d, last_value=T([4.0])), [[1.0, 4.5, 5.0]])


def test_gae_lm_layout_by_hand():
    # one sequence, 3 valid tokens + 1 pad; reward 1 on the last valid token
    # V = [0.5, 0.2, 0.4, (pad 9)], gamma 1, lam 0.5
    # deltas: d0 = 0 + 0.2 - 0.5 = -0.3, d1 = 0 + 0.4 - 0.2 = 0.2, d2 = 1 + 0 - 0.4 = 0.6
    # A2 = 0.6, A1 = 0.2 + 0.5*0.6 = 0.5, A0 = -0.3 + 0.5*0.5 = -0.05
    rewards = T([[0.0, 0.0, 1.0, 0.0]])
    values = T([[0.5, 0.2, 0.4, 9.0]])
    mask = T([[1.0, 1.0, 1.0, 0.0]])
    adv, ret = gae(rewards, values, gamma=1.0, gae_lambda=0.5, mask=mask)
    close(adv, [[-0.05, 0.5, 0.6, 0.0]])
    close(ret, [[0.45, 0.7, 1.0, 0.0]])


def test_gae_gym_truncation_bootstraps_but_termination_does_not():
    # two steps, each the end of an episode. step 0 truncated: bootstrap V(final obs) = 10;
    # step 1 terminated: no bootstrap. gamma 0.9, lam 1.
    rewards = T([[1.0, 1.0]])
    values = T([[0.0, 0.0]])
    next_values = T([[10.0, 10.0]])
    terminated = T([[0.0, 1.0]])
    dones = T([[1.0, 1.0]])
    adv, _ = gae(rewards, values, 0.9, 1.0, next_values=next_values, terminated=terminated, dones=dones)
    close(adv, [[1.0 + 9.0, 1.0]])


def test_gae_lambda_one_equals_returns_minus_values():
    torch.manual_seed(0)
    r, v = torch.randn(3, 7), torch.randn(3, 7)
    adv, _ = gae(r, v, gamma=0.9, gae_lambda=1.0)
    close(adv, discounted_returns(r, 0.9) - v)


def test_group_normalize_by_hand():
    # group [1, 0, 0, 1]: mean 0.5, Bessel std = sqrt(4 * 0.25 / 3) = 0.57735
    adv = group_normalize(T([1.0, 0.0, 0.0, 1.0, 2.0, 2.0, 2.0, 2.0]), 4, eps=0.0)
    s = 0.5 / math.sqrt(1 / 3)
    close(adv[:4], [s, -s, -s, s])
    assert torch.isnan(adv[4:]).all()  # eps = 0 and an all-equal group: 0/0
    adv = group_normalize(T([2.0, 2.0, 2.0, 2.0]), 4)  # default eps keeps it finite
    close(adv, [0.0] * 4)


def test_group_normalize_scales():
    r = T([1.0, 3.0, 10.0, 14.0])
    close(group_normalize(r, 2, scale_rewards="none"), [-1.0, 1.0, -2.0, 2.0])
    std_batch = r.std().item()
    close(group_normalize(r, 2, scale_rewards="batch", eps=0.0), T([-1.0, 1.0, -2.0, 2.0]) / std_batch)
    with pytest.raises(ValueError):
        group_normalize(r, 3)
    with pytest.raises(ValueError):
        group_normalize(r, 2, scale_rewards="bogus")


def test_leave_one_out_by_hand():
    # group [1, 2, 6]: baselines (2+6)/2=4, (1+6)/2=3.5, (1+2)/2=1.5
    close(leave_one_out(T([1.0, 2.0, 6.0]), 3), [-3.0, -1.5, 4.5])


def test_whiten():
    x = T([1.0, 2.0, 3.0, 100.0])
    m = T([1.0, 1.0, 1.0, 0.0])
    # masked mean 2, var 2/3
    close(whiten(x, m, eps=0.0), [-1 / math.sqrt(2 / 3), 0.0, 1 / math.sqrt(2 / 3), 0.0])
    close(whiten(x, m, shift_mean=False, eps=0.0)[:3], T([-1.2247449, 0.0, 1.2247449]) + 2)


# ---------------------------------------------------------------- objectives
def test_reinforce():
    close(reinforce(T([-1.0, -2.0]), T([2.0, -0.5])), [2.0, -1.0])


def test_clipped_surrogate_by_hand():
    # ratios e^{0.5}=1.6487 and e^{-0.5}=0.6065, eps 0.2
    logp = T([0.5, -0.5, 0.5, -0.5])
    old = torch.zeros(4)
    adv = T([1.0, 1.0, -1.0, -1.0])
    loss, clipped = clipped_surrogate(logp, old, adv, 0.2)
    # A>0, rho=1.65 -> min(1.65, 1.2) = 1.2 (clipped); A>0, rho=.61 -> min(.61, .8) = .61
    # A<0, rho=1.65 -> min(-1.65, -1.2) = -1.65; A<0, rho=.61 -> min(-.61, -.8) = -.8 (clipped)
    close(loss, [-1.2, -math.exp(-0.5), math.exp(0.5), 0.8])
    close(clipped, [1.0, 0.0, 0.0, 1.0])


def test_clip_higher_is_asymmetric():
    logp = T([0.25, -0.25])
    loss, _ = clipped_surrogate(logp, torch.zeros(2), T([1.0, -1.0]), clip_range=0.1, clip_range_high=0.3)
    # rho=e^.25=1.284 < 1.3: unclipped; rho=e^-.25=.7788 < 0.9 with A<0: clipped to .9
    close(loss, [-math.exp(0.25), 0.9])


def test_value_loss_by_hand():
    v, ret, old = T([2.0, 0.0]), T([0.0, 0.0]), T([1.0, 0.5])
    close(value_loss(v, ret), [2.0, 0.0])
    # clipped: old + clip(v - old, -.2, .2) = [1.2, 0.3]; max(4, 1.44)/2=2, max(0, .09)/2=.045
    close(value_loss(v, ret, old, clip_range_value=0.2), [2.0, 0.045])


def test_entropy_and_selective_log_softmax():
    logits = torch.log(T([[0.5, 0.25, 0.25]]))
    close(entropy_from_logits(logits), [1.5 * math.log(2)])
    close(selective_log_softmax(logits, T([2])), [math.log(0.25)])
    torch.manual_seed(0)
    big = torch.randn(2, 5, 11)
    idx = torch.randint(0, 11, (2, 5))
    close(selective_log_softmax(big, idx),
          torch.log_softmax(big, -1).gather(-1, idx[..., None]).squeeze(-1))


def test_kl_estimators_by_hand():
    logp, ref = T([math.log(0.5)]), T([math.log(0.25)])  # r = ref/pi = 0.5, log r = -ln 2
    close(kl_estimate(logp, ref, "k1"), [math.log(2)])
    close(kl_estimate(logp, ref, "k2"), [0.5 * math.log(2) ** 2])
    close(kl_estimate(logp, ref, "k3"), [0.5 - 1 + math.log(2)])
    close(kl_estimate(logp, ref, "k3+"), [0.5 - 1 + math.log(2)])  # on-policy: rho = 1
    # off-policy, pi_old = 0.25 on this action: rho = 0.5 / 0.25 = 2 weights k3
    close(kl_estimate(logp, ref, "k3+", old_logp=T([math.log(0.25)])), [2 * (0.5 - 1 + math.log(2))])
    with pytest.raises(ValueError):
        kl_estimate(logp, ref, "k4")


def test_k3_is_unbiased_for_the_true_kl():
    torch.manual_seed(0)
    p = torch.distributions.Categorical(probs=T([0.6, 0.3, 0.1]))
    q = torch.distributions.Categorical(probs=T([0.3, 0.3, 0.4]))
    a = p.sample((200_000,))
    true_kl = torch.distributions.kl_divergence(p, q)
    for k in ("k1", "k3"):
        close(kl_estimate(p.log_prob(a), q.log_prob(a), k).mean(), true_kl, tol=1e-2)


def test_aggregate_modes_by_hand():
    x = T([[1.0, 2.0, 3.0], [4.0, 0.0, 0.0]])
    m = T([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    close(aggregate(x, m, "token_mean"), 10 / 4)
    close(aggregate(x, m, "token_mean", denom=8), 10 / 8)  # step-wide token count
    close(aggregate(x, m, "seq_mean"), (2.0 + 4.0) / 2)
    close(aggregate(x, m, "constant", denom=6), 10 / 6)
    with pytest.raises(ValueError):
        aggregate(x, m, "constant")
    with pytest.raises(ValueError):
        aggregate(x, m, "nope")


def test_micro_batches_with_step_denominator_sum_to_full_batch_loss():
    torch.manual_seed(0)
    x, m = torch.randn(4, 6), (torch.rand(4, 6) > 0.3).float()
    full = aggregate(x, m, "token_mean")
    parts = aggregate(x[:2], m[:2], "token_mean", m.sum()) + aggregate(x[2:], m[2:], "token_mean", m.sum())
    close(parts, full)


def test_policy_loss_grpo_by_hand():
    # one sequence of 2 tokens, on-policy (ratio 1), adv 2, beta 0.5, ref = logp - ln2 on tok 0
    logp = torch.log(T([[0.5, 0.25]])).requires_grad_()
    ref = torch.log(T([[0.25, 0.25]]))
    loss, stats = policy_loss(logp, T([2.0]), torch.ones(1, 2), ref_logp=ref, kl_coef=0.5, kl_estimator="k3")
    k3 = 0.5 - 1 + math.log(2)
    close(loss, (-2.0 + -2.0 + 0.5 * k3) / 2)
    close(stats["kl"], k3 / 2)
    close(stats["clip_frac"], 0.0)
    loss.backward()
    # d/dlogp of -A*rho at rho=1 is -A = -2; d k3/d logp = 1 - r: tok0 1 - 0.5, tok1 0
    close(logp.grad, [[(-2.0 + 0.5 * 0.5) / 2, -2.0 / 2]])


def test_token_path_and_flat_gym_path_are_the_same_function():
    """The LM path [B, T] + mask and the gym path [N, 1] give the same loss and gradients."""
    torch.manual_seed(0)
    n = 5
    logp_flat = torch.randn(n).requires_grad_()
    old_flat, ref_flat, adv_flat = torch.randn(n), torch.randn(n), torch.randn(n)
    # the same 5 actions laid out as 2 "sequences" of length 3 (last slot padded)
    slots = [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1)]
    mask = torch.zeros(2, 3)
    kw = dict(objective="clip", clip_range=0.2, kl_coef=0.1, kl_estimator="k3")

    def to_tokens(v, fill=0.0):
        out = torch.full((2, 3), fill)
        for i, (b, t) in enumerate(slots):
            out = out.index_put((T([b]), T([t])), v[i : i + 1])
        return out

    for b, t in slots:
        mask[b, t] = 1.0
    logp_tok = to_tokens(logp_flat)
    flat_loss, flat_stats = policy_loss(logp_flat[:, None], adv_flat[:, None], None,
                                        old_logp=old_flat[:, None], ref_logp=ref_flat[:, None], **kw)
    tok_loss, tok_stats = policy_loss(logp_tok, to_tokens(adv_flat), mask,
                                      old_logp=to_tokens(old_flat), ref_logp=to_tokens(ref_flat), **kw)
    close(flat_loss, tok_loss)
    g_flat, = torch.autograd.grad(flat_loss, logp_flat)
    g_tok, = torch.autograd.grad(tok_loss, logp_flat)
    close(g_flat, g_tok)
    for k in flat_stats:
        close(flat_stats[k], tok_stats[k])


def test_policy_loss_reports_nonfinite():
    loss, stats = policy_loss(T([[float("nan")]]), T([1.0]), None)
    assert "nonfinite" in stats


# ---------------------------------------------------------------- KL-penalty surrogate (gym PPO)
def test_kl_penalty_surrogate_by_hand():
    from rlhf.core import kl_penalty_surrogate

    # log rho = 0.5: rho = e^0.5 = 1.648721; A = 2; k3 KL(old||new) = rho - 1 - 0.5 = 0.148721
    # loss = -1.648721 * 2 + 0.5 * 0.148721 = -3.223082
    loss, kl = kl_penalty_surrogate(T([0.5]), T([0.0]), T([2.0]), 0.5)
    close(kl, [math.exp(0.5) - 1.5])
    close(loss, [-2 * math.exp(0.5) + 0.5 * (math.exp(0.5) - 1.5)])


def test_policy_loss_kl_penalty_objective_by_hand():
    # two gym actions [N, 1]: log rho = [0, ln 2], A = [1, -1], beta = 1
    # per element: -1 + 0 = -1 ; -(2 * -1) + (2 - 1 - ln 2) = 2 + 0.306853 ; mean = 0.653426
    logp, old = T([[0.0], [math.log(2)]]), T([[0.0], [0.0]])
    loss, stats = policy_loss(logp, T([[1.0], [-1.0]]), None, old_logp=old, objective="kl_penalty",
                              penalty_coef=1.0)
    close(loss, (-1 + 2 + 1 - math.log(2)) / 2)
    close(stats["approx_kl"], (1 - math.log(2)) / 2)
    with pytest.raises(ValueError, match="old_logp"):
        policy_loss(logp, T([[1.0], [-1.0]]), objective="kl_penalty")


def test_adaptive_kl_coef_doubles_and_halves():
    from rlhf.core import adaptive_kl_coef

    assert adaptive_kl_coef(1.0, 0.001, 0.01) == 0.5   # kl < target / 1.5
    assert adaptive_kl_coef(1.0, 0.02, 0.01) == 2.0    # kl > target * 1.5
    assert adaptive_kl_coef(1.0, 0.01, 0.01) == 1.0


def test_sample_categorical_matches_the_distribution():
    from rlhf.core import sample_categorical

    g = torch.Generator().manual_seed(0)
    probs = T([0.5, 0.0, 0.2, 0.3]).repeat(100_000, 1) * 3.0  # unnormalised rows are fine
    draws = sample_categorical(probs, g)
    freq = torch.bincount(draws, minlength=4).float() / draws.numel()
    close(freq, [0.5, 0.0, 0.2, 0.3], tol=6e-3)  # ~4 standard errors at n = 1e5
    assert (draws != 1).all()  # a zero-probability token is never drawn


def test_sample_categorical_two_level_search_is_the_inverse_cdf():
    """Blocks then entries give the same index as one search in the full cumulative sum, for
    given uniforms, including blocks that straddle the padded end of the vocabulary."""
    from rlhf.core import sample_categorical

    g = torch.Generator().manual_seed(1)
    probs = torch.rand(2000, 10, generator=g, dtype=torch.float64) ** 3
    u = torch.rand(2000, generator=g, dtype=torch.float64)
    cdf = probs.cumsum(-1)
    expected = torch.searchsorted(cdf, ((1 - u) * cdf[:, -1])[:, None]).squeeze(-1)
    for block in (1, 3, 4, 10, 512):
        assert torch.equal(sample_categorical(probs, uniform=u, block=block), expected), block
    # by hand: uniform probabilities 0.1, u = 0.25 -> target 0.75 -> first cdf >= 0.75 is index 7
    assert sample_categorical(torch.full((1, 10), 0.1), uniform=T([0.25]), block=3).item() == 7


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_linear_logprobs_equals_head_then_log_softmax(temperature):
    """The blocked LM head + log-softmax gives log_softmax(h W^T / t)[id], its entropy, and
    the gradients for h and W, with blocks that do not divide the vocabulary."""
    from rlhf.core import entropy_from_logits, linear_logprobs

    g = torch.Generator().manual_seed(0)
    h = torch.randn(9, 5, generator=g, requires_grad=True)
    w = torch.randn(11, 5, generator=g, requires_grad=True)
    ids = torch.randint(0, 11, (9,), generator=g)
    logp, ent = linear_logprobs(h, w, ids, temperature, chunk=4, entropy=True)
    logits = h @ w.t() / temperature
    expected = torch.log_softmax(logits, -1)[torch.arange(9), ids]
    torch.testing.assert_close(logp, expected, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(ent, entropy_from_logits(logits).detach(), atol=1e-5, rtol=1e-5)
    weights = torch.randn(9, generator=g)
    ours = torch.autograd.grad((logp * weights).sum(), (h, w))
    plain = torch.autograd.grad((expected * weights).sum(), (h, w))
    for a, b in zip(ours, plain):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    # by hand, one row: logits [0, ln 3] -> log-probs [ln 1/4, ln 3/4]
    lp, _ = linear_logprobs(T([[1.0]]), T([[0.0], [math.log(3.0)]]), torch.tensor([1]), chunk=1)
    close(lp, [math.log(0.75)])


def test_bradley_terry_by_hand():
    # margins r_chosen - r_rejected = [1, -1, 0]
    chosen = torch.tensor([2.0, 0.0, 1.0], requires_grad=True)
    loss, stats = bradley_terry_loss(chosen, torch.tensor([1.0, 1.0, 1.0]))
    # -(log sigmoid(1) + log sigmoid(-1) + log sigmoid(0)) / 3 = (log(1 + e^-1) + log(1 + e) + log 2) / 3
    expected = (math.log(1 + math.exp(-1)) + math.log(1 + math.exp(1)) + math.log(2)) / 3
    # float32 logsigmoid of O(1) numbers: relative error ~1e-7 on any CPU
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    assert stats["accuracy"].item() == pytest.approx(1 / 3) and stats["margin"].item() == 0.0  # a tie is not right
    loss.backward()
    # d/d r_chosen of -log sigmoid(m) / B = -sigmoid(-m) / B = -(1 - sigmoid(m)) / 3
    grad = [-(1 - 1 / (1 + math.exp(-m))) / 3 for m in (1.0, -1.0, 0.0)]
    torch.testing.assert_close(chosen.grad, torch.tensor(grad), rtol=1e-6, atol=1e-7)
