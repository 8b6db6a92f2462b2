"""``choose`` mode: the language model as a discrete gym policy (TWOSOME, arXiv 2401.14151;
GLAM, arXiv 2302.02662). At each turn the valid actions a_1..a_K are scored by the model's
log-probability of each one's text as the whole reply (its tokens, then the end token):

    s_k = sum_j log p(a_k[j] | context, a_k[<j])       pi(a_k) = exp(s_k) / sum_m exp(s_m)

and one action is drawn from pi. In the record an action is one draw: its first token carries
mask 1 and log pi(a) (the rest of its tokens: mask 0, attended), so the loss, ratios, KL and
PPO's value (V at the state before the action) are per action, as for a gym policy.

The sampler and the trainer score with the same function (``candidate_logps``): one decoder
pass per batch, every candidate of every turn behind its row's ids, attending to the context up
to its turn only.
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
    ``owner[row]``: its prompt). With ``values``: V [M] at the state before the candidate.

    One decoder pass: each row's candidates ride behind its sequence, every candidate token
    attending to its row's ids before its turn and to its own earlier tokens only (a 4-D mask),
    placed at the positions it would have right after its turn: the log-probs a plain forward
    over ``context + candidate`` gives, for every candidate of every turn at once."""
    decoder = net.model.get_base_model().get_decoder()
    dev, lp_len = completion_ids.device, prompt_ids.shape[1]
    ctx_ids = torch.cat([prompt_ids[owner], completion_ids], 1)
    ctx_attn = torch.cat([prompt_mask[owner], attn_mask.to(prompt_mask.dtype)], 1).bool()
    rows_n, width = ctx_ids.shape
    where, extra = candidate_slots(entries, rows_n)
    total = width + extra
    ids = torch.cat([ctx_ids, torch.zeros(rows_n, extra, dtype=torch.long, device=dev)], 1)
    pos = torch.cat([positions(ctx_attn.long()), torch.zeros(rows_n, extra, dtype=torch.long, device=dev)], 1)
    allowed = torch.zeros(rows_n, total, total, dtype=torch.bool, device=dev)
    causal = torch.ones(width, width, dtype=torch.bool, device=dev).tril()
    allowed[:, :width, :width] = causal[None] & ctx_attn[:, None, :]
    real_before = prompt_mask[owner].sum(-1)  # real prompt ids of each row
    for (r, start, c), off in zip(entries, where):
        n = len(c) - 1
        if n == 0:
            continue
        q = torch.arange(width + off, width + off + n, device=dev)
        ids[r, q] = torch.tensor(c[:-1], device=dev)
        pos[r, q] = real_before[r] + start + torch.arange(n, device=dev)
        allowed[r, q, :lp_len + start] = ctx_attn[r, :lp_len + start]
        allowed[r, q[:, None], q[None, :]] = torch.ones(n, n, dtype=torch.bool, device=dev).tril()
    allowed |= torch.eye(total, dtype=torch.bool, device=dev)  # (padding attends to itself: no empty row)
    dtype = next(decoder.parameters()).dtype
    mask4 = torch.zeros(rows_n, 1, total, total, dtype=dtype, device=dev).masked_fill(
        ~allowed[:, None], torch.finfo(dtype).min)
    with contextlib.nullcontext() if adapter else net.model.disable_adapter():
        hidden_all = decoder(input_ids=ids, attention_mask=mask4, position_ids=pos).last_hidden_state
    # the hidden states predicting each candidate's ids: its turn's last context id, then its own inputs
    at_rows, at_cols = [], []
    for (r, start, c), off in zip(entries, where):
        at_rows += [r] * len(c)
        at_cols += [lp_len + start - 1] + list(range(width + off, width + off + len(c) - 1))
    states = hidden_all[torch.tensor(at_rows, device=dev), torch.tensor(at_cols, device=dev)]
    seq = sequence_logps(net, states, entries, adapter)
    vals = None
    if values and net.value_head is not None:
        first = hidden_all[torch.tensor([r for r, _, _ in entries], device=dev),
                           torch.tensor([lp_len + s - 1 for _, s, _ in entries], device=dev)]
        vals = net.value_head(first.float()).squeeze(-1)
    return seq, vals


def candidate_slots(entries: list[tuple[int, int, list[int]]], rows: int) -> tuple[list[int], int]:
    """Where each candidate's inputs go in its row's block behind the row's ids (its ids but the
    last: its first id is predicted by its turn's last context id), and the widest block."""
    block, where = [0] * rows, []
    for r, _, c in entries:
        where.append(block[r])
        block[r] += len(c) - 1
    return where, max(block)


def sequence_logps(net: PolicyNet, states: Tensor, entries: list[tuple[int, int, list[int]]],
                   adapter: bool = True) -> Tensor:
    """Each entry's sequence log-prob [M]: the sum of its ids' log-probs, read from ``states``
    [sum of the entries' lengths, d], the hidden states predicting them, entry after entry."""
    dev = states.device
    targets = torch.tensor([t for _, _, c in entries for t in c], device=dev)
    owners = torch.tensor([j for j, (_, _, c) in enumerate(entries) for _ in c], device=dev)
    lp = net.token_logprobs(states, targets, adapter)
    return torch.zeros(len(entries), dtype=lp.dtype, device=dev).index_add(0, owners, lp)


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


class ChooseTurns:
    """``choose`` mode's turns over one batch of episodes on one growing KV cache: each turn the
    decoder reads only the ids that are new since the last turn (the first prompt, then the
    chosen action's and the environment's ids), and the candidates ride behind the cache without
    staying in it. The scores are ``candidate_logps``' (the training forward's) up to rounding:
    the same ids at the same positions, attending to the same ids."""

    def __init__(self, src, prompts: list[list[int]], n: int, g: int):
        self.src, self.prompts, self.g = src, prompts, g
        policy: LMPolicy = src.policy
        self.decoder = policy.net.model.get_base_model().get_decoder()
        self.dev = policy.device
        self.cache = DynamicCache(config=policy.net.model.config)
        self.keys = torch.zeros(n, 0, dtype=torch.bool, device=self.dev)  # the cache's real ids
        self.fed = [0] * n                               # ids of each episode in the cache
        self.last = [None] * n                           # the hidden state after each one's last fed id
        self.dtype = next(self.decoder.parameters()).dtype

    def run(self, ids: Tensor, attend: Tensor, pos: Tensor) -> Tensor:
        """The decoder on ``ids`` [N, W] behind the cache: ``attend`` [N, W, W] among the new
        ids, every real cached id seen; returns the hidden states [N, W, d]."""
        allowed = torch.cat([self.keys[:, None].expand(-1, ids.shape[1], -1), attend], 2)
        allowed[:, :, self.keys.shape[1]:] |= torch.eye(ids.shape[1], dtype=torch.bool, device=self.dev)
        mask = torch.zeros(allowed.shape, dtype=self.dtype, device=self.dev).masked_fill(
            ~allowed, torch.finfo(self.dtype).min)[:, None]
        return self.decoder(input_ids=ids, attention_mask=mask, position_ids=pos, past_key_values=self.cache,
                            use_cache=True).last_hidden_state

    def feed(self, episodes, live: list[int]) -> None:
        """The live episodes' new ids into the cache (right-padded into one block)."""
        new = {i: (self.prompts[i // self.g] + episodes[i].ids)[self.fed[i]:] for i in live}
        width = max(len(x) for x in new.values())
        n = len(self.fed)
        ids = torch.full((n, width), self.src.policy.tokenizer.pad_token_id, dtype=torch.long)
        real = torch.zeros(n, width, dtype=torch.bool)
        for i, x in new.items():
            ids[i, :len(x)], real[i, :len(x)] = torch.tensor(x, dtype=torch.long), True
        ids, real = ids.to(self.dev), real.to(self.dev)
        pos = self.keys.sum(-1, keepdim=True) + torch.arange(width, device=self.dev)
        hidden = self.run(ids, torch.ones(width, width, dtype=torch.bool, device=self.dev).tril()[None] &
                          real[:, None, :], pos)
        self.keys = torch.cat([self.keys, real], 1)
        for i, x in new.items():
            self.fed[i] += len(x)
            self.last[i] = hidden[i, len(x) - 1]

    def scores(self, episodes, live: list[int], entries: list[tuple[int, int, list[int]]]) -> Tensor:
        """Sequence log-probs [M] of ``entries`` (episode index, -, candidate ids), each after
        its episode's ids so far."""
        self.feed(episodes, live)
        net, n = self.src.policy.net, len(self.fed)
        where, width = candidate_slots(entries, n)
        hidden = None
        if width:  # the candidates' own ids behind the cache, each seeing its earlier ids only
            ids = torch.zeros(n, width, dtype=torch.long, device=self.dev)
            attend = torch.zeros(n, width, width, dtype=torch.bool, device=self.dev)
            pos = self.keys.sum(-1, keepdim=True).repeat(1, width)
            for (i, _, c), off in zip(entries, where):
                k = len(c) - 1
                ids[i, off:off + k] = torch.tensor(c[:-1], device=self.dev)
                pos[i, off:off + k] += torch.arange(k, device=self.dev)
                attend[i, off:off + k, off:off + k] = torch.ones(k, k, dtype=torch.bool, device=self.dev).tril()
            held = self.keys.shape[1]
            hidden = self.run(ids, attend, pos)
            for layer in self.cache.layers:  # the candidates leave the cache again
                layer.keys, layer.values = layer.keys[:, :, :held], layer.values[:, :, :held]
        states = [s for (i, _, c), off in zip(entries, where)
                  for s in [self.last[i][None]] + ([hidden[i, off:off + len(c) - 1]] if len(c) > 1 else [])]
        return sequence_logps(net, torch.cat(states), entries, self.adapter)

    def __call__(self, src, prompts, episodes, live, g, greedy, adapter, uniforms, turn) -> list[tuple[str, bool]]:
        """One turn of the live episodes: score each one's valid actions, draw one (greedy: the
        most likely), append its ids (mask 1 and log pi(a) on its first token only)."""
        policy: LMPolicy = src.policy
        eos = policy.eos_ids[0] if policy.tokenizer.eos_token_id is None else policy.tokenizer.eos_token_id
        entries, names, rows = [], {}, {}
        for i in live:
            e = episodes[i]
            if not e.valid_actions:
                raise UserError("action_mode: choose needs the environment to name its valid actions "
                                "(info['valid_actions'] from reset and step); this one does not")
            names[i], rows[i] = e.valid_actions, len(entries)
            entries += [(i, len(e.ids), c) for c in reply_ids(policy.tokenizer, e.valid_actions, eos)]
        policy.eval_mode()
        self.adapter = adapter
        with torch.no_grad(), policy.sampling_context(), \
                contextlib.nullcontext() if adapter else policy.net.model.disable_adapter():
            seq = self.scores(episodes, live, entries)
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

    def select_rows(self, rows: Tensor) -> "ChoiceRollout":
        """A micro-batch's rows, their turns with them (a plain ``Rollout`` would be scored as
        generated text)."""
        return ChoiceRollout.of(super().select_rows(rows), [self.choices[r] for r in rows.tolist()], self.score)


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
