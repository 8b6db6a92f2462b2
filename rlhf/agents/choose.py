"""``choose`` mode: the language model as a discrete gym policy (TWOSOME, arXiv 2401.14151;
GLAM, arXiv 2302.02662). At each turn the valid actions a_1..a_K are scored by the model's
log-probability of each one's text as the whole reply (its tokens, then the end token):

    s_k = sum_j log p(a_k[j] | context, a_k[<j])       pi(a_k) = exp(s_k) / sum_m exp(s_m)

and one action is drawn from pi. In the record an action is one draw: its first token carries
mask 1 and log pi(a) (the rest of its tokens: mask 0, attended), so the loss, ratios, KL and
PPO's value (V at the state before the action) are per action, as for a gym policy.

The sampler and the trainer score with the same function (``candidate_logps``): each context
runs once through the decoder, and every candidate of every turn runs on top of its cached
keys and values, attending to the context up to its turn only.
"""
from __future__ import annotations

import contextlib

import torch
from torch import Tensor
from transformers import DynamicCache

from rlhf.core import sample_categorical
from rlhf.errors import UserError
from rlhf.lm.forward import PolicyNet, positions
from rlhf.lm.policy import LMPolicy
from rlhf.lm.rollout_record import Rollout


def candidate_logps(net: PolicyNet, prompt_ids: Tensor, prompt_mask: Tensor, owner: Tensor, completion_ids: Tensor,
                    attn_mask: Tensor, entries: list[tuple[int, int, list[int]]], adapter: bool = True,
                    values: bool = False) -> tuple[Tensor, Tensor | None]:
    """Sequence log-probs [M] of the candidate replies ``entries`` = (row, start, ids): ``ids``
    placed at completion position ``start`` of ``row`` (after ``completion_ids[row, :start]``;
    ``owner[row]``: its prompt). With ``values``: V [M] at the state before the candidate."""
    decoder = net.model.get_base_model().get_decoder()
    lp_len = prompt_ids.shape[1]
    rows = torch.tensor([r for r, _, _ in entries], device=completion_ids.device)
    starts = torch.tensor([s for _, s, _ in entries], device=completion_ids.device)
    width = max(len(c) for _, _, c in entries)
    cand = torch.zeros(len(entries), width, dtype=torch.long, device=completion_ids.device)
    cmask = torch.zeros(len(entries), width, device=completion_ids.device)
    for j, (_, _, c) in enumerate(entries):
        cand[j, :len(c)], cmask[j, :len(c)] = torch.tensor(c), 1.0
    with contextlib.nullcontext() if adapter else net.model.disable_adapter():
        attn = torch.cat([prompt_mask[owner], attn_mask.to(prompt_mask.dtype)], 1)
        full = decoder(input_ids=torch.cat([prompt_ids[owner], completion_ids], 1), attention_mask=attn,
                       position_ids=positions(attn), use_cache=True)
        first = full.last_hidden_state[rows, lp_len + starts - 1]           # predicts each candidate's token 0
        hidden = first[:, None]
        if width > 1:  # the candidates' own tokens, on the row's cache cut at their turn
            cache = DynamicCache(ddp_cache_data=[(k[rows], v[rows]) for k, v, *_ in full.past_key_values],
                                 config=net.model.config)
            seen = attn[rows] * (torch.arange(attn.shape[1], device=attn.device)[None] < lp_len + starts[:, None])
            at = prompt_mask[owner[rows]].sum(-1, keepdim=True) + starts[:, None]
            rest = decoder(input_ids=cand[:, :-1], past_key_values=cache, use_cache=True,
                           attention_mask=torch.cat([seen, cmask[:, :-1].to(seen.dtype)], 1),
                           position_ids=at + torch.arange(width - 1, device=at.device))
            hidden = torch.cat([hidden, rest.last_hidden_state], 1)
    real = cmask.bool()
    lp = net.token_logprobs(hidden[real], cand[real], adapter)
    seq = torch.zeros(len(entries), dtype=lp.dtype, device=lp.device).index_put((real.nonzero()[:, 0],), lp,
                                                                                accumulate=True)
    vals = net.value_head(first.float()).squeeze(-1) if values and net.value_head is not None else None
    return seq, vals


def action_logprobs(seq: Tensor, cands: list[list[int]], score: str = "sum") -> Tensor:
    """log pi [K] over one turn's actions from their sequence log-probs ``seq`` [K]: ``sum`` scores
    an action by its text's log-prob; ``mean`` by its mean per token (TWOSOME's token
    normalisation: a longer action's text is not less likely for being longer)."""
    if score == "mean":
        seq = seq / torch.tensor([len(c) for c in cands], dtype=seq.dtype, device=seq.device)
    return torch.log_softmax(seq, -1)


def reply_ids(tokenizer, names: list[str], eos_id: int) -> list[list[int]]:
    """Each action's text as a whole reply: its tokens, then the end token."""
    return [tokenizer(n, add_special_tokens=False).input_ids + [eos_id] for n in names]


def choose_turn(src, prompts, episodes, live, g, greedy, adapter, uniforms, turn) -> list[tuple[str, bool]]:
    """One ``choose`` turn of the live episodes: score each one's valid actions, draw one (greedy:
    the most likely), append its ids (mask 1 and log pi(a) on its first token only)."""
    policy: LMPolicy = src.policy
    eos = policy.eos_ids[0] if policy.tokenizer.eos_token_id is None else policy.tokenizer.eos_token_id
    entries, names, rows = [], {}, {}
    for j, i in enumerate(live):
        e = episodes[i]
        if not e.valid_actions:
            raise UserError("action_mode: choose needs the environment to name its valid actions "
                            "(info['valid_actions'] from reset and step); this one does not")
        names[i], rows[i] = e.valid_actions, len(entries)
        entries += [(j, len(e.ids), c) for c in reply_ids(policy.tokenizer, e.valid_actions, eos)]
    comp, cattn = right_pad([episodes[i].ids for i in live], policy.tokenizer.pad_token_id)
    prompt_ids, prompt_mask = left_pad(prompts, policy.tokenizer.pad_token_id)
    owner = torch.tensor([i // g for i in live])
    policy.eval_mode()
    dev = policy.device
    with torch.no_grad(), policy.sampling_context():
        seq, _ = candidate_logps(policy.net, prompt_ids.to(dev), prompt_mask.to(dev), owner.to(dev), comp.to(dev),
                                 cattn.to(dev), entries, adapter)
    replies = []
    for i in live:
        e, k = episodes[i], len(names[i])
        cands = [c for _, _, c in entries[rows[i]:rows[i] + k]]
        logits = action_logprobs(seq[rows[i]:rows[i] + k].double(), cands, src.settings.choose_score)
        u = None if uniforms is None else uniforms[i, turn:turn + 1]
        a = int(logits.argmax()) if greedy else int(sample_categorical(logits.exp()[None], uniform=u)[0])
        ids = entries[rows[i] + a][2]
        e.choices.append((len(e.ids), cands, a))
        e.append(ids, [1.0] + [0.0] * (len(ids) - 1), [float(logits[a])] + [0.0] * (len(ids) - 1))
        if len(e.ids) >= src.settings.max_episode_tokens:
            e.out_of_budget = True
        replies.append((names[i][a], True))
    return replies


def right_pad(rows: list[list[int]], pad: int) -> tuple[Tensor, Tensor]:
    width = max(1, max(len(r) for r in rows))
    ids, attn = torch.full((len(rows), width), pad, dtype=torch.long), torch.zeros(len(rows), width)
    for i, r in enumerate(rows):
        ids[i, :len(r)], attn[i, :len(r)] = torch.tensor(r, dtype=torch.long), 1.0
    return ids, attn


def left_pad(rows: list[list[int]], pad: int) -> tuple[Tensor, Tensor]:
    ids, attn = right_pad([r[::-1] for r in rows], pad)
    return ids.flip(1), attn.flip(1).long()


class ChoiceRollout(Rollout):
    """A ``choose`` episode's record: the ``Rollout`` and, per row, its turns as ``(start,
    candidate ids, chosen index)``: what the training forward scores again, with gradients."""

    choices: list = []
    score: str = "sum"  # how an action's tokens score it (``action_logprobs``)

    @classmethod
    def of(cls, roll: Rollout, choices: list, score: str = "sum") -> "ChoiceRollout":
        out = cls(**{f: getattr(roll, f) for f in roll.__dataclass_fields__})
        out.choices, out.score = choices, score
        return out

    def select_groups(self, groups: Tensor) -> "ChoiceRollout":
        rows = self.rows_of(groups).tolist()
        return ChoiceRollout.of(super().select_groups(groups), [self.choices[r] for r in rows], self.score)


def choice_forward(net: PolicyNet, roll: ChoiceRollout, adapter: bool = True, values: bool = False,
                   entropy: bool = False) -> dict[str, Tensor]:
    """The training forward of a ``choose`` record: ``logp`` [N, C] holding log pi(a_t) of each
    chosen action on its first token (0 elsewhere), with ``values`` V(s_t) there, with ``entropy``
    the entropy of pi at each turn there (detached)."""
    entries, turns = [], []  # turns: (row, start, first entry, K, chosen)
    for r, row_choices in enumerate(roll.choices):
        for start, cands, chosen in row_choices:
            turns.append((r, start, len(entries), len(cands), chosen))
            entries += [(r, start, c) for c in cands]
    shape, dev = roll.mask.shape, roll.mask.device
    out = {"logp": torch.zeros(shape, device=dev)}
    if values:
        out["values"] = torch.zeros(shape, device=dev)
    if entropy:
        out["entropy"] = torch.zeros(shape, device=dev)
    if not entries:
        return out
    owner = torch.div(torch.arange(len(roll), device=dev), roll.group_size, rounding_mode="floor")
    seq, vals = candidate_logps(net, roll.prompt_ids, roll.prompt_mask, owner, roll.completion_ids, roll.attention,
                                entries, adapter, values)
    at_r = torch.tensor([t[0] for t in turns], device=dev)
    at_s = torch.tensor([t[1] for t in turns], device=dev)
    lps, ents = [], []
    for r, start, first, k, chosen in turns:
        logits = action_logprobs(seq[first:first + k], [c for _, _, c in entries[first:first + k]], roll.score)
        lps.append(logits[chosen])
        ents.append(-(logits.exp() * logits).sum().detach())
    out["logp"] = out["logp"].index_put((at_r, at_s), torch.stack(lps).float())
    if values:
        out["values"] = out["values"].index_put((at_r, at_s), vals[[t[2] + t[4] for t in turns]].float())
    if entropy:
        out["entropy"] = out["entropy"].index_put((at_r, at_s), torch.stack(ents).float())
    return out


class ChoicePolicy(LMPolicy):
    """``LMPolicy`` whose training forward scores a ``choose`` record's actions (``choice_forward``);
    any other record goes through the usual forward. One process: the scoring runs the policy's
    modules directly, outside the wrapper DDP / FSDP would synchronise gradients through."""

    def distribute(self, dist, optimizer, max_grad_norm: float | None = None):
        if dist.world > 1 or dist.kind != "NO":
            raise UserError(f"action_mode: choose trains in one process for now (this run: {dist.kind}, "
                            f"{dist.world} processes); launch it without accelerate, or use action_mode: generate")
        return super().distribute(dist, optimizer, max_grad_norm)

    def forward(self, batch: Rollout, adapter: bool = True, values: bool = False,
                entropy: bool = False) -> dict[str, Tensor]:
        if not isinstance(batch, ChoiceRollout):
            return super().forward(batch, adapter, values, entropy)
        if self.critic_net is not None:
            raise UserError("action_mode: choose trains with critic: shared (the value head on the policy's trunk)")
        return choice_forward(self.net, batch, adapter, values, entropy)
