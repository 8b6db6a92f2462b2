"""Resumable checkpoints, for every kind of run: a directory of files published crash-safely.

    RUN_DIR/checkpoint -> checkpoint-000012/   the newest complete checkpoint (a symlink)
    RUN_DIR/checkpoint-000012/state.pt         optimiser, scheduler, RNG streams, loop counters
                                               (and dtype float16's loss scale)
    RUN_DIR/checkpoint-000012/adapter/         LM runs: the LoRA adapter (PEFT, safetensors)
    RUN_DIR/adapter -> checkpoint-000012/adapter

A run killed at any instant -- SIGKILL or power cut, in the middle of a save included --
keeps its newest complete checkpoint (``rlhf.storage`` says how); a disk that fills up or
turns read-only during a save stops the run with one sentence and the previous checkpoint
intact. ``keep_checkpoints`` (default 2) complete checkpoints are kept: a resume that finds the
newest unreadable (a truncated ``state.pt``, a garbled ``.safetensors``) names it in one
sentence, moves it aside to ``corrupt-checkpoint-N`` and continues from the previous one.
Run directories written before versioned checkpoints (a real ``checkpoint/``
directory) are read as they are and converted by their next save.

Any trainer uses the same three calls::

    publish(run, step, writer, follow={"policy": "policy"})   # writer(dir) writes the files
    directory = latest(run.dir, follow=...)                   # on --resume; None: none saved
    state = read_state(directory)                             # what write_state(dir, ...) wrote

``state.pt`` holds only tensors and plain Python values and is read with
``torch.load(weights_only=True)``: loading it executes no code.
"""
from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import random
from pathlib import Path

import torch

from rlhf.errors import UserError
from rlhf.storage import Slot, point

log = logging.getLogger("rlhf")

NAME = "checkpoint"
STATE_FILE = "state.pt"
LM_FOLLOW = {"adapter": "adapter"}  # RUN_DIR/adapter: the newest checkpoint's adapter


def slot(run_dir, follow: dict[str, str] | None = None) -> Slot:
    return Slot(run_dir, NAME, follow)


def tmp_dir(run_dir, step: int) -> Path:
    """Where checkpoint ``step`` is built, the same path in every process (sharded saves write
    their parts there before the main process calls ``publish(..., fresh=False)``)."""
    return slot(run_dir).tmp_path(step)


def publish(run, step: int, writer, follow: dict[str, str] | None = None, fresh: bool = True) -> Path:
    """Main process: the checkpoint of ``step``, written by ``writer(dir)`` into a new directory,
    published as ``RUN_DIR/checkpoint`` (``follow``: links re-pointed into it, e.g.
    ``{"adapter": "adapter"}``). Raises UserError if the file system refuses (disk full,
    read-only); the previous checkpoint is then intact."""
    from rlhf.run import publish as run_publish

    s = slot(run.dir, follow)
    run_publish(run, s, step, writer, what=f"the checkpoint of step {step}",
                kept="the previous checkpoint is intact", fresh=fresh, keep=getattr(run, "keep_checkpoints", 2))
    return s.link


def recover(run_dir, follow: dict[str, str] | None = None) -> Path | None:
    """The newest complete checkpoint after recovering from a crash (``Slot.recover``: a
    leftover temporary or old directory is removed or restored, with a logged line), unread.
    Call it with the run's lock held. None when no checkpoint was saved."""
    return slot(run_dir, follow).recover(keep=kept_count(run_dir))


def kept_count(run_dir) -> int | None:
    """The run's ``keep_checkpoints`` as its ``recipe.yaml`` says (None: every older checkpoint)."""
    import yaml

    try:
        value = (yaml.safe_load((Path(run_dir) / "recipe.yaml").read_text()) or {}).get("keep_checkpoints", 2)
    except (OSError, yaml.YAMLError, AttributeError):
        return None
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 1 else None


def latest(run_dir, follow: dict[str, str] | None = None) -> Path | None:
    """The newest readable checkpoint after recovering from a crash (``recover``). One that
    cannot be read (a truncated ``state.pt``, a garbled ``.safetensors``: ``unreadable``) is
    named in one sentence and moved aside to ``corrupt-checkpoint-N``, and the slot falls back
    to the previous complete one (``keep_checkpoints`` keeps it). Call it with the run's lock
    held (a ``Run`` holds it). None when no checkpoint was saved."""
    s = slot(run_dir, follow)
    current = recover(run_dir, follow)
    if current is None:
        return None
    newest = current.resolve().name if current.is_symlink() else None
    older = [v for v in reversed(s.versions()) if v != newest]
    candidates = [current] + [s.dir / v for v in older] if newest in s.versions() else [current]
    for i, d in enumerate(candidates):
        problem = unreadable(d, s.follow.values())
        if problem is None:
            break
        label = d.name if d is not current else (newest or NAME)
        nxt = candidates[i + 1].name if i + 1 < len(candidates) else None
        if nxt is None:
            raise UserError(f"{label} in {str(run_dir)!r} cannot be read ({problem}) and no older "
                            f"complete checkpoint is left to resume from; start the run again, or restore {label}")
        log.warning("%s in %s cannot be read (%s); resuming from %s, the previous complete checkpoint (the "
                    "unreadable one is moved aside to corrupt-%s)", label, run_dir, problem, nxt, label)
    if d is current:
        return current
    for bad in candidates[:i]:
        name = bad.resolve().name
        os.rename(s.dir / name, _free(s.dir, f"corrupt-{name}"))
    point(s.link, d.name)
    for link, inner in s.follow.items():
        if (d / inner).exists():
            point(s.dir / link, f"{d.name}/{inner}")
    return s.current()


def unreadable(directory: Path, inner=()) -> str | None:
    """Why checkpoint ``directory`` cannot be resumed from (``state.pt`` or a directory of ``inner``
    missing, ``state.pt`` not loadable with ``weights_only=True``, a ``.safetensors`` or ``.json``
    file that does not load), or None."""
    directory = Path(directory)
    state = directory / STATE_FILE
    for name in (STATE_FILE, *inner):
        if not os.path.exists(directory / name):
            return f"no {name}"
    checks = [(state, lambda p: torch.load(p, weights_only=True))]
    checks += [(p, _load_safetensors) for p in sorted(directory.rglob("*.safetensors"))]
    checks += [(p, lambda p: json.loads(p.read_text())) for p in sorted(directory.rglob("*.json"))]
    for path, load in checks:
        try:
            load(path)
        except Exception as exc:  # (whatever the library raises on a torn or garbled file)
            why = (str(exc).splitlines() or [""])[0][:120]
            return f"{path.relative_to(directory)}: {type(exc).__name__}{': ' + why if why else ''}"
    return None


def _load_safetensors(path: Path) -> None:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        for key in f.keys():
            f.get_tensor(key)


def _free(parent: Path, name: str) -> Path:
    path, n = parent / name, 0
    while os.path.lexists(path):
        n += 1
        path = parent / f"{name}.{n}"
    return path


def write_state(directory: Path, state: dict) -> None:
    """``directory/state.pt``: tensors and plain values (``read_state`` loads no code)."""
    buf = io.BytesIO()
    torch.save(state, buf)
    with open(Path(directory) / STATE_FILE, "wb") as f:  # fsynced by the publication
        f.write(buf.getvalue())


def read_state(directory: Path) -> dict:
    return torch.load(Path(directory) / STATE_FILE, weights_only=True)


def rng_state() -> dict:
    """The global random streams (torch, Python; numpy's where numpy is loaded)."""
    import sys

    out = {"torch_rng": torch.get_rng_state(), "python_rng": random.getstate()}
    if "numpy" in sys.modules:
        kind, keys, pos, has_gauss, gauss = sys.modules["numpy"].random.get_state()
        out["numpy_rng"] = {"kind": kind, "keys": torch.from_numpy(keys.astype("int64")), "pos": int(pos),
                            "has_gauss": int(has_gauss), "gauss": float(gauss)}
    return out


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch_rng"])
    random.setstate(_as_tuple(state["python_rng"]))
    if "numpy_rng" in state:
        import numpy as np

        s = state["numpy_rng"]
        np.random.set_state((s["kind"], s["keys"].numpy().astype(np.uint32), s["pos"], s["has_gauss"], s["gauss"]))


# ---------------------------------------------------------------------- LM policy-gradient runs
def save_checkpoint(run, step: int, write_weights, opt, sched, counters: dict,
                    optimizer_state: dict | None = None, fresh: bool = True, extra: dict | None = None) -> Path:
    """``optimizer_state``: written instead of ``opt.state_dict()`` (a sharded optimiser's state
    gathered whole); ``fresh=False``: the temporary directory (``tmp_dir``) already holds files
    written by every rank (DeepSpeed's), kept in the checkpoint; ``extra``: more state to keep
    (``dtype: float16``'s loss scaler)."""
    def writer(tmp: Path) -> None:
        write_weights(tmp)
        write_state(tmp, {"optimizer": opt.state_dict() if optimizer_state is None else optimizer_state,
                          "scheduler": sched.state_dict(), **rng_state(), "counters": counters,
                          **(extra or {})})

    return publish(run, step, writer, follow=LM_FOLLOW, fresh=fresh)


def load_checkpoint(run_dir, recover: bool = True) -> tuple[Path, dict]:
    """Return the checkpoint directory and its state (not yet applied). ``recover=False``: read
    only (the other processes of a run, after the main one recovered)."""
    ckpt = latest(run_dir, LM_FOLLOW) if recover else slot(run_dir).current()
    if ckpt is None or not (ckpt / STATE_FILE).is_file():
        raise UserError(f"{str(run_dir)!r} has no checkpoint to resume from (no {NAME}/{STATE_FILE}); "
                        "checkpoints are written every save_every steps")
    return ckpt, read_state(ckpt)


def restore(state: dict, opt, sched, load_optimizer=None) -> dict:
    """Apply optimiser, scheduler and RNG state; return the loop counters. ``load_optimizer``:
    how to apply the optimiser's state where ``opt.load_state_dict`` cannot (sharded)."""
    (load_optimizer or opt.load_state_dict)(state["optimizer"])
    sched.load_state_dict(state["scheduler"])
    set_rng_state(state)
    return state["counters"]


def _as_tuple(x):
    return tuple(_as_tuple(v) for v in x) if isinstance(x, (list, tuple)) else x


def load_lm_checkpoint(run_dir, dist) -> tuple[Path, dict]:
    """``--resume`` of an LM run: the main process recovers what a crash left behind (once,
    under the run's lock), then every process reads the newest complete checkpoint."""
    if dist.is_main:
        latest(run_dir, LM_FOLLOW)  # (falls back past an unreadable checkpoint, for every process)
    dist.barrier()
    return load_checkpoint(run_dir, recover=False)


class LMSaver:
    """When and how an LM run saves: a resumable checkpoint (``checkpoint/``, its adapter
    linked as ``adapter/`` for users), written by the main process; sharded weights are
    gathered whole first (every rank takes part). ``policy`` holds the adapter, ``dist`` the
    processes. A save the file system refuses stops every rank with the main process's sentence."""

    def __init__(self, run, policy, opt, sched, dist, write_adapter=None):
        self.run, self.policy, self.opt, self.sched, self.dist = run, policy, opt, sched, dist
        # write_adapter(dir, full): the adapter users load (default: the policy's own save)
        self.write_adapter = write_adapter or policy.save_adapter
        self.saved_at: int | None = None  # the step of the newest checkpoint

    def resume(self, ckpt: Path, state: dict) -> dict:
        """Apply a checkpoint's optimiser, scheduler and RNG state; return its loop counters.
        Steps logged after the checkpoint are dropped from the metrics: they are redone."""
        counters = restore(state, self.opt, self.sched, lambda sd: self.dist.load_optimizer_state(
            self.policy.train_net, self.opt, sd, ckpt))
        scaler = self.policy.scaler
        if scaler is not None and "amp_scaler" in state:  # float16: go on at the scale it had reached
            scaler.load_state_dict(state["amp_scaler"])
        self.run.truncate_history(counters["step"])
        self.saved_at = counters["step"]
        return counters

    def save(self, counters: dict) -> None:
        """Write the checkpoint of ``counters["step"]`` (every rank calls this)."""
        run, policy, dist = self.run, self.policy, self.dist
        full = None if dist.replicated else policy.full_trainable(dist)
        opt_state = dist.optimizer_state(policy.train_net, self.opt)
        step = counters["step"]
        shards = dist.save_shards(tmp_dir(run.dir, step))  # DeepSpeed: each rank's partition, into the new checkpoint
        error = None
        if dist.is_main:
            try:
                scaler = policy.scaler
                save_checkpoint(run, step, lambda d: self.write_adapter(d / "adapter", full), self.opt,
                                self.sched, counters, optimizer_state=opt_state, fresh=not shards,
                                extra=None if scaler is None else {"amp_scaler": scaler.state_dict()})
            except UserError as exc:
                error = exc
        error = dist.broadcast(error)
        if error is not None:
            raise error
        self.saved_at = step

    def final(self, counters: dict) -> dict | None:
        """The end of the run: save unless the last step was just saved; returns the gathered
        weights of a sharded policy (None when every rank holds them whole)."""
        if self.saved_at != counters["step"]:
            self.save(counters)
        return None if self.dist.replicated else self.policy.full_trainable(self.dist)

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
                self.run.save_atomic("adapter", self.write_adapter)
            raise
