"""Log-probabilities of chosen actions without keeping a full log-softmax around."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def selective_log_softmax(logits: Tensor, index: Tensor) -> Tensor:
    """``log_softmax(logits)[..., index]`` for logits [..., V] and index [...].

    Computes ``logit[index] - logsumexp(logits)`` row by row, so peak memory stays at one
    [..., V] logits tensor instead of logits plus a same-sized log-softmax.
    """
    logits = logits.float()
    picked = torch.gather(logits, -1, index.unsqueeze(-1)).squeeze(-1)
    return picked - torch.logsumexp(logits, dim=-1)


def sample_categorical(probs: Tensor, generator: torch.Generator | None = None,
                       uniform: Tensor | None = None, block: int = 512) -> Tensor:
    """One draw per row from categorical ``probs`` [B, V] (rows need not be normalised).

    Inverse-CDF sampling in two levels: the cumulative sum over blocks of ``block`` entries
    (float64) finds the block, a cumulative sum inside that one block finds the entry. Same
    distribution as ``torch.multinomial(probs, 1)``, which draws an exponential variate for
    every entry of the vocabulary (~10x more work at V = 49k), and ~V/block times less
    cumulative-sum work than one float64 cumsum over the whole vocabulary. ``uniform`` [B]
    in [0, 1) supplies the random numbers (so a row's draw does not depend on which other
    rows share its batch); by default they come from ``generator``.
    """
    b, v = probs.shape
    if uniform is None:
        uniform = torch.rand(b, dtype=torch.float64, generator=generator, device=probs.device)
    nb = -(-v // block)
    blocks = F.pad(probs, (0, nb * block - v)).view(b, nb, block)
    cdf = blocks.sum(-1, dtype=torch.float64).cumsum(-1)                       # [B, nb]
    target = (1.0 - uniform.to(torch.float64))[:, None] * cdf[:, -1:]          # in (0, total]
    bi = torch.searchsorted(cdf, target).clamp(max=nb - 1)                     # the block, [B, 1]
    before = torch.where(bi > 0, cdf.gather(1, (bi - 1).clamp(min=0)), torch.zeros_like(target))
    inner = blocks.gather(1, bi[:, :, None].expand(b, 1, block)).squeeze(1).double().cumsum(-1)
    j = torch.searchsorted(inner, target - before).clamp(max=block - 1)        # entry in the block
    return (bi * block + j).squeeze(-1).clamp(max=v - 1)


class _LinearLogProbs(torch.autograd.Function):
    """``log_softmax(hidden @ weight.T / temperature)[i, ids[i]]`` computed ``chunk`` rows at a
    time; the [M, V] logits are never kept: backward recomputes each chunk's logits."""

    @staticmethod
    def forward(ctx, hidden, weight, ids, temperature, chunk, with_entropy):
        logp = hidden.new_empty(hidden.shape[0], dtype=torch.float32)
        lse = torch.empty_like(logp)
        entropy = torch.empty_like(logp) if with_entropy else None
        for s in range(0, hidden.shape[0], chunk):
            logits = (hidden[s:s + chunk] @ weight.t()).float()
            if temperature != 1.0:
                logits.div_(temperature)
            lse[s:s + chunk] = torch.logsumexp(logits, -1)
            logp[s:s + chunk] = logits.gather(-1, ids[s:s + chunk, None]).squeeze(-1) - lse[s:s + chunk]
            if with_entropy:  # H = lse - sum p * logits
                p = torch.softmax(logits, -1)
                entropy[s:s + chunk] = lse[s:s + chunk] - (p * logits).sum(-1)
        ctx.save_for_backward(hidden, weight, ids, lse)
        ctx.temperature, ctx.chunk = temperature, chunk
        ctx.mark_non_differentiable(*([entropy] if with_entropy else []))
        return (logp, entropy) if with_entropy else (logp, None)

    @staticmethod
    def backward(ctx, grad_logp, _grad_entropy=None):
        hidden, weight, ids, lse = ctx.saved_tensors
        t, chunk = ctx.temperature, ctx.chunk
        grad_h = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        grad_w = torch.zeros_like(weight, dtype=torch.float32) if ctx.needs_input_grad[1] else None
        for s in range(0, hidden.shape[0], chunk):
            h = hidden[s:s + chunk]
            logits = (h @ weight.t()).float()
            if t != 1.0:
                logits.div_(t)
            g = grad_logp[s:s + chunk]
            # d logp_i / d logits = onehot(ids_i) - softmax_i; times the incoming gradient, / t
            grad_logits = torch.exp_(logits.sub_(lse[s:s + chunk, None])).mul_(-g[:, None])
            grad_logits.scatter_add_(-1, ids[s:s + chunk, None], g[:, None])
            if t != 1.0:
                grad_logits.div_(t)
            grad_logits = grad_logits.to(hidden.dtype)
            if grad_h is not None:
                grad_h[s:s + chunk] = grad_logits @ weight
            if grad_w is not None:
                grad_w += grad_logits.t().float() @ h.float()
        return grad_h, None if grad_w is None else grad_w.to(weight.dtype), None, None, None, None


def linear_logprobs(hidden: Tensor, weight: Tensor, ids: Tensor, temperature: float = 1.0,
                    chunk: int = 64, entropy: bool = False) -> tuple[Tensor, Tensor | None]:
    """Log-probs of ``ids`` [M] under ``softmax(hidden [M, d] @ weight[V, d].T / temperature)``,
    and optionally the entropy of each row's distribution (detached).

    An LM head and a selective log-softmax in one step, ``chunk`` rows at a time: peak memory
    is one [chunk, V] block instead of the [M, V] logits and their gradient (hundreds of MB at
    a 49k vocabulary, whose fresh allocation and first touch cost more than the arithmetic on
    a CPU). The backward pass recomputes each block's logits (one extra GEMM).
    """
    return _LinearLogProbs.apply(hidden, weight, ids, float(temperature), int(chunk), bool(entropy))
