"""Resumable checkpoints: weights, optimiser, scheduler, RNG streams and loop counters.

    RUN_DIR/checkpoint/adapter/      LoRA adapter (PEFT format, safetensors)
    RUN_DIR/checkpoint/state.pt      optimiser + scheduler state, RNG states, counters

The directory is written beside the old one and renamed into place, so a run killed at
any instant (SIGKILL included) leaves either the previous checkpoint or the new one whole.
``state.pt`` holds only tensors and plain Python values and is read with
``torch.load(weights_only=True)``: loading it executes no code.
"""
from __future__ import annotations

import contextlib
import random
from pathlib import Path

import torch

from rlhf.errors import UserError

NAME = "checkpoint"


def save_checkpoint(run, write_weights, opt, sched, counters: dict, optimizer_state: dict | None = None,
                    fresh: bool = True) -> None:
    """``optimizer_state``: written instead of ``opt.state_dict()`` (a sharded optimiser's state
    gathered whole); ``fresh=False``: the temporary directory already holds files written by
    every rank (DeepSpeed's), kept in the checkpoint."""
    def writer(tmp: Path) -> None:
        tmp.mkdir(parents=True, exist_ok=not fresh)
        write_weights(tmp)
        torch.save({"optimizer": opt.state_dict() if optimizer_state is None else optimizer_state,
                    "scheduler": sched.state_dict(),
                    "torch_rng": torch.get_rng_state(), "python_rng": random.getstate(),
                    "counters": counters}, tmp / "state.pt")

    run.save_atomic(NAME, writer, fresh=fresh)


def load_checkpoint(run_dir) -> tuple[Path, dict]:
    """Return the checkpoint directory and its state (not yet applied)."""
    ckpt = Path(run_dir) / NAME
    if not (ckpt / "state.pt").is_file():
        raise UserError(f"{run_dir!r} has no checkpoint to resume from (no {NAME}/state.pt); "
                        "checkpoints are written every save_every steps")
    return ckpt, torch.load(ckpt / "state.pt", weights_only=True)


def restore(state: dict, opt, sched, load_optimizer=None) -> dict:
    """Apply optimiser, scheduler and RNG state; return the loop counters. ``load_optimizer``:
    how to apply the optimiser's state where ``opt.load_state_dict`` cannot (sharded)."""
    (load_optimizer or opt.load_state_dict)(state["optimizer"])
    sched.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["torch_rng"])
    random.setstate(_as_tuple(state["python_rng"]))
    return state["counters"]


def _as_tuple(x):
    return tuple(_as_tuple(v) for v in x) if isinstance(x, (list, tuple)) else x


class LMSaver:
    """When and how an LM run saves: the adapter for users (``adapter/``) and a resumable
    checkpoint (``checkpoint/``), written by the main process; sharded weights are gathered
    whole first (every rank takes part). ``policy`` holds the adapter, ``dist`` the processes."""

    def __init__(self, run, policy, opt, sched, dist):
        self.run, self.policy, self.opt, self.sched, self.dist = run, policy, opt, sched, dist

    def resume(self, ckpt: Path, state: dict) -> dict:
        """Apply a checkpoint's optimiser, scheduler and RNG state; return its loop counters.
        Steps logged after the checkpoint are dropped from the metrics: they are redone."""
        counters = restore(state, self.opt, self.sched, lambda sd: self.dist.load_optimizer_state(
            self.policy.train_net, self.opt, sd, ckpt))
        self.run.truncate_history(counters["step"])
        return counters

    def save(self, counters: dict) -> dict | None:
        """Write adapter and checkpoint; returns the gathered weights of a sharded policy."""
        run, policy, dist = self.run, self.policy, self.dist
        full = None if dist.replicated else policy.full_trainable(dist)
        opt_state = dist.optimizer_state(policy.train_net, self.opt)
        shards = dist.save_shards(run.tmp_path(NAME))  # DeepSpeed: each rank's partition, into the new checkpoint
        if dist.is_main:
            run.save_atomic("adapter", lambda d: policy.save_adapter(d, full))
            save_checkpoint(run, lambda d: policy.save_adapter(d / "adapter", full), self.opt, self.sched,
                            counters, optimizer_state=opt_state, fresh=not shards)
        dist.barrier()
        return full

    def after_step(self, counters: dict, save_every: int, max_nonfinite_steps: int) -> None:
        """Save every ``save_every`` steps; after ``max_nonfinite_steps`` non-finite losses in a
        row, save (the weights are the last good ones: bad steps are skipped) and stop."""
        step, bad = counters["step"], counters["bad_steps"]
        if bad >= max_nonfinite_steps:
            self.save(counters)
            raise UserError(f"the loss was not finite for {bad} steps in a row (up to step {step}); lower lr "
                            f"or max_grad_norm; the last good adapter is in {self.run.dir}/adapter")
        if save_every and step % save_every == 0:
            self.save(counters)

    @contextlib.contextmanager
    def adapter_kept_on_interrupt(self):
        """Ctrl-C mid-step: keep the adapter; the last checkpoint stays consistent. (Sharded
        weights would need every rank, which may be gone: those keep the last save.)"""
        try:
            yield
        except KeyboardInterrupt:
            if self.dist.is_main and self.dist.replicated:
                self.run.save_atomic("adapter", self.policy.save_adapter)
            raise
