"""The agent keys of a recipe: what an LM recipe adds to act in an environment. ``AgentConfig``
(``rlhf.config``) is ``LMConfig`` with these keys; a recipe with both ``env:`` and ``model:`` is
an agent recipe (``rlhf.config.config_class``). Every LM key keeps its meaning, with two read
per turn: ``max_new_tokens`` caps one reply (generate mode), ``group_size`` is the number of
episodes from one task seed; ``eval_problems`` / ``eval_seed`` pick the held-out seeds."""
from __future__ import annotations

from dataclasses import dataclass, field

from rlhf.errors import UserError


@dataclass
class AgentKeys:
    env: str = "FrozenLakeRandom-v0"     # a text environment: a shipped id (FrozenLake-v1, FrozenLakeRandom-v0,
                                         # CliffWalking-v1, Taxi-v4, Blackjack-v1), module:Class or file.py:Class
    env_kwargs: dict = field(default_factory=dict)       # the environment's constructor arguments
    eval_env_kwargs: dict = field(default_factory=dict)  # rlhf eval's overrides (default: the env's held_out_kwargs)
    action_mode: str = "generate"        # generate: free text parsed into an action | choose: a categorical over
                                         # the valid actions, each scored by its text's log-probability
    choose_score: str = "sum"            # choose: an action's score is the sum of its text's token log-probs (its
                                         # log-prob) | mean (per token: TWOSOME's normalisation, no length bias)
    max_turns: int = 8                   # turns per episode (the policy acts once a turn)
    max_episode_tokens: int = 512        # ids per episode after the first prompt, the environment's included
    invalid_action: str = "penalty"      # a reply naming no valid action: penalty (add invalid_penalty, the
                                         # state stays) | end (add it and end the episode)
    invalid_penalty: float = -0.1        # added to the return for each invalid action

    agent_choices = {"action_mode": ("generate", "choose"), "invalid_action": ("penalty", "end"),
                     "choose_score": ("sum", "mean")}

    def validate_agent(self) -> None:
        if self.max_episode_tokens < 2:
            raise UserError(f"max_episode_tokens must leave room for a reply and its end token (>= 2), "
                            f"got {self.max_episode_tokens}")
        if self.action_mode != "choose":
            return
        if getattr(self, "critic", "shared") != "shared":
            raise UserError("action_mode: choose trains with critic: shared (the value head on the policy's trunk)")
        if getattr(self, "gradient_checkpointing", False):
            raise UserError("action_mode: choose scores each action on the KV cache of its episode, which gradient "
                            "checkpointing does not keep; set gradient_checkpointing: false")
