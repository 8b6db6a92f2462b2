"""The training forward: log-probs of given token ids (and values, entropy) under the policy.

What the loss differentiates. It takes a rollout's ids as they are (``rlhf.lm.rollout_record``)
and never re-tokenises. Each prompt runs once and its KV cache (autograd graph included) is
shared by the G completions of its group; the LM head runs only on the tokens the policy wrote,
fused with the log-softmax in blocks (``rlhf.core.logprobs``). The reward model's log-ratio
uses the same forward (``rlhf.lm.reward_model``).
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import Tensor
from transformers import DynamicCache

from rlhf.core import entropy_from_logits, linear_logprobs, selective_log_softmax
from rlhf.core.logprobs import Truncation, truncated_linear_logprobs, truncation_mask
from rlhf.lm.rollout_record import last_index


class PolicyNet(torch.nn.Module):
    """The modules that get gradients (LoRA-adapted LM, optional value head) and the training
    forward over a rollout, as one ``nn.Module`` call."""

    def __init__(self, model, value_head, temperature: float):
        super().__init__()
        self.model, self.value_head, self.temperature = model, value_head, temperature
        # full fine-tuning (``model`` a plain causal LM): the frozen reference, held outside the module
        # tree so that DDP / FSDP / optimisers and checkpoints never see it (None: no reference)
        self.reference: tuple = ()
        # the blocks FSDP shards one by one (accelerate's transformer-based wrap policy reads it)
        self._no_split_modules = getattr(base_lm(model), "_no_split_modules", None)
        self.full_sequence = False  # set by gradient checkpointing (no KV cache to share)
        self.truncation = Truncation()  # the sampler's top_k / top_p / min_p (LMPolicy.set_options)
        self.fused_head = True      # LM head + log-softmax in blocks (reads the head's weight directly)
        # what the model's own head does after its linear layer (Cohere, Granite, Gemma-2/3): the
        # sampler sees those logits (``model(...).logits``), so the training log-probs must too
        self.logit_scale, self.logit_softcap = logit_transform(model.config)

    def forward(self, prompt_ids: Tensor, prompt_mask: Tensor, completion_ids: Tensor, mask: Tensor,
                group_size: int = 1, adapter: bool = True, values: bool = False,
                entropy: bool = False, logp: bool = True, owner: Tensor | None = None,
                attn_mask: Tensor | None = None) -> dict[str, Tensor]:
        """``logp=False`` (a separate critic): values only, the LM head is skipped. ``owner`` [N]:
        the prompt of each completion row (default: a group's ``group_size`` rows are contiguous).
        ``mask`` [N, C]: the tokens the policy wrote (log-probs, values, entropy there, 0 elsewhere);
        ``attn_mask`` [N, C]: every completion token attended to (None: ``mask``; a rollout's
        environment tokens are in ``attn_mask`` only).

        Each prompt runs once. Its KV cache (autograd graph included) is gathered for the rows
        of its group, and the completions run on top, in up to two buckets of similar length
        so short answers do not pay for the longest one's padding. The LM head runs only on
        the completion tokens themselves (never on the prompt or padding), fused with the
        log-softmax in blocks of rows (``linear_logprobs``).
        """
        want_hidden = values and self.value_head is not None
        attn_mask = mask if attn_mask is None else attn_mask
        c = completion_ids.shape[1]
        if owner is None:
            owner = torch.div(torch.arange(len(completion_ids), device=completion_ids.device), group_size,
                              rounding_mode="floor")
        lm, context = self.lm(adapter)
        decoder = lm.get_decoder()
        with context:
            if self.full_sequence:  # one plain pass over each row's prompt + completion
                ids = torch.cat([prompt_ids[owner], completion_ids], 1)
                attn = torch.cat([prompt_mask[owner], attn_mask.to(prompt_mask.dtype)], 1)
                res = decoder(input_ids=ids, attention_mask=attn, position_ids=positions(attn))
                hidden = res.last_hidden_state[:, -c - 1:-1]  # position i predicts completion token i
            else:
                prompt = decoder(input_ids=prompt_ids, attention_mask=prompt_mask,
                                 position_ids=positions(prompt_mask), use_cache=True)
                parts, order = [], []
                for rows, width in length_buckets(attn_mask):
                    part = self._completions(decoder, prompt, prompt_mask, completion_ids, attn_mask, owner[rows],
                                             rows, width)
                    parts.append(F.pad(part, (0, 0, 0, c - width)))
                    order.append(rows)
                hidden = torch.cat(parts)[torch.argsort(torch.cat(order))]  # back to the rollout's order
        # the policy's log-probs use the sampler's truncated distribution; the reference's full one
        trunc = self.truncation if adapter else Truncation()
        return self._outputs(hidden, completion_ids, mask, want_hidden, entropy, logp, trunc, lm)

    def lm(self, adapter: bool = True):
        """``(causal LM, context)`` of the policy (``adapter``) or the reference: LoRA's base with
        the adapter on or disabled inside ``context``; in full fine-tuning the trained model or
        the frozen copy."""
        if hasattr(self.model, "disable_adapter"):
            return self.model.get_base_model(), contextlib.nullcontext() if adapter else self.model.disable_adapter()
        if adapter:
            return self.model, contextlib.nullcontext()
        if not self.reference:
            raise ValueError("full fine-tuning without a reference model (kl_coef 0) has no reference log-probs")
        return self.reference[0], contextlib.nullcontext()

    def _completions(self, decoder, prompt, prompt_mask, completion_ids, attn_mask, owner, rows, width):
        """Final hidden states [n, width, d] of the positions that predict completion ``rows``'
        tokens (``owner``: their prompts), run on top of their prompts' cached keys and values.
        Positions count on from the prompt's: a row's real tokens are contiguous, padding last."""
        hidden = prompt.last_hidden_state[owner, -1:]                       # predicts token 0
        if width == 1:
            return hidden
        cache = DynamicCache(ddp_cache_data=[(k[owner], v[owner]) for k, v, *_ in prompt.past_key_values],
                             config=self.model.config)
        p_mask = prompt_mask[owner]
        attn = torch.cat([p_mask, attn_mask[rows, :width - 1]], dim=1)
        rest = decoder(input_ids=completion_ids[rows, :width - 1], attention_mask=attn, past_key_values=cache,
                       use_cache=True, position_ids=p_mask.sum(-1, keepdim=True)
                       + torch.arange(width - 1, device=p_mask.device))
        return torch.cat([hidden, rest.last_hidden_state], dim=1)

    def _outputs(self, hidden: Tensor, completion_ids: Tensor, mask: Tensor, values: bool, entropy: bool,
                 logp: bool, trunc: Truncation = Truncation(), lm=None) -> dict[str, Tensor]:
        """Log-probs (and entropy) of the completion tokens, values, from the hidden states
        [N, C, d] that predict them; zero past each row's end."""
        out = {}
        if logp:
            real = mask.bool()
            head = (lm or base_lm(self.model)).get_output_embeddings()
            lp, ent = self._head(head, hidden[real], completion_ids[real], entropy, trunc)
            out["logp"] = torch.zeros(mask.shape, dtype=lp.dtype, device=lp.device).index_put((real,), lp)
            if entropy:
                out["entropy"] = torch.zeros(mask.shape, dtype=ent.dtype, device=ent.device).index_put((real,), ent)
        if values:  # fp32, under an autocast too
            with torch.autocast(hidden.device.type, enabled=False):
                out["values"] = self.value_head(hidden.float()).squeeze(-1) * mask
        return out

    def token_logprobs(self, hidden: Tensor, ids: Tensor, adapter: bool = True) -> Tensor:
        """Log-probs [M] of ``ids`` [M] from the hidden states [M, d] that predict them, as the
        training forward computes them (sampling temperature; the policy's truncated
        distribution, the reference's full one): for a source that runs the decoder itself
        (an action scored by its text, ``rlhf.agents.choose``)."""
        lm, _ = self.lm(adapter)
        trunc = self.truncation if adapter else Truncation()
        return self._head(lm.get_output_embeddings(), hidden, ids, False, trunc)[0]

    def _head(self, head, hidden: Tensor, ids: Tensor, entropy: bool, trunc: Truncation = Truncation()
              ) -> tuple[Tensor, Tensor | None]:
        """Log-probs [M] of ``ids`` at the sampling temperature (and entropies) from hidden [M, d]
        through the LM ``head``, under the distribution truncated by ``trunc`` (renormalised over
        the kept tokens)."""
        # fused: a plain linear head, and no soft-capping (a scale folds into the temperature)
        fused = self.fused_head and type(head) is torch.nn.Linear and head.bias is None and not self.logit_softcap
        temperature = self.temperature / self.logit_scale
        weight = head.weight
        if fused and torch.is_autocast_enabled(hidden.device.type):  # the sampler's head: a GEMM of the cast
            dt = torch.get_autocast_dtype(hidden.device.type)        # inputs; the chosen logit from the same
            hidden, weight = hidden.to(dt), weight.to(dt)
        if trunc.active and fused:
            return truncated_linear_logprobs(hidden, weight, ids, temperature, trunc, entropy=entropy)
        if trunc.active:  # an adapted or biased head, or capped logits: full logits, masked as the sampler does
            logits = self._logits(head, hidden) / self.temperature
            keep = truncation_mask(logits.detach(), trunc)
            keep[torch.arange(len(ids), device=ids.device), ids] = True
            logits = logits.masked_fill(~keep, float("-inf"))
            ent = None
            if entropy:
                lp_all = torch.log_softmax(logits.detach(), -1)
                ent = -(lp_all.exp() * lp_all.masked_fill(~keep, 0.0)).sum(-1)
            return selective_log_softmax(logits, ids), ent
        if fused:  # in blocks
            return linear_logprobs(hidden, weight, ids, temperature, entropy=entropy)
        logits = self._logits(head, hidden) / self.temperature       # an adapted or biased head, or capped logits
        ent = entropy_from_logits(logits.detach()) if entropy else None
        return selective_log_softmax(logits, ids), ent

    def _logits(self, head, hidden: Tensor) -> Tensor:
        """The model's own logits [M, V] in float32: its head, then its scale and soft-cap."""
        logits = head(hidden).float()
        if self.logit_scale != 1.0:
            logits = logits * self.logit_scale
        if self.logit_softcap:
            logits = self.logit_softcap * torch.tanh(logits / self.logit_softcap)
        return logits


def base_lm(model):
    """The causal LM under a peft model (its LoRA layers in place), or ``model`` itself (full fine-tuning)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def logit_transform(config) -> tuple[float, float | None]:
    """``(scale, softcap)`` of what a causal LM's own forward does to its head's output ``z``:
    ``logits = softcap * tanh(scale * z / softcap)`` (no cap: ``scale * z``). Read from the config:
    Cohere's ``logit_scale`` multiplies, Granite's ``logits_scaling`` divides, Gemma-2/3's
    ``final_logit_softcapping`` caps (None or 0: no cap)."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    scale = float(getattr(text, "logit_scale", None) or 1.0) / float(getattr(text, "logits_scaling", None) or 1.0)
    cap = getattr(text, "final_logit_softcapping", None)
    return scale, float(cap) if cap else None


def length_buckets(mask: Tensor, min_saving: float = 0.2) -> list[tuple[Tensor, int]]:
    """Split rows into at most two buckets by completion length, as ``(rows, width)``, when
    that saves at least ``min_saving`` of the padded positions; else one bucket. A row's length
    runs to its last nonzero ``mask`` entry (its sum, for a mask that is a prefix of ones)."""
    lengths = (last_index(mask) + 1).clamp(min=1).cpu()
    order = torch.argsort(lengths)
    sorted_len = lengths[order]
    n, longest = len(lengths), int(sorted_len[-1])
    costs = [(s * int(sorted_len[s - 1]) + (n - s) * longest, s) for s in range(1, n)]
    best, split = min(costs, default=(n * longest, n))
    if best > (1 - min_saving) * n * longest:
        return [(torch.arange(n, device=mask.device), longest)]
    order = order.to(mask.device)
    return [(order[:split], int(sorted_len[split - 1])), (order[split:], longest)]


def positions(mask: Tensor) -> Tensor:
    """Position ids under left padding: real tokens count from 0."""
    return (mask.cumsum(-1) - 1).clamp(min=0)
