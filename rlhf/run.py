"""A run directory: the resolved recipe, metrics as JSONL, saved weights and a reward plot.

    runs/<name>/recipe.yaml      resolved config (every key, defaults included)
    runs/<name>/metrics.jsonl    one JSON object per step
    runs/<name>/adapter/         LoRA adapter in PEFT format (written atomically)
    runs/<name>/reward.png       reward over steps
"""
from __future__ import annotations

import json
import math
import shutil
import time
from pathlib import Path

import yaml

from rlhf.config import to_dict
from rlhf.errors import UserError


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
        if not main:
            return
        if not resume and self.metrics_path.is_file():
            raise UserError(f"run directory {str(self.dir)!r} already holds a run; continue it with "
                            f"`rlhf train --resume {self.dir}` or choose another --run-dir")
        self.dir.mkdir(parents=True, exist_ok=True)
        (self.dir / "recipe.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))

    def truncate_history(self, step: int) -> None:
        """On resume: keep the logged rows up to ``step`` (later ones are redone)."""
        rows = []
        if self.metrics_path.is_file():
            rows = [json.loads(x) for x in self.metrics_path.read_text().splitlines() if x.strip()]
        self.history = [r for r in rows if r.get("step", 0) <= step]
        if not self.main:
            return
        tmp = self.metrics_path.with_suffix(".tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in self.history))
        tmp.replace(self.metrics_path)

    def log(self, row: dict) -> None:
        row = {k: _plain(v) for k, v in row.items()}
        self.history.append(row)
        if not self.main:
            return
        with self.metrics_path.open("a") as f:
            f.write(json.dumps(row) + "\n")

    def save_atomic(self, name: str, writer, fresh: bool = True) -> Path:
        """Call ``writer(tmp_dir)`` then rename into place, so a crash never leaves half a save.
        ``fresh=False``: keep what other processes already wrote into ``tmp_dir`` (``tmp_path``)."""
        final, tmp = self.dir / name, self.tmp_path(name)
        if not self.main:
            return final
        if fresh:
            shutil.rmtree(tmp, ignore_errors=True)
        writer(tmp)
        old = self.dir / f".{name}.old"
        if final.exists():
            shutil.rmtree(old, ignore_errors=True)
            final.rename(old)
        tmp.rename(final)
        shutil.rmtree(old, ignore_errors=True)
        return final

    def tmp_path(self, name: str) -> Path:
        """Where ``save_atomic(name, ...)`` builds the new ``name`` before renaming it into place."""
        return self.dir / f".{name}.tmp"

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
