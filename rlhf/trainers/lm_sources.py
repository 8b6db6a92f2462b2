"""Where an LM run's rollouts come from (``rlhf.lm.rollout_record.RolloutSource``): a task's
prompts through the single-turn sampler, or an agent recipe's task seeds through multi-turn
episodes in its environment (``AgentConfig``: a recipe with ``env:`` and ``model:``). The loop
(``rlhf.trainers.lm``) is the same for both; these are the places it asks which."""
from __future__ import annotations

from typing import Iterator

from rlhf.agents.choose import ChoicePolicy
from rlhf.agents.episodes import episode_source
from rlhf.agents.task_seeds import train_rows as seed_rows
from rlhf.config import AgentConfig, LMConfig
from rlhf.lm.policy import LMPolicy
from rlhf.lm.rollout import SamplerSource
from rlhf.lm.rollout_record import RolloutSource
from rlhf.tasks import task_from_config


def train_rows(cfg: LMConfig) -> Iterator[dict]:
    """The run's rows, endless: the task's prompts, or the agent's task seeds."""
    return seed_rows(cfg.seed) if isinstance(cfg, AgentConfig) else task_from_config(cfg).train_rows()


def rollout_source(policy: LMPolicy, cfg: LMConfig) -> RolloutSource:
    if isinstance(cfg, AgentConfig):
        return episode_source(policy, cfg)
    return SamplerSource(policy, cfg.group_size, cfg.max_new_tokens)


def draws_per_row(cfg: LMConfig) -> int:
    """Random numbers a row's rollout may draw: one per token (an episode: per token of each turn)."""
    return cfg.max_turns * cfg.max_new_tokens if isinstance(cfg, AgentConfig) else cfg.max_new_tokens


def policy_class(cfg: LMConfig, base: type[LMPolicy] = LMPolicy) -> type[LMPolicy]:
    """``ChoicePolicy`` scores a ``choose`` episode's actions in the training forward; any other
    run builds ``base`` (the trainer's own ``LMPolicy``)."""
    return ChoicePolicy if isinstance(cfg, AgentConfig) and cfg.action_mode == "choose" else base


def completion_budget(cfg: LMConfig) -> int:
    """The most ids a completion row holds (``agg: constant``'s max_len): a reply's, or an episode's."""
    return cfg.max_episode_tokens if isinstance(cfg, AgentConfig) else cfg.max_new_tokens
