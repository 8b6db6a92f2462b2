"""Prompt sources. A task yields rows: dicts with a ``prompt`` (a string, or a list of chat
messages) plus any extra columns, which reward functions receive as keyword arguments."""
from __future__ import annotations

import random
from pathlib import Path
from typing import Iterator

from rlhf.errors import UserError

ARITH_TEMPLATE = "What is {a} + {b}? Answer with just the number."


def arith_row(a: int, b: int) -> dict:
    return {"prompt": [{"role": "user", "content": ARITH_TEMPLATE.format(a=a, b=b)}],
            "answer": str(a + b), "a": a, "b": b}


class ArithTask:
    """Two-digit addition, generated from a seed (no download). Held-out problems come from
    another seed and never repeat a pair the training stream will show in ``train_pairs``."""

    name = "arith"

    def __init__(self, seed: int, train_pairs: int):
        rng = random.Random(seed)
        self._train = [(rng.randint(10, 99), rng.randint(10, 99)) for _ in range(train_pairs)]

    def train_rows(self) -> Iterator[dict]:
        i = 0
        while True:  # cycles if a run asks for more prompts than it planned
            yield arith_row(*self._train[i % len(self._train)])
            i += 1

    def held_out(self, n: int, seed: int) -> list[dict]:
        return [arith_row(*pair) for pair in fresh_problems(n, seed, exclude=set(self._train))]


def fresh_problems(n: int, seed: int | str, exclude: set) -> list[tuple[int, int]]:
    """``n`` distinct addition problems (a, b), none in ``exclude``."""
    rng, out, seen = random.Random(seed), [], set(exclude)
    if n > 90 * 90 - len(seen):
        raise UserError(f"only {90 * 90 - len(seen)} fresh addition problems exist; ask for fewer")
    while len(out) < n:
        pair = (rng.randint(10, 99), rng.randint(10, 99))
        if pair not in seen:
            seen.add(pair)
            out.append(pair)
    return out


class FileTask:
    """Rows from a local jsonl / json / csv / parquet file read with ``datasets``; it needs a
    ``prompt`` column. Held-out rows come from ``eval_path`` (or a shuffled 10% of the file)."""

    def __init__(self, path: str, seed: int, eval_path: str | None = None):
        rng = random.Random(seed)
        self._train, self._eval = split_held_out(load_rows(path), rng, eval_path)
        self._rng = rng  # goes on to order the training rows
        self.name = Path(path).stem

    def train_rows(self) -> Iterator[dict]:
        while True:
            order = list(range(len(self._train)))
            self._rng.shuffle(order)
            for i in order:
                yield self._train[i]

    def held_out(self, n: int, seed: int) -> list[dict]:
        return self._eval[:n]


def split_held_out(rows: list[dict], rng: random.Random, eval_path: str | None = None
                   ) -> tuple[list[dict], list[dict]]:
    """(training, held-out) rows of a file: all rows and those of ``eval_path`` when it is given,
    else the rows shuffled by ``rng`` with the first 10% (at least one) held out. Used by
    ``FileTask`` and by reward-model runs on preference files."""
    if eval_path:
        return rows, load_rows(eval_path)
    rows = list(rows)
    rng.shuffle(rows)
    cut = max(1, len(rows) // 10)
    return rows[cut:] or rows, rows[:cut]


def load_rows(path: str) -> list[dict]:
    p = Path(path)
    kinds = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}
    if not p.is_file():
        raise UserError(f"task file {path!r} does not exist; give a .jsonl/.csv/.parquet file "
                        "with a 'prompt' column, or task: arith")
    if p.suffix not in kinds:
        raise UserError(f"task file {path!r} has suffix {p.suffix!r}; use one of {sorted(kinds)}")
    import datasets

    datasets.disable_progress_bars()
    if not _has_rows(p):  # datasets' readers end in a bare StopIteration or "no data" on it
        raise UserError(f"task file {path!r} is empty (no data rows); it needs at least one row with a 'prompt'")
    level = datasets.logging.get_verbosity()
    datasets.logging.set_verbosity(datasets.logging.CRITICAL)  # its reader logs the error we report
    try:
        rows = list(datasets.load_dataset(kinds[p.suffix], data_files=str(p), split="train"))
    except Exception as exc:  # a malformed file: name it and the reader's innermost reason
        cause = exc
        while cause.__cause__ is not None or cause.__context__ is not None:
            cause = cause.__cause__ or cause.__context__
        why = (str(cause).splitlines() or [""])[0][:200]
        raise UserError(f"task file {path!r} cannot be read as {kinds[p.suffix]} ({why}); fix the file "
                        "or its suffix") from exc
    finally:
        datasets.logging.set_verbosity(level)
    if not rows or "prompt" not in rows[0]:
        raise UserError(f"task file {path!r} needs a non-empty 'prompt' column "
                        f"(found columns {sorted(rows[0]) if rows else []})")
    return rows


def _has_rows(p: Path) -> bool:
    """Whether a file holds at least one data row: a non-blank line of a .jsonl, one after the
    header of a .csv (read only up to there); other formats: a non-empty file."""
    if p.stat().st_size == 0:
        return False
    if p.suffix not in (".jsonl", ".csv"):
        return True
    needed = 2 if p.suffix == ".csv" else 1
    with p.open("rb") as f:
        for line in f:
            needed -= bool(line.strip())
            if needed == 0:
                return True
    return False


def make_task(name: str, seed: int, train_prompts: int, eval_path: str | None = None):
    if name == "arith":
        return ArithTask(seed, train_prompts)
    return FileTask(name, seed, eval_path)
