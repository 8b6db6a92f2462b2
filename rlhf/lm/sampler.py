"""The sampler: the decode loop that writes a single-turn completion per row, token by token.

A prompt runs through the model once; its KV cache is repeated for the G completions of its
group and grows in place (``rlhf.lm.kv_cache``). Rows that have ended (an end token, a stop
string) leave the batch, so later tokens cost only live rows. Each token is drawn from the
temperature-scaled, optionally truncated (top_k / top_p / min_p) distribution, and its
log-prob under exactly that distribution is kept: the record's ``rollout_logp``.

This is where a faster decode engine plugs in: anything that fills the same ``Rollout``
(``rlhf.lm.rollout_record``) from the same ``DecodeSettings`` is a drop-in source.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from rlhf.core import sample_categorical
from rlhf.core.logprobs import Truncation, truncation_mask, wide_dtype
from rlhf.lm.forward import positions
from rlhf.lm.kv_cache import InPlaceLayer
from rlhf.lm.rollout_record import Rollout


@dataclass(frozen=True)
class DecodeSettings:
    """How tokens are drawn and where a completion ends: the sampling temperature, the
    truncation of the distribution, the end-token ids, the padding id, stop strings (which
    need the tokenizer to be seen)."""

    temperature: float
    truncation: Truncation
    eos_ids: tuple[int, ...]
    pad_id: int
    stop: tuple[str, ...] = ()
    tokenizer: object = None


def decode_buffers(prompt_ids: Tensor, g: int, max_new_tokens: int, s: DecodeSettings, uniforms: Tensor | None):
    """What both decode paths start from: the row count, the device, the end-token ids, the token
    and log-prob buffers [N, max_new_tokens], and the per-row uniforms on the device."""
    n, dev = prompt_ids.shape[0] * g, prompt_ids.device
    eos = torch.tensor(s.eos_ids, device=dev)
    tokens = torch.full((n, max_new_tokens), s.pad_id, dtype=torch.long, device=dev)
    logps = torch.zeros(n, max_new_tokens, device=dev)
    if uniforms is not None:  # (float64 from the CPU's generators: float32 on an accelerator)
        uniforms = uniforms.to(dev, wide_dtype(dev))
    return n, dev, eos, tokens, logps, uniforms


@torch.no_grad()
def decode(model, prompt_ids: Tensor, prompt_mask: Tensor, g: int, max_new_tokens: int, s: DecodeSettings,
           greedy: bool = False, uniforms: Tensor | None = None) -> Rollout:
    """Sample ``g`` completions per prompt (a group's rows contiguous) of at most
    ``max_new_tokens``; ``greedy`` takes the argmax. ``uniforms`` [N, max_new_tokens] in [0, 1):
    the random numbers of each row's draws (default: torch's global generator)."""
    n, dev, eos, tokens, logps, uniforms = decode_buffers(prompt_ids, g, max_new_tokens, s, uniforms)
    out = prefill(model, prompt_ids, prompt_mask)
    cache = out.past_key_values
    cache.batch_repeat_interleave(g)
    cache.layers = [InPlaceLayer(layer, max_new_tokens) for layer in cache.layers]
    logits = out.logits[:, -1].repeat_interleave(g, 0)
    attn = prompt_mask.repeat_interleave(g, 0)
    live = torch.arange(n, device=dev)  # rows still generating
    stopped = torch.full((n,), -1, dtype=torch.long)  # where a stop string ended a row
    steps = 0
    for t in range(max_new_tokens):
        nxt, logps[live, t] = draw(logits, s, greedy, None if uniforms is None else uniforms[live, t])
        tokens[live, t] = nxt
        steps = t + 1
        ended = torch.isin(nxt, eos)
        if s.stop:
            ended = ended | stop_hit(s, tokens, live, t, stopped)
        if t == max_new_tokens - 1 or bool(ended.all()):
            break
        if bool(ended.any()):  # drop finished rows from the batch and the cache
            keep = (~ended).nonzero().squeeze(-1)
            cache.batch_select_indices(keep)
            live, nxt, attn = live[keep], nxt[keep], attn[keep]
        attn = torch.cat([attn, torch.ones(len(live), 1, dtype=attn.dtype, device=dev)], dim=1)
        out = model(input_ids=nxt[:, None], attention_mask=attn, past_key_values=cache,
                    position_ids=attn.sum(-1, keepdim=True) - 1, use_cache=True)
        logits = out.logits[:, -1]
    return record(prompt_ids, prompt_mask, tokens[:, :steps], logps[:, :steps], stopped, g, s)


def prefill(model, prompt_ids: Tensor, prompt_mask: Tensor):
    """The prompts' one pass: their KV cache (``out.past_key_values``) and the logits of their
    last position (``out.logits`` [P, 1, V]), from which the first tokens are drawn."""
    return model(input_ids=prompt_ids, attention_mask=prompt_mask, position_ids=positions(prompt_mask),
                 use_cache=True, logits_to_keep=1)


def draw(logits: Tensor, s: DecodeSettings, greedy: bool, uniform: Tensor | None) -> tuple[Tensor, Tensor]:
    """One token per row from ``logits`` [B, V] (the argmax when ``greedy``) and its log-prob
    under the distribution it was drawn from: temperature-scaled, truncated (top_k / top_p /
    min_p), in fp32. ``uniform`` [B]: the rows' random numbers (None: torch's generator)."""
    x = logits.float()
    if s.temperature != 1.0:
        x = x / s.temperature
    top = x.amax(-1, keepdim=True)
    e = torch.exp(x - top)  # unnormalised probabilities
    if s.truncation.active:  # top_k / top_p / min_p: the rest get probability 0
        e = e * truncation_mask(x, s.truncation)
    nxt = x.argmax(-1) if greedy else sample_categorical(e, uniform=uniform)
    return nxt, x.gather(-1, nxt[:, None]).squeeze(-1) - top.squeeze(-1) - e.sum(-1).log()


def record(prompt_ids, prompt_mask, tokens: Tensor, logps: Tensor, stopped: Tensor, g: int,
            s: DecodeSettings) -> Rollout:
    """The rollout of the sampled ``tokens`` [N, steps]: mask up to each row's end token or the
    last token of its stop string; a row a stop string ended is not truncated."""
    dev, steps = tokens.device, tokens.shape[1]
    mask, truncated = completion_mask(tokens, list(s.eos_ids))
    if s.stop and bool((stopped >= 0).any()):  # tokens after a stop string's last one
        rows = (stopped >= 0).nonzero().squeeze(-1)
        after = torch.arange(steps)[None, :] > stopped[rows, None]
        mask[rows.to(dev)] = mask[rows.to(dev)] * (~after).to(dev, mask.dtype)
        truncated[rows.to(dev)] = False
    return Rollout(prompt_ids, prompt_mask, tokens, mask, truncated, g, logps * mask)


def stop_hit(s: DecodeSettings, tokens: Tensor, live: Tensor, t: int, stopped: Tensor) -> Tensor:
    """Bool [len(live)]: the token just sampled (position ``t``) completes a stop string in
    its row; records ``t`` in ``stopped``. Decodes only the last few tokens: enough for the
    longest stop string (a token is at least one byte, a character at most four)."""
    width = 4 * max(len(x) for x in s.stop) + 1
    tails = s.tokenizer.batch_decode(tokens[live, max(0, t - width + 1):t + 1].tolist())
    hit = torch.tensor([any(x in text for x in s.stop) for text in tails], dtype=torch.bool)
    stopped[live.cpu()[hit]] = t
    return hit.to(live.device)


def completion_mask(completion: Tensor, eos_ids: list[int]) -> tuple[Tensor, Tensor]:
    """1 on tokens up to and including the first EOS, 0 after it. Returns (mask, truncated)."""
    is_eos = torch.isin(completion, torch.tensor(eos_ids, device=completion.device))
    seen_before = (is_eos.cumsum(-1) - is_eos.long()) > 0  # an EOS strictly earlier
    return (~seen_before).float(), ~is_eos.any(-1)


def eos_ids(tokenizer, model) -> list[int]:
    """The ids that end a completion: the tokenizer's end token and the model's generation
    config's ones."""
    ids = {tokenizer.eos_token_id}
    cfg_eos = getattr(model.generation_config, "eos_token_id", None)
    ids.update(cfg_eos if isinstance(cfg_eos, list) else [cfg_eos])
    return sorted(i for i in ids if i is not None)
