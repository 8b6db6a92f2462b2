"""Resumable checkpoints: weights, optimiser, scheduler, RNG streams and loop counters.

    RUN_DIR/checkpoint/adapter/      LoRA adapter (PEFT format, safetensors)
    RUN_DIR/checkpoint/state.pt      optimiser + scheduler state, RNG states, counters

The directory is written beside the old one and renamed into place, so a run killed at
any instant (SIGKILL included) leaves either the previous checkpoint or the new one whole.
``state.pt`` holds only tensors and plain Python values and is read with
``torch.load(weights_only=True)``: loading it executes no code.
"""
from __future__ import annotations

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
