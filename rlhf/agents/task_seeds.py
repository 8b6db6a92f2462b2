"""The task of an agent recipe: a stream of environment seeds. Training seeds are drawn from the
recipe's ``seed``, held-out seeds from ``eval_seed`` with another key, so they differ; where a
seed alone cannot hold a task out (FrozenLakeRandom's maps), ``eval_env_kwargs`` does (its
``split: eval`` maps are never trained on)."""
from __future__ import annotations

import hashlib
import itertools
from typing import Iterator


def seed_of(key: str, i: int) -> int:
    digest = hashlib.blake2b(f"{key}/{i}".encode(), digest_size=4).digest()
    return int.from_bytes(digest, "little") & 0x7FFFFFFF


def train_rows(seed: int) -> Iterator[dict]:
    """Rows ``{"seed": s}``, one task seed each, endless (row i is the run's i-th prompt)."""
    return ({"seed": seed_of(f"train/{seed}", i)} for i in itertools.count())


def held_out_rows(n: int, eval_seed: int) -> list[dict]:
    return [{"seed": seed_of(f"eval/{eval_seed}", i)} for i in range(n)]
