"""Log-probabilities of chosen actions without keeping a full log-softmax around."""
from __future__ import annotations

import math
from typing import NamedTuple

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


def wide_dtype(device: torch.device | str) -> torch.dtype:
    """The dtype of sums that want more than float32 where it is free: float64 on the CPU,
    float32 on accelerators (Apple's MPS has no float64; GPUs run it at a fraction of float32's
    rate). No float64 tensor is ever made on an accelerator."""
    return torch.float64 if torch.device(device).type == "cpu" else torch.float32


def sample_categorical(probs: Tensor, generator: torch.Generator | None = None,
                       uniform: Tensor | None = None, block: int = 512) -> Tensor:
    """One draw per row from categorical ``probs`` [B, V] (rows need not be normalised).

    Inverse-CDF sampling in two levels: the cumulative sum over blocks of ``block`` entries
    finds the block, a cumulative sum inside that one block finds the entry. Same
    distribution as ``torch.multinomial(probs, 1)``, which draws an exponential variate for
    every entry of the vocabulary (~10x more work at V = 49k), and ~V/block times less
    cumulative-sum work than one cumsum over the whole vocabulary. ``uniform`` [B]
    in [0, 1) supplies the random numbers (so a row's draw does not depend on which other
    rows share its batch); by default they come from ``generator``.

    The sums are float64 on the CPU, float32 on accelerators (``wide_dtype``): there a
    boundary of the CDF is off by at most ~(V/block + block) * 2^-24 ~ 4e-5 of the row's
    mass, so each token's sampling probability is within that of its own (the log-prob the
    sampler records is computed from the logits, not from these sums). Either way an entry of
    probability 0 is never drawn: the search targets are clamped into (0, the block's sum].
    """
    b, v = probs.shape
    wide = wide_dtype(probs.device)
    if uniform is None:
        uniform = torch.rand(b, dtype=wide, generator=generator, device=probs.device)
    nb = -(-v // block)
    blocks = F.pad(probs, (0, nb * block - v)).view(b, nb, block)
    cdf = blocks.sum(-1, dtype=wide).cumsum(-1)                                # [B, nb]
    tiny = torch.finfo(wide).tiny  # (a float32 uniform can round to 1.0)
    target = ((1.0 - uniform.to(wide))[:, None] * cdf[:, -1:]).clamp(min=tiny)  # in (0, total]
    bi = torch.searchsorted(cdf, target).clamp(max=nb - 1)                     # the block, [B, 1]
    before = torch.where(bi > 0, cdf.gather(1, (bi - 1).clamp(min=0)), torch.zeros_like(target))
    inner = blocks.gather(1, bi[:, :, None].expand(b, 1, block)).squeeze(1).to(wide).cumsum(-1)
    # (the block's own sum can round below cdf's step to it: stay inside it)
    rest = torch.minimum((target - before).clamp(min=tiny), inner[:, -1:])
    j = torch.searchsorted(inner, rest).clamp(max=block - 1)                   # entry in the block
    return (bi * block + j).squeeze(-1).clamp(max=v - 1)


class _LinearLogProbs(torch.autograd.Function):
    """``log_softmax(hidden @ weight.T / temperature)[i, ids[i]]`` over the vocabulary in
    blocks of ``chunk`` entries (an online log-sum-exp); the [M, V] logits are never kept:
    backward recomputes each block's logits.

    The chosen logit is read from the same block of logits the log-sum-exp sums (one GEMM,
    one rounding): under a bf16 head a separate fp32 dot product differs from the bf16-rounded
    logit by up to half a bf16 ulp (0.125 at a logit of 40), which made log p > 0 on confident
    tokens and a still policy read as a moving one. From one computation, ``lse >= top >=
    picked`` holds in floating point too (the top entry adds exp(0) = 1 to the sum), so
    log p <= 0 always."""

    @staticmethod
    def forward(ctx, hidden, weight, ids, temperature, chunk, with_entropy):
        m_rows, v = hidden.shape[0], weight.shape[0]
        top = torch.full((m_rows,), float("-inf"), device=hidden.device)
        total = torch.zeros(m_rows, device=hidden.device)      # sum exp(logit - top)
        weighted = torch.zeros(m_rows, device=hidden.device)   # sum exp(logit - top) * logit
        picked = torch.zeros(m_rows, device=hidden.device)     # logit of ids, from its block
        for s in range(0, v, chunk):
            logits = (hidden @ weight[s:s + chunk].t()).float()
            if temperature != 1.0:
                logits.div_(temperature)
            here = (ids >= s) & (ids < s + logits.shape[1])
            local = (ids - s).clamp(0, logits.shape[1] - 1)[:, None]
            picked = torch.where(here, logits.gather(1, local).squeeze(1), picked)
            new_top = torch.maximum(top, logits.amax(-1))
            rescale = torch.exp(top - new_top)
            e = torch.exp(logits - new_top[:, None])
            total = total * rescale + e.sum(-1)
            if with_entropy:
                weighted = weighted * rescale + (e * logits).sum(-1)
            top = new_top
        lse = top + total.log()
        ctx.save_for_backward(hidden, weight, ids, lse)
        ctx.temperature, ctx.chunk = temperature, chunk
        if not with_entropy:
            return picked - lse, None
        entropy = lse - weighted / total  # H = lse - E_p[logit]
        ctx.mark_non_differentiable(entropy)
        return picked - lse, entropy

    @staticmethod
    def backward(ctx, grad_logp, _grad_entropy=None):
        hidden, weight, ids, lse = ctx.saved_tensors
        t, chunk = ctx.temperature, ctx.chunk
        g = grad_logp.float() / t
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_h = (g[:, None] * weight[ids].float()) if need_h else None   # from the picked logit
        grad_w = torch.zeros_like(weight, dtype=torch.float32) if need_w else None
        for s in range(0, weight.shape[0], chunk):
            w = weight[s:s + chunk]
            logits = (hidden @ w.t()).float()
            if t != 1.0:
                logits.div_(t)
            # d logp / d logits = onehot - softmax; the onehot part is added outside the loop
            grad_logits = torch.exp_(logits.sub_(lse[:, None])).mul_(-g[:, None])
            if need_h:
                grad_h += _matmul_in(grad_logits, w)
            if need_w:
                grad_w[s:s + chunk] += grad_logits.t() @ hidden.float()
        if need_w:
            grad_w.index_add_(0, ids, g[:, None] * hidden.float())
        return (None if grad_h is None else grad_h.to(hidden.dtype),
                None if grad_w is None else grad_w.to(weight.dtype), None, None, None, None)


def _matmul_in(grad: Tensor, weight: Tensor) -> Tensor:
    """``grad @ weight`` as fp32, multiplied in the weight's precision: a bf16 head's backward
    runs a bf16 GEMM (rounding the fp32 gradient to bf16, relative error 2^-9) rather than an
    fp32 copy of the weight block and an fp32 GEMM."""
    if weight.dtype == torch.float32:
        return grad @ weight
    return (grad.to(weight.dtype) @ weight).float()


def linear_logprobs(hidden: Tensor, weight: Tensor, ids: Tensor, temperature: float = 1.0,
                    chunk: int = 4096, entropy: bool = False) -> tuple[Tensor, Tensor | None]:
    """Log-probs of ``ids`` [M] under ``softmax(hidden [M, d] @ weight[V, d].T / temperature)``,
    and optionally the entropy of each row's distribution (detached).

    An LM head and a selective log-softmax in one step, over the vocabulary in blocks of
    ``chunk`` entries with an online log-sum-exp: peak memory is one [M, chunk] block instead
    of the [M, V] logits and their gradient (hundreds of MB at a 49k vocabulary, whose fresh
    allocation and first touch cost more than the arithmetic on a CPU), and each block of
    the weight is read once per pass. Backward recomputes each block's logits (one extra GEMM).
    """
    return _LinearLogProbs.apply(hidden, weight, ids, float(temperature), int(chunk), bool(entropy))


class Truncation(NamedTuple):
    """Which tokens the sampler may draw: the ``top_k`` most likely (0: all), then of those the
    fewest most likely whose probability, renormalised over them, sums to >= ``top_p``, then
    those at least ``min_p`` times as likely as the most likely one. The kept tokens are
    renormalised; log-probs for the ratio and KL use the same distribution."""

    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0

    @property
    def active(self) -> bool:
        return self.top_k > 0 or self.top_p < 1.0 or self.min_p > 0.0


def truncation_mask(logits: Tensor, trunc: Truncation) -> Tensor:
    """Boolean [B, V]: the tokens ``trunc`` keeps from ``logits`` [B, V] (at the sampling
    temperature already). Every filter keeps a top set, so the kept tokens are those with a
    logit >= the smallest kept one; tokens tied with it are all kept (sampler and trainer
    thus agree without a tie-break order)."""
    x = logits.float()
    v = x.shape[-1]
    if trunc.top_k > 0 or trunc.top_p < 1.0:
        k = min(trunc.top_k, v) if trunc.top_k > 0 else v
        s = torch.topk(x, k, dim=-1).values if k < v else torch.sort(x, dim=-1, descending=True).values
        n_keep = torch.full(x.shape[:-1], k, device=x.device)
        if trunc.top_p < 1.0:
            p = torch.softmax(s, dim=-1)                     # renormalised over the top k
            before = torch.cumsum(p, dim=-1) - p             # probability of the more likely tokens
            n_keep = (before < trunc.top_p).sum(-1)          # >= 1: the first token's is 0
        floor = s.gather(-1, (n_keep - 1).clamp(min=0)[..., None])
    else:
        floor = torch.full((*x.shape[:-1], 1), float("-inf"), device=x.device)
    if trunc.min_p > 0.0:  # p_i >= min_p * p_max  <=>  x_i >= x_max + log(min_p)
        floor = torch.maximum(floor, x.amax(-1, keepdim=True) + math.log(trunc.min_p))
    return x >= floor


class _TruncatedLinearLogProbs(torch.autograd.Function):
    """``linear_logprobs`` under a truncated distribution, in blocks of rows: each block's full
    logits [b, V] are computed, masked by ``truncation_mask`` (the chosen token always kept,
    so a token the sampler drew is never -inf here), and log-softmaxed over the kept tokens.
    Backward recomputes each block's logits with the same product and so the same mask."""

    @staticmethod
    def forward(ctx, hidden, weight, ids, temperature, trunc, rows, with_entropy):
        logp, ent = [], []
        for s in range(0, hidden.shape[0], rows):
            x, keep = _masked_block(hidden[s:s + rows], weight, ids[s:s + rows], temperature, trunc)
            lse = torch.logsumexp(x, -1)
            logp.append(x.gather(-1, ids[s:s + rows, None]).squeeze(-1) - lse)
            if with_entropy:  # H = -sum p log p over the kept tokens
                p = torch.exp(x - lse[:, None])
                ent.append(-(p * torch.where(keep, x - lse[:, None], 0.0)).sum(-1))
        ctx.save_for_backward(hidden, weight, ids)
        ctx.temperature, ctx.trunc, ctx.rows = temperature, trunc, rows
        logp = torch.cat(logp) if logp else hidden.new_zeros(0, dtype=torch.float32)
        if not with_entropy:
            return logp, None
        entropy = torch.cat(ent) if ent else logp.new_zeros(0)
        ctx.mark_non_differentiable(entropy)
        return logp, entropy

    @staticmethod
    def backward(ctx, grad_logp, _grad_entropy=None):
        hidden, weight, ids = ctx.saved_tensors
        t, rows = ctx.temperature, ctx.rows
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_h = torch.zeros_like(hidden, dtype=torch.float32) if need_h else None
        grad_w = torch.zeros_like(weight, dtype=torch.float32) if need_w else None
        for s in range(0, hidden.shape[0], rows):
            h, i, g = hidden[s:s + rows], ids[s:s + rows], grad_logp[s:s + rows].float()
            x, _ = _masked_block(h, weight, i, t, ctx.trunc)
            # d logp / d logits = (onehot - softmax over the kept tokens) / temperature
            grad_x = -torch.softmax(x, -1) * g[:, None]
            grad_x[torch.arange(len(i)), i] += g
            grad_x /= t
            if need_h:
                grad_h[s:s + rows] = _matmul_in(grad_x, weight)
            if need_w:
                grad_w += grad_x.t() @ h.float()
        return (None if grad_h is None else grad_h.to(hidden.dtype),
                None if grad_w is None else grad_w.to(weight.dtype), None, None, None, None, None)


def _masked_block(hidden: Tensor, weight: Tensor, ids: Tensor, temperature: float,
                  trunc: Truncation) -> tuple[Tensor, Tensor]:
    """Logits [b, V] at ``temperature`` with the tokens ``trunc`` drops set to -inf, and the
    kept mask (the chosen ``ids`` always kept)."""
    x = (hidden @ weight.t()).float() / temperature
    keep = truncation_mask(x, trunc)
    keep[torch.arange(len(ids)), ids] = True
    return x.masked_fill(~keep, float("-inf")), keep


def truncated_linear_logprobs(hidden: Tensor, weight: Tensor, ids: Tensor, temperature: float,
                              trunc: Truncation, entropy: bool = False, block_elems: int = 1 << 22
                              ) -> tuple[Tensor, Tensor | None]:
    """Log-probs of ``ids`` [M] under ``softmax(hidden @ weight.T / temperature)`` truncated by
    ``trunc`` and renormalised over the kept tokens (and the entropy of that distribution).
    Peak memory: blocks of about ``block_elems`` logits."""
    rows = max(1, block_elems // weight.shape[0])
    return _TruncatedLinearLogProbs.apply(hidden, weight, ids, float(temperature), trunc, rows, bool(entropy))
