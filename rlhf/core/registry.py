"""Named choices of the algorithm, keyed by the recipe's own names (verl's ``register_adv_est`` /
``register_policy_loss`` pattern): a recipe's ``adv_estimator: grpo`` or ``objective: clip`` is
the key a trainer looks up here, with no table between them.

    @register_adv_est("my_baseline")
    def my_baseline(x: AdvInput) -> tuple[Tensor, Tensor | None]:
        return x.rewards - x.rewards.mean(), None

Every advantage estimator takes one ``AdvInput`` and returns ``(adv, ret)`` (``ret``: value
targets, None when the estimator has no critic). Every policy objective takes
``(logp, old_logp, adv, mask, *, clip_range, clip_range_high, penalty_coef)`` and returns the
per-element loss and its detached stats. The built-in entries live beside the maths they wrap
(``rlhf/core/estimators.py``, ``rlhf/core/objectives.py``).
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Callable

from torch import Tensor

__all__ = ["Registry", "AdvInput", "ADV_ESTIMATORS", "POLICY_OBJECTIVES", "register_adv_est",
           "register_policy_loss"]


class Registry:
    """Functions by name. ``register(*names)`` is a decorator; ``get(name)`` fails in one
    sentence that lists the valid names. An entry may be a ``"module:function"`` string, imported
    on its first ``get`` (so choosing a gym trainer never imports the LM stack)."""

    def __init__(self, key: str):
        self.key = key  # the recipe key whose values name the entries (for the error)
        self._entries: dict[str, Callable] = {}

    def register(self, *names: str) -> Callable[[Callable], Callable]:
        def add(fn: Callable) -> Callable:
            for name in names:
                if self._entries.get(name, fn) is not fn:
                    raise ValueError(f"{self.key} {name!r} is registered already; unregister it first")
                self._entries[name] = fn
            return fn
        return add

    def unregister(self, name: str) -> None:
        self._entries.pop(name, None)

    def get(self, name: str) -> Callable:
        if name not in self._entries:
            raise ValueError(f"unknown {self.key} {name!r}; valid: {', '.join(self.names())}")
        entry = self._entries[name]
        if isinstance(entry, str):
            module, _, attr = entry.partition(":")
            entry = self._entries[name] = getattr(importlib.import_module(module), attr)
        return entry

    def names(self) -> tuple[str, ...]:
        return tuple(sorted(self._entries))

    def __contains__(self, name) -> bool:
        return name in self._entries

    def __iter__(self):  # the names, sorted: a registry serves as a config's ``choices`` entry
        return iter(self.names())


def _same(x):
    return x


@dataclass
class AdvInput:
    """What an advantage estimator may read; each family fills the fields it has.

    LM: ``rewards`` [N] one per completion, every process's rows in rank order (group statistics
    are the whole batch's); ``mask``, ``values``, ``kl`` [n, C] this process's rows; ``local`` /
    ``gather`` move between the two (``reduce`` sums over processes). Gym: ``rewards``,
    ``values``, ``next_values``, ``terminated``, ``dones`` [N envs, T steps]; ``last_value`` [N]
    V of the observation after the rollout.
    """

    rewards: Tensor
    mask: Tensor | None = None            # [n, C] tokens the policy wrote (LM)
    values: Tensor | None = None          # V(s_t), [n, C] or [N, T] (None: no critic)
    valid: Tensor | None = None           # [N] bool: rows a reward function scored (None: all)
    group_size: int = 1                   # completions per prompt, contiguous (grpo, rloo)
    gamma: float = 1.0
    gae_lambda: float = 0.95
    scale_rewards: str = "group"          # group_normalize's std: group | batch | none
    kl: Tensor | None = None              # [n, C] per-token KL placed in the reward (times kl_coef)
    kl_coef: float = 0.0
    baseline: Callable | None = None      # moving-average baseline ``b(rewards, valid)`` (LM reinforce)
    next_values: Tensor | None = None     # gym: V(s_{t+1}); V(final obs) on truncation
    terminated: Tensor | None = None      # gym: 1 where the episode ended (no bootstrap)
    dones: Tensor | None = None           # gym: terminated or truncated (the recursion is cut)
    last_value: Tensor | None = None      # gym: [N] V(obs after the rollout)
    local: Callable = _same               # whole-batch rows -> this process's rows
    gather: Callable = _same              # this process's rows -> whole batch
    reduce: Callable = _same              # sum over processes


ADV_ESTIMATORS = Registry("adv_estimator")
POLICY_OBJECTIVES = Registry("objective")
register_adv_est = ADV_ESTIMATORS.register
register_policy_loss = POLICY_OBJECTIVES.register
