"""Natural-gradient helpers for TRPO (Schulman et al. 2015): conjugate gradient on a
Fisher-vector product and a backtracking line search under a KL constraint. Pure: they only
call the functions they are given."""
from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

__all__ = ["conjugate_gradient", "backtracking_line_search", "max_step_scale"]


def conjugate_gradient(avp: Callable[[Tensor], Tensor], b: Tensor, iters: int = 10,
                       residual_tol: float = 1e-10) -> Tensor:
    """Approximately solve ``A x = b`` for symmetric positive-definite A given only ``avp(v) = A v``.

    Standard CG from x0 = 0: r = p = b; alpha = r.r / p.Ap; x += alpha p; r -= alpha Ap;
    p = r + (r_new.r_new / r.r) p. Exact in at most dim(b) iterations.
    """
    x = torch.zeros_like(b)
    r, p = b.clone(), b.clone()
    rr = r @ r
    for _ in range(iters):
        if rr < residual_tol:
            break
        ap = avp(p)
        alpha = rr / (p @ ap)
        x += alpha * p
        r -= alpha * ap
        rr_new = r @ r
        p = r + (rr_new / rr) * p
        rr = rr_new
    return x


def max_step_scale(step_dir: Tensor, avp_step: Tensor, target_kl: float) -> Tensor:
    """Scale ``beta`` so the quadratic KL model ``0.5 * beta^2 * s^T A s`` equals ``target_kl``:
    ``beta = sqrt(2 * target_kl / s^T A s)``."""
    return torch.sqrt(2 * target_kl / (step_dir @ avp_step).clamp(min=1e-12))


def backtracking_line_search(
    evaluate: Callable[[Tensor], tuple[float, float]], full_step: Tensor, expected_improve: float,
    target_kl: float, line_search_steps: int = 10, shrink: float = 0.5, accept_ratio: float = 0.1,
) -> tuple[Tensor | None, int]:
    """Try ``full_step * shrink^k`` for k = 0..line_search_steps-1; ``evaluate(step) -> (improvement, kl)``
    where improvement is the decrease of the surrogate loss. Accept the first step with
    ``kl <= target_kl`` and ``improvement >= accept_ratio * expected_improve * shrink^k`` (and > 0).
    Returns ``(step, k)``, or ``(None, line_search_steps)`` when no step qualifies (then do not move)."""
    frac = 1.0
    for k in range(line_search_steps):
        step = full_step * frac
        improve, kl = evaluate(step)
        if kl <= target_kl and improve > 0 and improve >= accept_ratio * expected_improve * frac:
            return step, k
        frac *= shrink
    return None, line_search_steps
