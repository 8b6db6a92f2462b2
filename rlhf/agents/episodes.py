"""Multi-turn episodes in a text environment as a rollout source (``rlhf.lm.rollout_record``).

One dataset row is one task seed; ``group_size`` episodes start from ``env.reset(seed=seed)``
(GRPO's group: N episodes of the same task). A turn: the policy acts on the conversation so
far, the environment steps, and its observation comes back as the next user message. Token-in,
token-out: the episode's ids are the first prompt's, then, appended turn by turn, the policy's
sampled ids as they are and the environment's ids (``rlhf.agents.chat_turns``). In the record:

    prompt_ids     the first prompt (instructions + first observation), once per group
    completion_ids every later id: policy turns and environment turns, in order, right-padded
    mask           1 on the policy's ids (its end token included), 0 on the environment's
    attn_mask      1 on every id of the episode, 0 on padding
    rollout_logp   the sampler's log-probs of the policy's ids
    truncated      the episode ran out of its token budget
    reward_inputs  prompts: the first messages; completions: every later message, turn by turn;
                   columns: seed, env_return (the summed reward, penalties included), success,
                   turns, invalid_actions

An episode ends when the environment says terminated or truncated, after ``max_turns`` turns,
when its ids reach ``max_episode_tokens``, or (``invalid_action: end``) at an invalid action.
``choose`` mode acts through ``rlhf.agents.choose``; ``generate`` mode samples free text.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import Tensor

from rlhf.agents.chat_turns import ChatTurns
from rlhf.agents.choose import ChoiceRollout, ChooseTurns
from rlhf.agents.env_loading import env_class, env_factory
from rlhf.errors import UserError
from rlhf.lm.policy import LMPolicy
from rlhf.lm.rollout_record import RewardInputs, Rollout


# what reward functions receive about an episode besides its prompts and completions
EPISODE_COLUMNS = ("seed", "env_return", "success", "turns", "invalid_actions")


@dataclass(frozen=True)
class EpisodeSettings:
    """How episodes run (the agent keys of the recipe, same names)."""

    max_turns: int = 8
    max_turn_tokens: int = 16            # the policy's tokens per turn (generate mode)
    max_episode_tokens: int = 512        # every completion id of the episode, the environment's included
    invalid_action: str = "penalty"      # penalty: add invalid_penalty, the state stays | end: add it, stop
    invalid_penalty: float = -0.1
    action_mode: str = "generate"        # generate | choose
    system_prompt: str | None = None
    choose_score: str = "sum"            # choose mode: sum | mean of an action's token log-probs

    @classmethod
    def of(cls, cfg) -> "EpisodeSettings":
        """The settings an agent recipe (``AgentConfig``) gives."""
        return cls(cfg.max_turns, cfg.max_new_tokens, cfg.max_episode_tokens, cfg.invalid_action,
                   cfg.invalid_penalty, cfg.action_mode, cfg.system_prompt, cfg.choose_score)


@dataclass
class Episode:
    """One episode as it runs: its conversation and its ids since the first prompt."""

    env: object
    seed: int
    messages: list[dict]
    ids: list[int] = field(default_factory=list)
    mask: list[float] = field(default_factory=list)
    logp: list[float] = field(default_factory=list)
    valid_actions: list[str] | None = None
    choices: list = field(default_factory=list)  # choose mode: (start, candidate ids, chosen index)
    ret: float = 0.0
    turns: int = 0
    invalid: int = 0
    done: bool = False
    success: bool = False
    out_of_budget: bool = False

    def append(self, ids: list[int], mask: list[float], logp: list[float]) -> None:
        self.ids += ids
        self.mask += mask
        self.logp += logp


def first_messages(env, seed: int, system_prompt: str | None) -> tuple[list[dict], list[str] | None]:
    """The conversation an episode starts with, and the valid actions of its first state."""
    obs, info = env.reset(seed=seed)
    text = obs_text(obs)
    instructions = getattr(env, "instructions", "")
    messages = [{"role": "system", "content": system_prompt}] if system_prompt else []
    messages.append({"role": "user", "content": f"{instructions}\n\n{text}" if instructions else text})
    return messages, (info or {}).get("valid_actions")


def obs_text(obs) -> str:
    if not isinstance(obs, str):
        raise UserError(f"a text environment's observations must be strings, got {type(obs).__name__}: {obs!r}")
    return obs


@dataclass
class EpisodeSource:
    """The episode rollout source (``RolloutSource``): rows ``{"seed": int}`` in, one
    ``Rollout`` of ``group_size`` episodes per row out (greedy: one)."""

    policy: LMPolicy
    make_env: Callable[[], object]
    group_size: int
    settings: EpisodeSettings

    def __post_init__(self):
        self.chat = ChatTurns(self.policy.tokenizer, self.policy.chat_template_kwargs)

    def __call__(self, rows: list[dict], *, greedy: bool = False, adapter: bool = True,
                 uniforms: Tensor | None = None, group_size: int | None = None) -> Rollout:
        """``group_size``: episodes per row in place of the source's (evaluation: 1)."""
        g = 1 if greedy else group_size or self.group_size
        episodes, prompts = self.start(rows, g)
        act = ChooseTurns(self, prompts, len(episodes), g) if self.settings.action_mode == "choose" else generate_turn
        for turn in range(self.settings.max_turns):
            live = [i for i, e in enumerate(episodes) if not e.done]
            if not live:
                break
            replies = act(self, prompts, episodes, live, g, greedy, adapter, uniforms, turn)
            for i, reply in zip(live, replies):
                self.step(episodes[i], reply)
        return self.record(episodes, prompts, g)

    def start(self, rows: list[dict], g: int) -> tuple[list[Episode], list[list[int]]]:
        """Each row's ``g`` episodes, reset from its seed, and each row's first-prompt ids."""
        episodes, prompts = [], []
        for row in rows:
            group = []
            for _ in range(g):
                env = self.make_env()
                messages, valid = first_messages(env, row["seed"], self.settings.system_prompt)
                group.append(Episode(env, row["seed"], messages, valid_actions=valid))
            if any(e.messages != group[0].messages for e in group):
                raise UserError(f"the environment's reset(seed={row['seed']}) gave different first observations "
                                "within one group; an agent's environment must start the same from the same seed")
            episodes += group
            prompts.append(self.chat.ids(self.chat.render(group[0].messages, True)))
        return episodes, prompts

    def step(self, e: Episode, reply: tuple[str, bool]) -> None:
        """The environment's answer to the policy's ``reply`` (text, ended with the end token),
        and the ids of the environment's turn where the episode goes on."""
        text, ended = reply
        s = self.settings
        e.turns += 1
        if e.out_of_budget and not ended:  # a reply the token budget cut short is not acted on
            e.done = True
            return
        obs, reward, terminated, truncated, info = e.env.step(text)
        info = info or {}
        e.ret += float(reward)
        e.done = bool(terminated or truncated) or e.turns >= s.max_turns or e.out_of_budget
        e.success = bool(info.get("success", terminated and reward > 0))
        if info.get("invalid_action"):
            e.invalid += 1
            e.ret += s.invalid_penalty
            e.done = e.done or s.invalid_action == "end"
        e.valid_actions = info.get("valid_actions", e.valid_actions)
        user = {"role": "user", "content": obs_text(obs)}
        if not e.done:
            ids = self.chat.ids(self.chat.env_turn_text(e.messages, text, user, ended))
            if len(e.ids) + len(ids) >= s.max_episode_tokens:  # no room left for the policy to act
                e.done = e.out_of_budget = True
            else:
                e.append(ids, [0.0] * len(ids), [0.0] * len(ids))
        e.messages += [{"role": "assistant", "content": text}] + ([user] if user["content"] or not e.done else [])

    def record(self, episodes: list[Episode], prompts: list[list[int]], g: int) -> Rollout:
        """The rollout record of finished ``episodes`` (module docstring)."""
        tok, dev = self.policy.tokenizer, self.policy.device
        enc = tok.pad({"input_ids": prompts}, return_tensors="pt", padding=True)  # left (load_tokenizer)
        width = max(1, max(len(e.ids) for e in episodes))
        n = len(episodes)
        ids = torch.full((n, width), tok.pad_token_id, dtype=torch.long)
        mask, attn, logp = torch.zeros(n, width), torch.zeros(n, width), torch.zeros(n, width)
        for i, e in enumerate(episodes):
            k = len(e.ids)
            ids[i, :k], mask[i, :k], logp[i, :k], attn[i, :k] = (torch.tensor(e.ids, dtype=torch.long),
                                                                torch.tensor(e.mask), torch.tensor(e.logp), 1.0)
        n_first = [len(first_messages_of(e)) for e in episodes]
        inputs = RewardInputs([e.messages[:k] for e, k in zip(episodes, n_first)],
                              [e.messages[k:] for e, k in zip(episodes, n_first)],
                              {"seed": [e.seed for e in episodes], "env_return": [e.ret for e in episodes],
                               "success": [float(e.success) for e in episodes], "turns": [e.turns for e in episodes],
                               "invalid_actions": [e.invalid for e in episodes]})
        roll = Rollout(enc["input_ids"].to(dev), enc["attention_mask"].to(dev), ids.to(dev), mask.to(dev),
                       torch.tensor([e.out_of_budget for e in episodes], device=dev), g, logp.to(dev),
                       attn.to(dev), inputs)
        if self.settings.action_mode == "choose":
            return ChoiceRollout.of(roll, [e.choices for e in episodes], self.settings.choose_score)
        return roll


def first_messages_of(e: Episode) -> list[dict]:
    """The messages of ``e``'s first prompt: up to and including the first user message."""
    k = next(i for i, m in enumerate(e.messages) if m["role"] == "user")
    return e.messages[:k + 1]


def contexts(prompts: list[list[int]], episodes: list[Episode], live: list[int], g: int) -> list[list[int]]:
    """Every id live episodes have seen so far: their group's first prompt, then their own."""
    return [prompts[i // g] + episodes[i].ids for i in live]


def generate_turn(src: EpisodeSource, prompts, episodes, live, g, greedy, adapter, uniforms, turn
                  ) -> list[tuple[str, bool]]:
    """``generate`` mode: each live episode's policy writes a reply of at most ``max_turn_tokens``
    (fewer where its token budget ends first), sampled by the policy's decode loop on its whole
    context; returns each reply's text and whether it ended with the end token."""
    s, policy = src.settings, src.policy
    enc = policy.tokenizer.pad({"input_ids": contexts(prompts, episodes, live, g)}, return_tensors="pt",
                               padding=True)
    u = None
    if uniforms is not None:  # each turn its own slice of the episode's random numbers
        u = uniforms[live, turn * s.max_turn_tokens:(turn + 1) * s.max_turn_tokens]
    roll = policy.generate(enc["input_ids"].to(policy.device), enc["attention_mask"].to(policy.device), 1,
                           s.max_turn_tokens, greedy=greedy, adapter=adapter, uniforms=u)
    replies = []
    for j, i in enumerate(live):
        e = episodes[i]
        keep = roll.mask[j] > 0
        ids, logp = roll.completion_ids[j][keep].tolist(), roll.rollout_logp[j][keep].tolist()
        room = s.max_episode_tokens - len(e.ids)
        if len(ids) > room:
            ids, logp, e.out_of_budget = ids[:room], logp[:room], True
        ended = bool(ids) and ids[-1] in policy.eos_ids
        e.append(ids, [1.0] * len(ids), logp)
        text = policy.tokenizer.decode(ids[:-1] if ended else ids, skip_special_tokens=True)
        replies.append((text, ended))
    return replies


def episode_source(policy: LMPolicy, cfg, held_out: bool = False) -> EpisodeSource:
    """The episode source of an agent recipe; ``held_out``: on its evaluation environments (the
    environment's own ``held_out_kwargs`` where it has them, ``env_kwargs`` and ``eval_env_kwargs``
    over them)."""
    kwargs = {**getattr(env_class(cfg.env), "held_out_kwargs", {}), **cfg.env_kwargs, **cfg.eval_env_kwargs} \
        if held_out else cfg.env_kwargs
    return EpisodeSource(policy, env_factory(cfg.env, kwargs), cfg.group_size, EpisodeSettings.of(cfg))
