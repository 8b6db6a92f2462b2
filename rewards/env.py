"""Rewards of agent episodes: the environment's return (the reward contract's default for an
agent recipe) and its success. Both read the episode's columns (``rlhf.agents.episodes``)."""
from __future__ import annotations


def env_return(prompts, completions, env_return, **kwargs) -> list[float]:
    """The episode's summed environment reward, invalid-action penalties included."""
    return [float(r) for r in env_return]


def env_success(prompts, completions, success, **kwargs) -> list[float]:
    """1.0 for an episode that ended in success (the environment's info["success"], else a
    terminal step with a positive reward), else 0.0."""
    return [float(s) for s in success]
