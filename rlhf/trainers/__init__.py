"""Which trainer and evaluator serve a config: a registry per config family, keyed by its algo.

Trainers: ``train(cfg, run, progress=True, resume=False) -> dict``.
Evaluators: ``evaluate(run_dir, cfg, args) -> dict`` (what ``rlhf eval`` prints).
Entries are ``"module:function"`` strings imported on first use, so ``rlhf train`` on a gym
recipe never imports transformers (nor peft or accelerate): a start-up cost, not an import
cycle; nothing here is imported by the modules these entries name. ``ppo`` and ``reinforce``
are algo names of both families, hence one registry per family.
"""
from __future__ import annotations

from typing import Callable

from rlhf.config import AgentConfig, LMConfig
from rlhf.core import Registry
from rlhf.gym.config import GymConfig

LM_ALGOS = tuple(a for a in LMConfig.choices["algo"] if a != "reward_model")
GYM_ALGOS = GymConfig.choices["algo"]
AGENT_ALGOS = AgentConfig.choices["algo"]

TRAINERS = {"LMConfig": Registry("algo"), "AgentConfig": Registry("algo"), "GymConfig": Registry("algo")}
EVALUATORS = {"LMConfig": Registry("algo"), "AgentConfig": Registry("algo"), "GymConfig": Registry("algo")}
TRAINERS["LMConfig"].register("reward_model")("rlhf.trainers.reward_model:train_reward_model")
TRAINERS["LMConfig"].register(*LM_ALGOS)("rlhf.trainers.lm:train")
TRAINERS["AgentConfig"].register(*AGENT_ALGOS)("rlhf.trainers.lm:train")  # the LM loop, episodes as its source
TRAINERS["GymConfig"].register(*GYM_ALGOS)("rlhf.trainers.gym:train")
EVALUATORS["LMConfig"].register("reward_model")("rlhf.lm.evaluate:evaluate_rm_cli")
EVALUATORS["LMConfig"].register(*LM_ALGOS)("rlhf.lm.evaluate:evaluate_lm_cli")
EVALUATORS["AgentConfig"].register(*AGENT_ALGOS)("rlhf.agents.evaluate:evaluate_agent_cli")
EVALUATORS["GymConfig"].register(*GYM_ALGOS)("rlhf.gym.evaluate:evaluate_cli")


def get_trainer(cfg) -> Callable:
    return _lookup(TRAINERS, cfg)


def get_evaluator(cfg) -> Callable:
    return _lookup(EVALUATORS, cfg)


def _lookup(families: dict[str, Registry], cfg) -> Callable:
    family = families.get(type(cfg).__name__)
    if family is None:
        raise TypeError(f"no trainer or evaluator for {type(cfg).__name__}")
    return family.get(cfg.algo)
