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
    """Rows of a dataset (``load_dataset_source``: a file, a dataset directory or a Hub id),
    kept as a ``datasets.Dataset`` and turned into rows one at a time (``RowFormat``).
    Held-out rows come from ``eval_path`` / ``eval_split``, else a shuffled 10% of the rows."""

    def __init__(self, path: str, seed: int, eval_path: str | None = None, *, config: str | None = None,
                 split: str = "train", eval_split: str | None = None, fmt: "RowFormat | None" = None):
        rng = random.Random(seed)
        self._fmt = fmt or RowFormat()
        self._data = load_dataset_source(path, config, split)
        self._fmt.check(self._data, path)
        held = held_out_source(path, split, eval_path, eval_split)
        if held is not None:  # a separate held-out dataset (or split of this one)
            self._held = load_dataset_source(held[0], config, held[1])
            self._fmt.check(self._held, held[0])
            self._train_idx, self._eval_idx = list(range(len(self._data))), list(range(len(self._held)))
        else:  # the same permutation split_held_out makes of the rows, on their indices
            self._held = self._data
            self._train_idx, self._eval_idx = split_held_out(list(range(len(self._data))), rng)
        self._rng = rng  # goes on to order the training rows
        self.name = Path(path).stem if Path(path).suffix else Path(path).name

    def train_rows(self) -> Iterator[dict]:
        while True:
            order = list(self._train_idx)
            self._rng.shuffle(order)
            for i in order:
                yield self._fmt(self._data[i])

    def held_out(self, n: int, seed: int) -> list[dict]:
        return [self._fmt(self._held[i]) for i in self._eval_idx[:n]]


def held_out_source(path: str, split: str, eval_path: str | None = None,
                    eval_split: str | None = None) -> tuple[str, str] | None:
    """(source, split) of the held-out rows when they are a dataset of their own (``eval_path``
    or ``eval_split``, which default to the task's), else None: a shuffled 10% of the task's rows."""
    if eval_path or eval_split:
        return eval_path or path, eval_split or split
    return None


class RowFormat:
    """A dataset row -> a task row: ``columns`` maps our names to the dataset's
    (``{"prompt": "question"}``; the dataset's own columns stay too), ``prompt_template``
    (``str.format`` over the row) builds the prompt, and ``system_prompt`` / ``chat`` make a
    text prompt a conversation (system message, then the text as the user's)."""

    def __init__(self, columns: dict | None = None, prompt_template: str | None = None,
                 system_prompt: str | None = None, chat: bool = False):
        self.columns, self.template = dict(columns or {}), prompt_template
        self.system, self.chat = system_prompt, chat or system_prompt is not None

    def check(self, data, source: str) -> None:
        """One sentence on the first thing that keeps ``data`` from making rows."""
        names = list(data.column_names)
        missing = {ours: theirs for ours, theirs in self.columns.items() if theirs not in names}
        if missing:
            raise UserError(f"columns maps {missing} but {source!r} has no such column; its columns: "
                            f"{', '.join(names)}")
        if len(data) == 0:
            raise UserError(f"dataset {source!r} has no rows")
        if self.template is None and "prompt" not in names and "prompt" not in self.columns:
            raise UserError(f"dataset {source!r} has no 'prompt' column (columns: {', '.join(names)}); "
                            "map one with columns: {prompt: <column>} or set prompt_template")
        self(data[0])  # a template naming a missing column fails here, before any training

    def __call__(self, raw: dict) -> dict:
        row = {**raw, **{ours: raw[theirs] for ours, theirs in self.columns.items()}}
        if self.template is not None:
            try:
                row["prompt"] = self.template.format(**row)
            except (KeyError, IndexError) as exc:
                raise UserError(f"prompt_template {self.template!r} names {exc} but rows have columns "
                                f"{', '.join(raw)}; use {{column}} fields of those") from None
        prompt = row["prompt"]
        if self.chat and isinstance(prompt, str):
            prompt = [{"role": "user", "content": prompt}]
        if self.system is not None and not (prompt and prompt[0].get("role") == "system"):
            prompt = [{"role": "system", "content": self.system}, *prompt]
        row["prompt"] = prompt
        return row


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


FILE_KINDS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}


def load_dataset_source(source: str, config: str | None = None, split: str = "train"):
    """A ``datasets.Dataset`` from a local file (its one split, ``train``), a directory written
    by ``save_to_disk``, or a dataset repository: a local directory (data files + README.md
    configs) or a Hub id, both through the same ``load_dataset(source, name=config, split=split)``."""
    import datasets

    datasets.disable_progress_bars()
    p = Path(source)
    if p.suffix in FILE_KINDS or p.is_file():
        if not p.is_file():
            raise UserError(f"task file {source!r} does not exist; give a .jsonl/.csv/.parquet file, a dataset "
                            "directory or a Hub dataset id, or task: arith")
        if p.suffix not in FILE_KINDS:
            raise UserError(f"task file {source!r} has suffix {p.suffix!r}; use one of {sorted(FILE_KINDS)}")
        if split != "train":
            raise UserError(f"{source!r} is a single file, whose one split is 'train', not {split!r}; unset "
                            "task_split / eval_split, or give the held-out rows as eval_task")
        if not _has_rows(p):  # datasets' readers end in a bare StopIteration or "no data" on it
            raise UserError(f"task file {source!r} is empty (no data rows); it needs at least one row with a 'prompt'")
        return _read_file(datasets, p, source)
    if p.is_dir() and ((p / "state.json").is_file() or (p / "dataset_dict.json").is_file()):
        data = datasets.load_from_disk(str(p))
        if isinstance(data, datasets.DatasetDict):
            if split not in data:
                raise UserError(f"dataset {source!r} has no split {split!r}; its splits: {', '.join(data)} "
                                "(set task_split / eval_split)")
            data = data[split]
        return data
    try:
        return datasets.load_dataset(source, name=config, split=split)
    except Exception as exc:  # noqa: BLE001  (datasets raises many kinds; all are the user's input)
        where = "a local directory" if p.is_dir() else "a Hub dataset id (is the Hub reachable?)"
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"task {source!r} (task_config={config!r}, split={split!r}) could not be loaded as "
                        f"{where}: {first}") from None


def load_rows(path: str) -> list[dict]:
    """All rows of a local file as dicts (reward-model preference files)."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"task file {path!r} does not exist; give a .jsonl/.csv/.parquet file "
                        "with a 'prompt' column, or task: arith")
    rows = list(load_dataset_source(path))
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


def _read_file(datasets, p: Path, source: str):
    """A local file through its ``datasets`` reader; a malformed one is named with the reader's
    innermost reason (datasets' own error log, which would repeat it, is silenced meanwhile)."""
    level = datasets.logging.get_verbosity()
    datasets.logging.set_verbosity(datasets.logging.CRITICAL)
    try:
        return datasets.load_dataset(FILE_KINDS[p.suffix], data_files=str(p), split="train")
    except Exception as exc:  # a malformed file: name it and the reader's innermost reason
        cause = exc
        while cause.__cause__ is not None or cause.__context__ is not None:
            cause = cause.__cause__ or cause.__context__
        why = (str(cause).splitlines() or [""])[0][:200]
        raise UserError(f"task file {source!r} cannot be read as {FILE_KINDS[p.suffix]} ({why}); fix the file "
                        "or its suffix") from exc
    finally:
        datasets.logging.set_verbosity(level)


def make_task(name: str, seed: int, train_prompts: int, eval_path: str | None = None, **options):
    """``options``: ``config``, ``split``, ``eval_split`` and ``fmt`` of ``FileTask``."""
    if name == "arith":
        return ArithTask(seed, train_prompts)
    return FileTask(name, seed, eval_path, **options)


def task_from_config(cfg):
    """The task of an LM recipe, with its data keys (task_config, columns, prompt_template, ...)."""
    fmt = RowFormat(cfg.columns, cfg.prompt_template, cfg.system_prompt, cfg.chat)
    return make_task(cfg.task, cfg.seed, cfg.steps * cfg.prompts_per_step, cfg.eval_task,
                     config=cfg.task_config, split=cfg.task_split, eval_split=cfg.eval_split, fmt=fmt)
