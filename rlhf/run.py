"""A run directory: the resolved recipe, metrics as JSONL, saved weights and a reward plot.

    runs/<name>/recipe.yaml      resolved config (every key, defaults included)
    runs/<name>/metrics.jsonl    one JSON object per step
    runs/<name>/adapter/         LoRA adapter in PEFT format (a link into the newest checkpoint)
    runs/<name>/reward.png       reward over steps
    runs/<name>/completions.jsonl  sampled completions every log_completions_every steps (LM)
    runs/<name>/report.html      the run's report page (``rlhf.report``), written at the end
    runs/<name>/run.lock         held (flock) by the process training the run

Saved directories are published crash-safely (``rlhf.storage``): a run killed at any instant
keeps its last complete save. One process at a time trains a run directory (the lock).
"""
from __future__ import annotations

import json
import math
import os
import shutil
import time
from pathlib import Path

import yaml

from rlhf.config import to_dict
from rlhf.errors import UserError
from rlhf.storage import (Slot, fsync_path, is_environment_error, lock_run_dir, read_jsonl, replace_file, save_failed,
                          unlock)


class Run:
    """``main=False`` (the other processes of a multi-process run): the same directory and
    in-memory history, but nothing is written; the main process writes the files."""

    def __init__(self, cfg, recipe_path: str | None = None, run_dir: str | None = None,
                 resume: bool = False, main: bool = True):
        self.main = main
        if run_dir is None:
            stem = Path(recipe_path).stem if recipe_path else cfg.algo
            name = cfg.run_name or f"{stem}-{time.strftime('%Y%m%d-%H%M%S')}"
            run_dir = Path(cfg.out_dir) / name
            suffix = 1
            while Path(run_dir).exists() and cfg.run_name is None:
                run_dir, suffix = Path(cfg.out_dir) / f"{name}-{suffix}", suffix + 1
        self.dir = Path(run_dir)
        self.metrics_path = self.dir / "metrics.jsonl"
        self.history: list[dict] = []
        self.trackers = None  # rlhf.tracking.Tracking, set by the trainer: every logged row goes there too
        self._lock = None
        if not main:
            return
        self._refuse_a_second_run(resume)
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise UserError(f"cannot create the run directory {str(self.dir)!r} ({exc.strerror}); choose "
                            "another --run-dir or out_dir") from None
        self._lock = self._write(lambda: lock_run_dir(self.dir), "run.lock", "nothing else was written")
        # (a second process on this directory stops there)
        self._refuse_a_second_run(resume)    # (one that finished while we waited for the lock)
        self.write_recipe(cfg, "nothing else was written")

    def write_recipe(self, cfg, kept: str = "the run's other files are intact") -> None:
        """(Re)write ``recipe.yaml``, the resolved config (the Python API writes it again once a
        dataset it was given has its place in the run directory)."""
        self._write(lambda: replace_file(self.dir / "recipe.yaml",
                                         yaml.safe_dump(to_dict(cfg), sort_keys=False).encode()), "recipe.yaml", kept)

    def _refuse_a_second_run(self, resume: bool) -> None:
        if not resume and self.metrics_path.is_file():
            raise UserError(f"run directory {str(self.dir)!r} already holds a run; continue it with "
                            f"`rlhf train --resume {self.dir}` or choose another --run-dir")

    def close(self) -> None:
        """Release the run directory's lock (the OS releases it anyway when the process ends)."""
        unlock(self._lock)
        self._lock = None

    def _write(self, write, what: str, kept: str = "the last complete checkpoint is intact"):
        """Run ``write()``; a file-system refusal (disk full, read-only) becomes one sentence."""
        try:
            return write()
        except UserError:
            raise
        except Exception as exc:
            if not is_environment_error(exc, self.dir):
                raise
            raise save_failed(exc, self.dir, what, kept) from None

    def truncate_history(self, step: int) -> None:
        """On resume: keep the logged rows (metrics and sample completions) up to ``step``
        (later ones are redone)."""
        self.history = [r for r in read_jsonl(self.metrics_path) if r.get("step", 0) <= step]
        if not self.main:
            return
        text = "".join(json.dumps(r) + "\n" for r in self.history)
        self._write(lambda: replace_file(self.metrics_path, text.encode()), "metrics.jsonl")
        samples = self.dir / "completions.jsonl"
        if samples.is_file():
            text = "".join(json.dumps(r) + "\n" for r in read_jsonl(samples) if r.get("step", 0) <= step)
            self._write(lambda: replace_file(samples, text.encode()), samples.name)

    def log(self, row: dict) -> None:
        row = {k: _plain(v) for k, v in row.items()}
        self.history.append(row)
        if not self.main:
            return

        def append():
            with self.metrics_path.open("a") as f:
                f.write(json.dumps(row) + "\n")
        self._write(append, "metrics.jsonl")
        if self.trackers is not None:
            self.trackers.log(row)

    def append(self, filename: str, rows: list[dict]) -> None:
        """Append ``rows`` as JSON lines to RUN_DIR/filename (the main process writes)."""
        if not self.main:
            return

        def append():
            with (self.dir / filename).open("a") as f:
                f.write("".join(json.dumps(r) + "\n" for r in rows))
        self._write(append, filename)

    def sync(self) -> None:
        """fsync the metrics, so that none a checkpoint covers can be lost after it is published."""
        if self.main and self.metrics_path.is_file():
            fsync_path(self.metrics_path)

    def save_atomic(self, name: str, writer, follow: dict[str, str] | None = None) -> Path:
        """Publish ``RUN_DIR/name`` crash-safely: ``writer(dir)`` fills a new directory (which
        does not exist yet: ``dir.mkdir()`` or a library's ``save_pretrained(dir)``), which
        becomes the new version of ``name`` (``rlhf.storage.Slot``); a run killed at any
        instant keeps the old version or the new one whole. A full disk or read-only directory:
        one sentence, the old version kept. ``follow``: links re-pointed into the new version."""
        slot = Slot(self.dir, name, follow)
        if not self.main:
            return slot.link
        step = self.history[-1].get("step", 0) if self.history else 0
        publish(self, slot, step, lambda d: (os.rmdir(d), writer(d)), what=name,
                kept=f"the previous {name} is kept")
        return slot.link

    def dump_tensors(self, step: int, rank: int, **tensors) -> None:
        """``debug_tensors``: one process's tensors of one step, as debug/step{N}_rank{R}.safetensors
        (written by every process, to compare multi-process numerics with one process's)."""
        from safetensors.torch import save_file

        out = self.dir / "debug"
        out.mkdir(parents=True, exist_ok=True)
        save_file({k: v.detach().float().cpu().clone() for k, v in tensors.items()},
                  str(out / f"step{step:04d}_rank{rank}.safetensors"))

    def plot(self, key: str = "reward", filename: str = "reward.png") -> Path | None:
        points = [(r["step"], r[key]) for r in self.history if key in r and r[key] is not None]
        if not points or not self.main:
            return None
        return plot_curves({self.dir.name: points}, key, self.dir / filename)


def publish(run: Run, slot: Slot, step: int, writer, what: str, kept: str, fresh: bool = True) -> None:
    """``slot.publish`` for the main process of ``run``: the metrics fsynced first; a file-system
    failure becomes one sentence (``kept``: what stays intact) after its temporary is removed."""
    try:
        run.sync()
        slot.publish(step, writer, fresh=fresh)
    except UserError:
        raise
    except Exception as exc:
        if not is_environment_error(exc, run.dir):
            raise
        shutil.rmtree(slot.tmp_path(step), ignore_errors=True)
        raise save_failed(exc, run.dir, what, kept) from None


def plot_curves(curves: dict[str, list[tuple[float, float]]], ylabel: str, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=110)
    for label, points in curves.items():
        xs, ys = zip(*points)
        ax.plot(xs, ys, marker=".", label=label)
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    if len(curves) > 1:
        ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def _plain(v):
    if hasattr(v, "item"):
        v = v.item()
    if isinstance(v, float):
        return round(v, 6) if math.isfinite(v) else None
    return v
