"""Per-element policy and value objectives, KL estimators and the masked reducer.

Every objective here returns a *per-element* loss (to be minimised) shaped like its inputs,
``[B, T]`` for tokens or ``[N, 1]`` / ``[N]`` for gym actions; ``aggregate`` turns it into a
scalar. ``policy_loss`` composes them and is what every trainer — LM or gym — calls; the
objectives it can use are registered below under the recipe's ``objective`` names.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from rlhf.core.registry import POLICY_OBJECTIVES, register_policy_loss

__all__ = [
    "reinforce",
    "clipped_surrogate",
    "value_loss",
    "entropy_from_logits",
    "kl_estimate",
    "aggregate",
    "policy_loss",
    "kl_penalty_surrogate",
    "adaptive_kl_coef",
    "AGG_MODES",
    "KL_ESTIMATORS",
    "KL_PLACEMENTS",
    "bradley_terry_loss",
]

AGG_MODES = ("token_mean", "seq_mean", "constant")
KL_ESTIMATORS = ("k1", "k2", "k3", "k3+")
# where each estimator's expected gradient has a correct meaning (see ``kl_estimate``): in the
# loss k2 and k3+ descend KL(pi||ref) and k3 descends KL(ref||pi); in the reward only k1 does
KL_PLACEMENTS = {"loss": ("k2", "k3", "k3+"), "reward": ("k1",)}


def reinforce(logp: Tensor, adv: Tensor) -> Tensor:
    """Vanilla policy gradient (Williams 1992): ``-A * log pi(a|s)``."""
    return -adv * logp


def clipped_surrogate(
    logp: Tensor,
    old_logp: Tensor,
    adv: Tensor,
    clip_range: float = 0.2,
    clip_range_high: float | None = None,
) -> tuple[Tensor, Tensor]:
    """PPO's clipped surrogate (Schulman et al. 2017), with an optional asymmetric clip
    (DAPO's clip-higher): ``-min(rho * A, clip(rho, 1 - eps_lo, 1 + eps_hi) * A)``,
    ``rho = exp(logp - old_logp)``, ``eps_lo = clip_range``, ``eps_hi = clip_range_high``
    (default: ``clip_range``). Returns ``(loss, clipped)`` where ``clipped`` is 1 where
    the clipped branch was taken (the gradient is zero there).
    """
    clip_range_high = clip_range if clip_range_high is None else clip_range_high
    ratio = torch.exp(logp - old_logp)
    unclipped = ratio * adv
    clipped = torch.clamp(ratio, 1 - clip_range, 1 + clip_range_high) * adv
    return -torch.minimum(unclipped, clipped), (clipped < unclipped).to(logp.dtype)


def kl_penalty_surrogate(logp: Tensor, old_logp: Tensor, adv: Tensor, penalty_coef: float
                         ) -> tuple[Tensor, Tensor]:
    """PPO's KL-penalised surrogate (Schulman et al. 2017, sec. 4):
    ``-rho * A + beta * KL(pi_old || pi)``, ``rho = exp(logp - old_logp)``, beta = ``penalty_coef``,
    with the per-sample KL estimated by k3 from actions sampled by pi_old: ``rho - 1 - log rho``
    (>= 0; its value is unbiased for KL(pi_old || pi)). Here pi is the *second* argument of the
    divergence, so the per-sample autograd of this k3 is ``(rho - 1) * grad log pi``, whose
    expectation under pi_old is ``E_old[rho grad log pi] - E_old[grad log pi] = grad sum_a pi(a)
    - E_old[grad log pi] = -E_old[grad log pi] = grad KL(pi_old || pi)``: the right gradient
    (unlike k3 against a reference, where pi is the first argument). Returns ``(loss, kl)``;
    beta = 0 gives TRPO's plain importance-sampled surrogate.
    """
    kl = kl_estimate(old_logp, logp, "k3")
    return -torch.exp(logp - old_logp) * adv + penalty_coef * kl, kl


def adaptive_kl_coef(coef: float, kl: float, target: float) -> float:
    """The PPO paper's beta controller: halve beta when ``kl < target / 1.5``, double it when
    ``kl > target * 1.5``, else keep it. Call once per update with the measured mean KL."""
    if kl < target / 1.5:
        return coef / 2
    if kl > target * 1.5:
        return coef * 2
    return coef


def value_loss(
    values: Tensor, ret: Tensor, old_values: Tensor | None = None, clip_range_value: float | None = None
) -> Tensor:
    """``0.5 * (V - ret)^2``; with ``clip_range_value`` (c) the PPO2 pessimistic clipped variant
    ``0.5 * max((V - ret)^2, (old_V + clip(V - old_V, -c, c) - ret)^2)``."""
    loss = (values - ret) ** 2
    if clip_range_value is not None:
        if old_values is None:
            raise ValueError("value clipping needs old_values")
        v_clipped = old_values + torch.clamp(values - old_values, -clip_range_value, clip_range_value)
        loss = torch.maximum(loss, (v_clipped - ret) ** 2)
    return 0.5 * loss


def entropy_from_logits(logits: Tensor) -> Tensor:
    """Entropy of a categorical distribution per position: logits [..., V] -> [...]."""
    logp_all = torch.log_softmax(logits.float(), dim=-1)
    return -(logp_all.exp() * logp_all).sum(-1)


# The log-ratio log(ref / pi) is clamped to at most this before both terms of k3: exp() stays
# finite when the policy has fallen far below the reference on a token, and past the clamp k3
# is constant in logp (zero gradient) rather than a pull in the wrong direction, which clamping
# only the exp term gave (k3+ keeps its exact gradient there: see kl_estimate).
LOG_RATIO_CLAMP = 20.0


def kl_estimate(logp: Tensor, ref_logp: Tensor, estimator: str = "k3",
                old_logp: Tensor | None = None) -> Tensor:
    """Per-sample estimate of KL(pi || pi_ref) from log-probs of actions sampled from pi
    (Schulman, "Approximating KL divergence", 2020), ``r = pi_ref / pi``. What trains is the
    *gradient*, and it depends on where the estimate goes. In the loss, autograd of the value
    (with the samples given); in the reward, the score function E_pi[est * grad log pi] with
    the estimate detached. On-policy the expected gradients are:

    ===== ========================= =========================== =============================
    name  value (E_pi of it)        gradient in the loss        gradient in the reward
    ===== ========================= =========================== =============================
    k1    -log r: KL(pi||ref),      0 (E_pi[grad log pi] = 0):  grad KL(pi||ref): correct
          unbiased, high variance   no pull to the reference    (InstructGPT)
    k2    (log r)^2 / 2: biased     grad KL(pi||ref): correct   biased (neither direction)
          (>= 0, low variance)      (per sample: log(pi/ref) *
                                    grad log pi)
    k3    r - 1 - log r: KL(pi||    grad KL(ref||pi): the       grad KL(pi||ref) -
          ref), unbiased, >= 0      other direction (GRPO's     grad KL(ref||pi): ~0 near ref
                                    choice, DeepSeekMath)
    k3+   rho * k3, rho = pi /      grad KL(pi||ref): correct,  as k3 (rho is 1 in value)
          pi_old (1 on-policy):     also off-policy (samples
          KL(pi||ref), unbiased     from pi_old, the ratio
          also off-policy           importance-weights them)
    ===== ========================= =========================== =============================

    ``k3+`` is the ratio-weighted k3 (TRL's ``use_bias_correction_kl``), ``rho = exp(logp -
    old_logp)`` with ``old_logp`` the sampling policy's (default ``logp.detach()``: on-policy).
    The autograd of ``rho * k3`` per sample is ``rho * log(pi/ref) * grad log pi``; this is
    what k3+ returns as its gradient, with ``rho * k3`` as its value, so the gradient stays
    exact where the clamp bounds the value's exp (past it ``rho * k3`` would push the wrong
    way). On-policy it is k2's per-sample gradient and verl's straight-through "k3+" (k3's
    value, k2's gradient); off-policy (a later minibatch of several, samples from pi_old) its
    importance weight keeps the expected gradient exact where k2's is not.
    The log-ratio is clamped at ``LOG_RATIO_CLAMP`` before both terms of k3 (see there).
    """
    log_r = ref_logp - logp
    if estimator == "k1":
        return -log_r
    if estimator == "k2":
        return 0.5 * log_r**2
    if estimator not in ("k3", "k3+"):
        raise ValueError(f"kl estimator must be one of {KL_ESTIMATORS}, got {estimator!r}")
    clamped = log_r.clamp(max=LOG_RATIO_CLAMP)
    k3 = torch.exp(clamped) - 1 - clamped
    if estimator == "k3":
        return k3
    rho = torch.exp(logp - (logp.detach() if old_logp is None else old_logp))
    k2 = 0.5 * log_r**2  # d k2 / d logp = log(pi/ref): rho.detach() * it is d(rho * k3) / d logp
    return (rho * k3).detach() + rho.detach() * (k2 - k2.detach())


def aggregate(x: Tensor, mask: Tensor, agg: str = "token_mean", denom: float | None = None) -> Tensor:
    """Reduce a per-element loss ``x`` [B, T] under ``mask`` [B, T] to a scalar.

    token_mean: ``sum(x * mask) / denom``; denom = number of valid tokens in the *whole
        optimiser step* (all micro-batches, all processes). Default: ``mask.sum()``, right
        only when this call sees the whole step.
    seq_mean: mean over tokens inside each sequence, then ``sum over sequences / denom``;
        denom = number of sequences in the step (default: B).
    constant: ``sum(x * mask) / denom`` with a fixed denom such as B * max_len (Dr. GRPO);
        denom is required.
    """
    if x.shape != mask.shape:
        raise ValueError(f"x {tuple(x.shape)} and mask {tuple(mask.shape)} must have the same shape")
    mask = mask.to(x.dtype)
    if agg == "token_mean":
        return (x * mask).sum() / (mask.sum().clamp(min=1) if denom is None else denom)
    if agg == "seq_mean":
        per_seq = (x * mask).sum(-1) / mask.sum(-1).clamp(min=1)
        return per_seq.sum() / (x.shape[0] if denom is None else denom)
    if agg == "constant":
        if denom is None:
            raise ValueError("agg 'constant' needs an explicit denom")
        return (x * mask).sum() / denom
    raise ValueError(f"agg must be one of {AGG_MODES}, got {agg!r}")


def _masked_mean(x: Tensor, mask: Tensor) -> Tensor:
    return (x * mask).sum() / mask.sum().clamp(min=1)


@register_policy_loss("clip")
def clip_objective(logp: Tensor, old_logp: Tensor, adv: Tensor, mask: Tensor, *, clip_range: float = 0.2,
                   clip_range_high: float | None = None, penalty_coef: float = 0.0) -> tuple[Tensor, dict]:
    """PPO / GRPO's clipped surrogate; stats: the clipped share and approx KL(old || new) (k3,
    CleanRL's debug variable). Without ``old_logp``: one on-policy step, ratio 1."""
    old_logp = logp.detach() if old_logp is None else old_logp
    per_elem, clipped = clipped_surrogate(logp, old_logp, adv, clip_range, clip_range_high)
    n = mask.sum().clamp(min=1)
    return per_elem, {"clip_frac": ((clipped * mask).sum() / n).detach(),
                      "approx_kl": ((kl_estimate(old_logp, logp.detach(), "k3") * mask).sum() / n)}


@register_policy_loss("kl_penalty", "adaptive_kl")
def kl_penalty_objective(logp: Tensor, old_logp: Tensor, adv: Tensor, mask: Tensor, *, clip_range: float = 0.2,
                         clip_range_high: float | None = None, penalty_coef: float = 0.0
                         ) -> tuple[Tensor, dict]:
    """PPO's KL-penalised surrogate with beta = ``penalty_coef`` (adaptive_kl: the controller's
    current beta, which the trainer passes)."""
    if old_logp is None:
        raise ValueError("objective 'kl_penalty' needs old_logp")
    per_elem, kl_old = kl_penalty_surrogate(logp, old_logp, adv, penalty_coef)
    return per_elem, {"approx_kl": _masked_mean(kl_old.detach(), mask)}


@register_policy_loss("none")
def ratio_objective(logp: Tensor, old_logp: Tensor, adv: Tensor, mask: Tensor, *, clip_range: float = 0.2,
                    clip_range_high: float | None = None, penalty_coef: float = 0.0) -> tuple[Tensor, dict]:
    """The importance-sampled surrogate ``-rho * A``, no clip, no penalty (TRPO's)."""
    return kl_penalty_objective(logp, old_logp, adv, mask, penalty_coef=0.0)


@register_policy_loss("reinforce")
def reinforce_objective(logp: Tensor, old_logp: Tensor, adv: Tensor, mask: Tensor, *, clip_range: float = 0.2,
                        clip_range_high: float | None = None, penalty_coef: float = 0.0) -> tuple[Tensor, dict]:
    """Plain REINFORCE ``-A * log pi`` (no ratio: one on-policy step)."""
    return reinforce(logp, adv), {}


def policy_loss(
    logp: Tensor,
    adv: Tensor,
    mask: Tensor | None = None,
    *,
    old_logp: Tensor | None = None,
    ref_logp: Tensor | None = None,
    objective: str = "clip",
    clip_range: float = 0.2,
    clip_range_high: float | None = None,
    penalty_coef: float = 0.0,
    kl_coef: float = 0.0,
    kl_estimator: str = "k3+",
    agg: str = "token_mean",
    denom: float | None = None,
    kl_logged: str | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """The one policy loss of the library, for tokens and gym actions alike.

        loss = aggregate(objective(logp, old_logp, adv) + kl_coef * KL(pi || pi_ref), mask)

    logp, old_logp, ref_logp, mask: [B, T] (gym: [N, 1] or [N]); adv: same shape, or [B]
    (one advantage per sequence, broadcast over its tokens). ``objective`` names an entry of
    ``POLICY_OBJECTIVES`` (clip, kl_penalty, adaptive_kl, none, reinforce: the recipe's values);
    clip's ``old_logp`` defaults to ``logp.detach()`` (one on-policy step: ratio 1). ``clip_range`` /
    ``clip_range_high`` are clip's, ``penalty_coef`` the KL penalty's beta. ``kl_estimator`` is
    the KL-to-reference term's (k2, k3 or k3+ have a meaning in the loss, k1 does not: see
    ``kl_estimate``); k3+ weights by ``exp(logp - old_logp)``.

    ``stats["kl"]`` is the value of ``kl_logged`` (default: ``kl_estimator``), a claim about
    KL(pi || ref). Under truncated sampling (top_k / top_p / min_p) ``logp`` is the truncated,
    renormalised pi_t's and ``ref_logp`` the reference's full distribution's: E_pi_t[ref / pi_t] is
    then the reference's mass M on the kept tokens, not 1, so the values of k3 and k3+ estimate
    KL(pi_t || ref) - (1 - M), too low by the dropped mass, while k1's value stays unbiased for
    KL(pi_t || ref). The trainer logs k1 there (its gradient term keeps ``kl_estimator``).
    Returns ``(loss, stats)``; stats are detached scalars.
    """
    objective_fn = POLICY_OBJECTIVES.get(objective)
    logp, adv, mask = _batch_layout(logp, adv, mask)
    old = None if old_logp is None else old_logp.reshape(logp.shape)
    per_elem, stats = objective_fn(logp, old, adv, mask, clip_range=clip_range, clip_range_high=clip_range_high,
                                   penalty_coef=penalty_coef)
    stats["pg_loss"] = aggregate(per_elem.detach(), mask, agg, denom)
    if ref_logp is not None:
        ref = ref_logp.reshape(logp.shape)
        kl = kl_estimate(logp, ref, kl_estimator, old_logp=old)
        shown = kl if kl_logged in (None, kl_estimator) else kl_estimate(logp, ref, kl_logged, old_logp=old)
        stats["kl"] = aggregate(shown.detach(), mask, agg, denom)
        if kl_coef != 0.0:
            per_elem = per_elem + kl_coef * kl
    loss = aggregate(per_elem, mask, agg, denom)
    if not math.isfinite(loss.item()):
        stats["nonfinite"] = torch.tensor(1.0)
    return loss, stats


def _batch_layout(logp: Tensor, adv: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
    """``logp`` as [B, T] ([N] -> [N, 1]), ``mask`` like it (default ones), ``adv`` broadcast over
    each row's tokens when it holds one value per row."""
    if logp.dim() == 1:
        logp = logp[:, None]
    mask = torch.ones_like(logp) if mask is None else mask.reshape(logp.shape).to(logp.dtype)
    if adv.dim() == 1 and adv.shape[0] == logp.shape[0]:
        adv = adv[:, None].expand_as(logp)
    return logp, adv.reshape(logp.shape).to(logp.dtype), mask


def bradley_terry_loss(chosen: Tensor, rejected: Tensor) -> tuple[Tensor, dict]:
    """Reward-model loss on preference pairs (Bradley & Terry 1952; Ouyang et al. 2022):
    ``mean over pairs [B] of -log sigmoid(r_chosen - r_rejected)``; stats: pairwise accuracy
    (share of pairs with ``r_chosen > r_rejected``) and the mean margin."""
    margin = chosen - rejected
    loss = -torch.nn.functional.logsigmoid(margin).mean()
    return loss, {"accuracy": (margin > 0).float().mean().detach(), "margin": margin.mean().detach()}
