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

A run directory may come from elsewhere (``--resume`` of someone's run): a link in it that the
run did not make stops the run in one sentence before anything is written, and the run's own
files are opened with ``O_NOFOLLOW`` / ``O_EXCL`` or replaced by a rename, so no write reaches a
file outside it; a line of ``metrics.jsonl`` that is not JSON is named, and the code its recipe
names is named before ``--resume`` or ``rlhf eval`` imports it (``announce_code``).
"""
from __future__ import annotations

import dataclasses
import io
import json
import logging
import math
import os
import shutil
import time
from pathlib import Path

import yaml

from rlhf.errors import UserError
from rlhf.run_dir_guard import check_links, planted_link
from rlhf.storage import (Slot, append_file, fsync_path, is_environment_error, lock_run_dir,
                          read_rows, replace_file, save_failed, unlock)

log = logging.getLogger("rlhf")


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
        self.keep_checkpoints = getattr(cfg, "keep_checkpoints", 2)  # complete checkpoints kept (rlhf.checkpoint)
        self._lock = None
        if not main:
            return
        self._refuse_a_second_run(resume)
        check_links(self.dir)  # (a directory from elsewhere: no link in it is written through)
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
        text = yaml.safe_dump(dataclasses.asdict(cfg), sort_keys=False)  # (every key, defaults included)
        self._write(lambda: replace_file(self.dir / "recipe.yaml", text.encode()), "recipe.yaml", kept)

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
        (later ones are redone). A line that is not JSON among the rows kept stops the resume in
        one sentence, the file untouched (``_kept_rows``)."""
        self.history = _kept_rows(self.metrics_path, step)
        samples = self.dir / "completions.jsonl"
        kept_samples = _kept_rows(samples, step) if samples.is_file() else None
        if not self.main:
            return
        text = "".join(json.dumps(r) + "\n" for r in self.history)
        self._write(lambda: replace_file(self.metrics_path, text.encode()), "metrics.jsonl")
        if kept_samples is not None:
            text = "".join(json.dumps(r) + "\n" for r in kept_samples)
            self._write(lambda: replace_file(samples, text.encode()), samples.name)

    def log(self, row: dict) -> None:
        row = {k: _plain(v) for k, v in row.items()}
        self.history.append(row)
        if not self.main:
            return
        self._write(lambda: append_file(self.metrics_path, (json.dumps(row) + "\n").encode()), "metrics.jsonl")
        if self.trackers is not None:
            self.trackers.log(row)

    def append(self, filename: str, rows: list[dict]) -> None:
        """Append ``rows`` as JSON lines to RUN_DIR/filename (the main process writes)."""
        if not self.main:
            return
        data = "".join(json.dumps(r) + "\n" for r in rows).encode()
        self._write(lambda: append_file(self.dir / filename, data), filename)

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
        if out.is_symlink():
            raise planted_link(self.dir, out.name)
        out.mkdir(parents=True, exist_ok=True)
        path = out / f"step{step:04d}_rank{rank}.safetensors"
        if os.path.lexists(path):
            os.unlink(path)  # (a new file: nothing in its place is written through)
        save_file({k: v.detach().float().cpu().clone() for k, v in tensors.items()}, str(path))

    def plot(self, key: str = "reward", filename: str = "reward.png") -> Path | None:
        points = [(r["step"], r[key]) for r in self.history if key in r and r[key] is not None]
        if not points or not self.main:
            return None
        return plot_curves({self.dir.name: points}, key, self.dir / filename)


def publish(run: Run, slot: Slot, step: int, writer, what: str, kept: str, fresh: bool = True,
            keep: int = 1) -> None:
    """``slot.publish`` for the main process of ``run``: the metrics fsynced first; a file-system
    failure becomes one sentence (``kept``: what stays intact) after its temporary is removed."""
    try:
        run.sync()
        slot.publish(step, writer, fresh=fresh, keep=keep)
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
    buf = io.BytesIO()
    fig.savefig(buf, format=Path(path).suffix.lstrip(".") or "png")
    plt.close(fig)
    replace_file(path, buf.getvalue())  # (a rename: a link or hard link in its place is not written through)
    return path


def _kept_rows(path: Path, step: int) -> list[dict]:
    """The rows of a JSONL file of the run with ``step`` at most ``step`` (a resume keeps them,
    the later ones are redone). A line that is not a JSON object is harmless as the file's last
    line (a crash tears at most that one: the rows a checkpoint covers are fsynced before it) or
    after every row a resume keeps (it is redone, and named); anywhere else it could hide a kept
    row, so the resume stops in one sentence and the file is left as it is."""
    rows, broken = read_rows(path)
    for number, before in broken:
        last = before == len(rows) and (number, before) == broken[-1]
        prev = rows[before - 1].get("step", 0) if before else None
        if any(r.get("step", 0) <= step for r in rows[before:]) or not last and (prev is None or prev < step):
            raise UserError(f"line {number} of {str(path)!r} is not a JSON row and lies among the rows up to "
                            f"the checkpoint's step {step}, which a resume keeps; fix or delete that line "
                            "(the file is untouched), then resume again")
        if not last:
            log.warning("%s: line %d is not a JSON row; it lies after the checkpoint's step %d and is "
                        "dropped with the rows the resume redoes", path, number, step)
    return [r for r in rows if r.get("step", 0) <= step]


def _plain(v):
    if hasattr(v, "item"):
        v = v.item()
    if isinstance(v, float):
        return round(v, 6) if math.isfinite(v) else None
    return v


# ---------------------------------------------------------------------- code a recipe names
def code_named(cfg) -> list[str]:
    """What loading ``cfg``'s run will import or load beyond rlhf's own code, found without
    importing anything: each reward given as ``path/to/file.py:fn`` (the file) or ``module:fn``
    (the module's file where it can be located, else its name), each ``rm:`` reward model (its
    directory or Hub id: weights, and a tokenizer), a gym env given as ``module:Env``."""
    out = []
    rewards = getattr(cfg, "rewards", None)
    specs = [rewards] if isinstance(rewards, (str, dict)) else list(rewards or [])
    for spec in specs:
        names = list(spec) if isinstance(spec, dict) else [spec]
        for name in names:
            if not isinstance(name, str):
                continue
            if name.startswith("rm:"):
                out.append(f"reward model {name[3:]}")
            elif ":" in name and not name.startswith("callable:"):
                out.append(_code_file(name.rpartition(":")[0]))
    env = getattr(cfg, "env", None)
    if isinstance(env, str) and ":" in env:
        out.append(_code_file(env.partition(":")[0]))
    return list(dict.fromkeys(out))


def announce_code(cfg, what: str = "this run", file=None) -> list[str]:
    """Before ``rlhf eval`` or ``--resume`` imports what a run directory's recipe names (a run
    directory may come from someone else): one line on stderr naming it (``code_named``), or
    nothing when it names only rlhf's own code. Returns the names."""
    import sys

    names = code_named(cfg)
    if names:
        print(f"{what} imports and runs code its recipe names: {', '.join(names)}",
              file=file if file is not None else sys.stderr)
    return names


def _code_file(where: str) -> str:
    """``where`` (a file ``x.py`` or a dotted module name) as the path of the module's file, located
    without importing any of it (importing it runs its packages' ``__init__.py`` files too)."""
    if where.endswith(".py"):
        return str(Path(where).expanduser().resolve())
    import importlib.machinery
    import importlib.util

    parts = where.split(".")
    try:
        spec = importlib.util.find_spec(parts[0])  # (a top-level name: found, not imported)
    except (ImportError, ValueError):
        spec = None
    if spec is None or len(parts) == 1:
        found = spec is not None and spec.origin not in (None, "built-in", "frozen")
        return spec.origin if found else f"module {where}"
    paths = list(spec.submodule_search_locations or [])
    for i, part in enumerate(parts[1:], 1):
        spec = importlib.machinery.PathFinder.find_spec(part, paths)
        if spec is None:
            return f"module {where}"
        if i < len(parts) - 1:
            paths = list(spec.submodule_search_locations or [])
    return spec.origin or f"module {where}"
