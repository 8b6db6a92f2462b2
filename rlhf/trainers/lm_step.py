"""One optimiser step of the LM trainer, over micro-batches: gradients accumulated, then one step.

``micro_batch_size`` rows run forward and backward at a time, so the update's peak memory
(activations and their autograd graph) scales with it, not with the minibatch. The gradient
is the unsplit step's: every micro-batch's loss is normalised by the *whole* minibatch's
normaliser over all processes (``token_mean``: its tokens; ``seq_mean``: its sequences;
``constant``: its rows x max_new_tokens), computed before the first micro-batch runs, so the
micro-batches' losses sum to the minibatch's loss and their gradients to its gradient. Under
DDP / FSDP2 the gradients are reduced over ranks once, in the last micro-batch's backward.

TRL's ``per_device_train_batch_size`` is ``micro_batch_size`` here (rows per forward/backward
on one process) and its ``gradient_accumulation_steps`` is the number of micro-batches of an
optimiser step: ``prompts_per_step x group_size / (processes x minibatches x micro_batch_size)``.
"""
from __future__ import annotations

import contextlib
import math

import torch

from rlhf.lm.rollout_record import Rollout


def micro_batches(n_rows: int, size: int) -> list[torch.Tensor]:
    """Row indices of each micro-batch of an ``n_rows`` minibatch, in order (``size`` 0: one)."""
    size = n_rows if size <= 0 else size
    return [torch.arange(s, min(s + size, n_rows)) for s in range(0, n_rows, size)]


def accumulate(policy, batch: Rollout, size: int, loss_of, dist, *, values: bool = False,
               entropy: bool = False) -> tuple[dict[str, float], bool]:
    """Forward and backward of ``batch`` (one optimiser step's rows on this rank) in micro-batches
    of ``size`` rows, gradients accumulated in the parameters' ``.grad`` (zero them first).

    ``loss_of(out, rows)`` -> ``(loss, stats)``: the micro-batch's share of the minibatch's loss
    (normalised by the whole minibatch over all processes) from the policy's outputs ``out`` on
    ``rows`` (indices into ``batch``), and stats that *sum* over micro-batches to the minibatch's
    (a per-token mean comes weighted by the micro-batch's share of the tokens).

    Returns the summed stats (``loss`` included, this rank's share) and whether a non-finite
    loss on any rank stopped the accumulation (the step is then skipped on every rank).
    ``policy.scaler`` (float16): each backward is of the scaled loss. The loss is multiplied by
    the number of processes: DDP, FSDP and ZeRO average gradients over ranks."""
    sums: dict[str, float] = {}
    chunks = micro_batches(len(batch), size)
    modules = [m for m in (policy.train_net, policy.train_critic) if m is not None]
    for i, rows in enumerate(chunks):
        last = i == len(chunks) - 1  # its backward reduces the gradients over ranks
        with contextlib.nullcontext() if last else dist.no_sync(modules):
            with dist.autocast():
                out = policy.forward(batch.select_rows(rows), values=values, entropy=entropy)
            loss, stats = loss_of(out, rows)
            if dist.max(float("nonfinite" in stats or not math.isfinite(float(loss.detach())))):
                return sums, True
            scaled = loss * dist.world
            dist.backward(scaled if policy.scaler is None else policy.scaler.scale(scaled))
        for key, v in {**stats, "loss": loss.detach()}.items():
            sums[key] = sums.get(key, 0.0) + float(v)
    return sums, False


def optimiser_step(policy, opt, sched, stats: dict, max_grad_norm: float, dist, bad: bool) -> tuple[float, bool]:
    """The step after ``accumulate``: clip and step, or skip it where a loss (``bad``) or the
    gradient is non-finite (the weights are kept). Returns the gradient norm and whether the
    step was skipped as non-finite.

    ``dtype: float16`` (``policy.scaler``, a ``torch.amp.GradScaler``): the gradients are divided
    by the scale before clipping. Gradients that overflow at the current scale skip the step
    and halve the scale (the scaler's own job: not counted as a non-finite step); the scale
    grows again after 2000 clean steps. Logged: ``amp/loss_scale``, ``amp/overflow``.
    (DeepSpeed's engine steps inside backward and clips at max_grad_norm itself.)"""
    scaler = policy.scaler
    grad_norm = float("nan")
    if not bad:
        if scaler is not None:
            scaler.unscale_(opt)
        grad_norm = dist.clip_grad_norm(policy.trainable_parameters(), max_grad_norm)
    if scaler is not None and not bad:
        stats["amp/loss_scale"] = scaler.get_scale()  # the scale this step's backward used
        stats["amp/overflow"] = float(not math.isfinite(grad_norm))
        scaler.step(opt)  # skips opt.step() when unscale_ found an inf or NaN gradient
        scaler.update()
        if math.isfinite(grad_norm):
            sched.step()
        return grad_norm, False
    if math.isfinite(grad_norm):
        opt.step()
        sched.step()
    else:
        opt.zero_grad(set_to_none=True)
    return grad_norm, not math.isfinite(grad_norm)
