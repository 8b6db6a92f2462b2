"""Which trainer and evaluator serve a config: one row per family, first match wins.

Trainers: ``train(cfg, run, progress=True, resume=False) -> dict``.
Evaluators: ``evaluate(run_dir, cfg, args) -> dict`` (what ``rlhf eval`` prints).
Both are imported lazily, by name, so ``rlhf train`` on a gym recipe never imports transformers
(nor peft or accelerate): a start-up cost, not an import cycle; nothing here is imported by the
modules these rows name.
"""
from __future__ import annotations

import importlib
from typing import Callable

# (config class name, algo or None for any, trainer, evaluator)
FAMILIES = [
    ("LMConfig", "reward_model", "rlhf.trainers.reward_model:train_reward_model",
     "rlhf.lm.evaluate:evaluate_rm_cli"),
    ("LMConfig", None, "rlhf.trainers.lm:train", "rlhf.lm.evaluate:evaluate_lm_cli"),
    ("AgentConfig", None, "rlhf.trainers.lm:train", "rlhf.agents.evaluate:evaluate_agent_cli"),
    ("GymConfig", None, "rlhf.trainers.gym:train", "rlhf.gym.evaluate:evaluate_cli"),
]


def get_trainer(cfg) -> Callable:
    return _lookup(cfg, 2)


def get_evaluator(cfg) -> Callable:
    return _lookup(cfg, 3)


def _lookup(cfg, column: int) -> Callable:
    for row in FAMILIES:
        if type(cfg).__name__ == row[0] and row[1] in (None, getattr(cfg, "algo", None)):
            module, _, name = row[column].partition(":")
            return getattr(importlib.import_module(module), name)
    raise TypeError(f"no trainer or evaluator for {type(cfg).__name__}")
