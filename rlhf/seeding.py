"""One seed for every random stream a run draws from, and torch's thread count."""
from __future__ import annotations

import random

import numpy as np
import torch


def seed_everything(seed: int, threads: int = 0) -> None:
    """Seed Python's, NumPy's and torch's global generators; ``threads > 0`` also sets torch's
    intra-op threads (0 keeps torch's default)."""
    if threads:
        torch.set_num_threads(threads)
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
