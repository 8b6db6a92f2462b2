"""Which trainer and evaluator serve a config: one branch per family (LM, gym)."""
from __future__ import annotations

from typing import Callable


def get_trainer(cfg) -> Callable:
    """``train(cfg, run, progress=True) -> dict`` for this config's family."""
    from rlhf.config import LMConfig
    from rlhf.gym.config import GymConfig

    if isinstance(cfg, LMConfig) and cfg.algo == "reward_model":
        from rlhf.reward_model import train_reward_model

        return train_reward_model
    if isinstance(cfg, LMConfig):
        from rlhf.trainers.lm import train

        return train
    if isinstance(cfg, GymConfig):
        from rlhf.gym.train import train

        return train
    raise TypeError(f"no trainer for {type(cfg).__name__}")


def get_evaluator(cfg) -> Callable:
    """``evaluate(run_dir, cfg, args) -> dict`` for this config's family."""
    from rlhf.config import LMConfig
    from rlhf.gym.config import GymConfig

    if isinstance(cfg, LMConfig) and cfg.algo == "reward_model":
        from rlhf.reward_model import evaluate_rm_cli

        return evaluate_rm_cli
    if isinstance(cfg, LMConfig):
        from rlhf.evaluate import evaluate_lm_cli

        return evaluate_lm_cli
    if isinstance(cfg, GymConfig):
        from rlhf.gym.evaluate import evaluate_cli

        return evaluate_cli
    raise TypeError(f"no evaluator for {type(cfg).__name__}")
