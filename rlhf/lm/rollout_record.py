"""The rollout record: what every rollout source hands to the loss (DESIGN.md, "A rollout is a
contract, not a sampler").

Who may produce one: any rollout source, that is any function that turns a batch of dataset
rows into a ``Rollout`` (``RolloutSource``). Today's single-turn sampler is one
(``rlhf.lm.rollout.collect`` over ``rlhf.lm.sampler``); a multi-turn episode in an environment
and a faster decode engine on a GPU are others. The trainer never re-tokenises: it runs its
training forward over these exact ids, so a source must hand over the ids it sampled.

Shapes: P prompts, ``group_size`` G completions each, N = P * G rows (a group's rows are
contiguous: row ``i`` belongs to prompt ``i // G``), Lp prompt length, C completion length.

    prompt_ids     [P, Lp] long   left-padded
    prompt_mask    [P, Lp]        1 on the prompt's tokens, 0 on padding
    completion_ids [N, C]  long   everything after the prompt: the policy's tokens and, in a
                                  multi-turn episode, the environment's, right-padded
    mask           [N, C]  float  1 on the tokens the policy itself wrote (its end token
                                  included); 0 on environment tokens and on padding. Loss, KL
                                  and advantages count mask-1 tokens only. NOT a prefix of
                                  ones in general: environment tokens may sit between two
                                  stretches of the policy's tokens.
    attn_mask      [N, C]  float  1 on every completion token the model attends to (the
                                  policy's and the environment's), 0 on padding. None: equal
                                  to ``mask`` (a single-turn sample, where they coincide).
    truncated      [N]     bool   the row hit its token budget without ending
    rollout_logp   [N, C]  float  the sampler's log-probs of its tokens (the distribution it
                                  drew from), 0 where mask is 0; None where a source has none
    reward_inputs                 what reward functions receive (``RewardInputs``), one entry
                                  per row; None where no reward is computed from this record

Devices: the tensors live on the policy's device; ``reward_inputs`` is plain Python.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import torch
from torch import Tensor

from rlhf.core.advantages import last_index  # (where a sequence-level reward lands; re-exported here)


@dataclass
class RewardInputs:
    """What reward functions receive (TRL's contract), one entry per completion row:
    ``prompts`` (text or a conversation), ``completions`` (text, or ``[{"role": "assistant",
    "content": text}]`` for conversations), ``columns`` (every other dataset column, repeated
    for each row of its group)."""

    prompts: list
    completions: list
    columns: dict[str, list] = field(default_factory=dict)

    def select(self, rows: list[int]) -> "RewardInputs":
        return RewardInputs([self.prompts[i] for i in rows], [self.completions[i] for i in rows],
                            {k: [v[i] for i in rows] for k, v in self.columns.items()})


@dataclass
class Rollout:
    """One batch of completions (the LM's version of a gym rollout buffer); fields and their
    contract in the module docstring. Prompts are stored once per group."""

    prompt_ids: Tensor        # [P, Lp] left-padded
    prompt_mask: Tensor       # [P, Lp]
    completion_ids: Tensor    # [N, C] right-padded, N = P * group_size
    mask: Tensor              # [N, C] 1 on the tokens the policy wrote (EOS included)
    truncated: Tensor         # [N] bool: hit its token budget without ending
    group_size: int = 1
    rollout_logp: Tensor | None = None  # [N, C] log-probs as seen while sampling
    attn_mask: Tensor | None = None     # [N, C] 1 on every real completion token; None: ``mask``
    reward_inputs: RewardInputs | None = None

    def __len__(self) -> int:
        return self.completion_ids.shape[0]

    @property
    def attention(self) -> Tensor:
        """[N, C]: the completion tokens the model attends to (the policy's and the environment's)."""
        return self.mask if self.attn_mask is None else self.attn_mask

    def select_groups(self, groups: Tensor) -> "Rollout":
        """The sub-rollout made of whole groups (prompt indices ``groups``)."""
        rows = self.rows_of(groups)
        pick = lambda t: None if t is None else t[rows]  # noqa: E731
        inputs = self.reward_inputs and self.reward_inputs.select(rows.tolist())
        return Rollout(self.prompt_ids[groups], self.prompt_mask[groups], pick(self.completion_ids),
                       pick(self.mask), pick(self.truncated), self.group_size, pick(self.rollout_logp),
                       pick(self.attn_mask), inputs)

    def select_rows(self, rows: Tensor) -> "Rollout":
        """The sub-rollout of completion ``rows`` (a micro-batch): whole groups keep their shared
        prompt (``select_groups``); otherwise every row gets its own copy of its prompt (group_size 1)."""
        g = self.group_size
        owner = torch.div(rows, g, rounding_mode="floor")
        groups = torch.unique_consecutive(owner)
        if len(rows) == len(groups) * g and torch.equal(self.rows_of(groups), rows):
            return self.select_groups(groups)
        pick = lambda t: None if t is None else t[rows]  # noqa: E731
        inputs = self.reward_inputs and self.reward_inputs.select(rows.tolist())
        return Rollout(self.prompt_ids[owner], self.prompt_mask[owner], pick(self.completion_ids), pick(self.mask),
                       pick(self.truncated), 1, pick(self.rollout_logp), pick(self.attn_mask), inputs)

    def rows_of(self, groups: Tensor) -> Tensor:
        """Completion rows of the prompts ``groups``."""
        return (groups[:, None] * self.group_size + torch.arange(self.group_size, device=groups.device)).reshape(-1)

    def last_policy_token(self) -> Tensor:
        """[N] long: the position of each row's last policy token (0 for a row without one):
        where a sequence-level reward lands. Right for any mask, not only a prefix of ones."""
        return last_index(self.mask).clamp(min=0)


def completion_id_lists(roll: Rollout) -> list[list[int]]:
    """Each completion's token ids, its end token included (what reward functions get as
    ``completion_ids``, as in TRL): every real token of the row, the environment's included."""
    return [row[m > 0].tolist() for row, m in zip(roll.completion_ids.cpu(), roll.attention.cpu())]


class RolloutSource(Protocol):
    """A source of rollouts: dataset rows (each with a ``prompt`` and any other columns) in, one
    ``Rollout`` with its ``reward_inputs`` out. ``greedy``: one argmax completion per prompt
    (evaluation); ``adapter=False``: the reference policy acts; ``uniforms``: the random numbers
    of every draw, [N, budget] (``rlhf.lm.rollout.sampling_uniforms``)."""

    def __call__(self, rows: list[dict], *, greedy: bool = False, adapter: bool = True,
                 uniforms: Tensor | None = None) -> Rollout: ...
