"""The fixed-shape decode path (``decode: static``): one static KV cache sized for the rollout,
every row in the batch to the end, and on CUDA each decode position replayed as a CUDA graph.

Why: on a GPU the dynamic sampler (``rlhf.lm.sampler``) is bound by kernel launches, not by
FLOPs or bytes: each decode position is ~30 layers x ~15 kernels plus Python (docs/speed.md,
"One GPU"). A CUDA graph replays all of a position's kernels in one launch, but only for
fixed shapes and fixed addresses, so here

- the cache is transformers' ``StaticCache`` [N, H, Lp + max_new_tokens, D] per layer, filled
  with the prompts' keys and values (one prefill per prompt, repeated for its group) and
  written in place at one slot per position (``StaticLayer.update``: ``index_copy_`` at a
  device-side length, so a replay advances it);
- rows that have ended stay in the batch: they keep computing, their tokens are padding and
  their log-probs 0, exactly as the dynamic path records them;
- attention takes a prepared 4-D mask [N, 1, 1, L] (prompt padding and not-yet-written slots
  off) that lives in one buffer and is switched on slot by slot in place.

On the CPU the same step runs eagerly and gives the same tokens as the dynamic path from the
same per-row uniforms, with log-probs within float rounding (batch shape and attention length
differ, so summation orders do). Sampling (``rlhf.lm.sampler.draw``), stop strings and the
record are the sampler's own. ``decode: auto`` takes this path on CUDA and the dynamic one on
the CPU, where rows that leave the batch save work and no launch overhead is there to save
(docs/speed.md, "The decode path").
"""
from __future__ import annotations

import contextlib
import warnings

import torch
from torch import Tensor
from transformers.cache_utils import StaticCache, StaticLayer

from rlhf.errors import UserError
from rlhf.lm.rollout_record import Rollout
from rlhf.lm.sampler import DecodeSettings, decode, decode_buffers, draw, prefill, record, stop_hit

DECODE_MODES = ("auto", "dynamic", "static")


def decode_engine(mode: str, device: torch.device | str):
    """The decode function for the recipe's ``decode`` on ``device``: ``dynamic`` (rows leave the
    batch, ``rlhf.lm.sampler.decode``), ``static`` (this module, strict: a CUDA graph that cannot
    be captured is an error), ``auto`` (static on CUDA, falling back to eager fixed shapes with a
    warning if capture fails; dynamic elsewhere). All take ``decode``'s arguments."""
    if mode not in DECODE_MODES:
        raise UserError(f"decode {mode!r} is not one of {', '.join(DECODE_MODES)}; use auto (static on CUDA, "
                        "dynamic on the CPU), dynamic or static")
    if mode == "dynamic" or (mode == "auto" and torch.device(device).type != "cuda"):
        return decode
    strict = mode == "static"
    return lambda *args, **kw: decode_static(*args, **kw, strict=strict)


@torch.no_grad()
def decode_static(model, prompt_ids: Tensor, prompt_mask: Tensor, g: int, max_new_tokens: int,
                  s: DecodeSettings, greedy: bool = False, uniforms: Tensor | None = None,
                  graph: bool | None = None, strict: bool = True) -> Rollout:
    """``rlhf.lm.sampler.decode``'s contract on fixed shapes. ``graph``: capture the decode step
    as a CUDA graph (default: on CUDA); ``strict``: a failed capture raises (else: a warning and
    the same fixed-shape step run eagerly; a model with sliding-window layers, which the static
    cache here does not hold, is decoded by the dynamic path)."""
    if not full_attention(model):
        if strict:
            raise UserError("decode: static needs full attention in every layer (this model has sliding-window "
                            "layers); set decode: dynamic or auto")
        return decode(model, prompt_ids, prompt_mask, g, max_new_tokens, s, greedy, uniforms)
    n, dev, eos, tokens, logps, uniforms = decode_buffers(prompt_ids, g, max_new_tokens, s, uniforms)
    out = prefill(model, prompt_ids, prompt_mask)
    step = StaticStep(model, out.past_key_values, prompt_mask, g, max_new_tokens,
                      graph=dev.type == "cuda" if graph is None else graph, strict=strict)
    logits = out.logits[:, -1].repeat_interleave(g, 0)
    done = torch.zeros(n, dtype=torch.bool, device=dev)  # rows that have ended
    stopped = torch.full((n,), -1, dtype=torch.long)  # where a stop string ended a row
    steps = 0
    for t in range(max_new_tokens):
        nxt, lp = draw(logits, s, greedy, None if uniforms is None else uniforms[:, t])
        tokens[:, t] = torch.where(done, s.pad_id, nxt)
        logps[:, t] = torch.where(done, 0.0, lp)
        steps = t + 1
        ended = torch.isin(nxt, eos)
        if s.stop:
            live = (~done).nonzero().squeeze(-1)
            ended[live[stop_hit(s, tokens, live, t, stopped)]] = True
        done |= ended
        if t == max_new_tokens - 1 or bool(done.all()):
            break
        logits = step(tokens[:, t], t)
    return record(prompt_ids, prompt_mask, tokens[:, :steps], logps[:, :steps], stopped, g, s)


def static_cache(model, prompt_cache, g: int, max_new_tokens: int) -> StaticCache:
    """A ``StaticCache`` of ``Lp + max_new_tokens`` slots for N = P * g rows, its first Lp slots
    the prompts' keys and values (``prompt_cache``, the prefill's [P, H, Lp, D] per layer)
    repeated for each row of their group, its length set to Lp."""
    lp = prompt_cache.layers[0].keys.shape[2]
    cache = StaticCache(config=model.config, max_cache_len=lp + max_new_tokens)
    for layer, src in zip(cache.layers, prompt_cache.layers):
        k, v = src.keys.repeat_interleave(g, 0), src.values.repeat_interleave(g, 0)
        layer.lazy_initialization(k, v)
        layer.keys[:, :, :lp] = k
        layer.values[:, :, :lp] = v
        layer.cumulative_length.fill_(lp)
    return cache


def full_attention(model) -> bool:
    """Whether every layer of ``model`` attends to the whole context (transformers' static cache
    gives sliding-window layers a window-sized ring buffer, which this path does not fill)."""
    return all(type(layer) is StaticLayer for layer in StaticCache(config=model.config, max_cache_len=1).layers)


class StaticStep:
    """One decode position over a static cache, on fixed-shape buffers: ``step(tokens, t)`` feeds
    the tokens [N] drawn at position ``t`` and returns the logits [N, V] of position ``t + 1``
    (a view of a buffer the next call overwrites). Every input lives in a buffer written in
    place (ids [N, 1], position ids [N, 1], the mask [N, 1, 1, L]), so on CUDA the model's
    forward is captured once, at the first call, and replayed."""

    def __init__(self, model, prompt_cache, prompt_mask: Tensor, g: int, max_new_tokens: int,
                 graph: bool, strict: bool = True):
        self.model, self.graph, self.strict = model, graph, strict
        self.cache = static_cache(model, prompt_cache, g, max_new_tokens)
        attn = prompt_mask.repeat_interleave(g, 0)
        n, self.lp = attn.shape
        dev = attn.device
        self.ids = torch.zeros(n, 1, dtype=torch.long, device=dev)
        self.base = attn.sum(-1, keepdim=True).long()  # the first new token's position: the prompt's length
        self.pos = self.base.clone()
        self.keep = torch.zeros(n, 1, 1, self.lp + max_new_tokens, dtype=torch.bool, device=dev)
        self.keep[:, 0, 0, :self.lp] = attn.bool()
        # sdpa takes the boolean mask; eager attention adds a float one (0 where attended)
        self.additive = model.config._attn_implementation != "sdpa"
        self.mask = self.keep
        if self.additive:
            dtype = model.get_input_embeddings().weight.dtype
            self.mask = torch.zeros(self.keep.shape, dtype=dtype, device=dev)
            self.mask.masked_fill_(~self.keep, torch.finfo(dtype).min)
        self.captured, self.out = None, None

    def __call__(self, tokens: Tensor, t: int) -> Tensor:
        self.ids.copy_(tokens[:, None])
        self.pos.copy_(self.base + t)
        self.mask[..., self.lp + t] = 0.0 if self.additive else True  # this token's own slot
        if not self.graph:
            return self._forward()
        if self.captured is None:
            self._capture()
        if self.captured is False:  # capture failed, not strict: the same step, eagerly
            return self._forward()
        self.captured.replay()
        return self.out

    def _forward(self) -> Tensor:
        out = self.model(input_ids=self.ids, attention_mask=self.mask, position_ids=self.pos,
                         past_key_values=self.cache, use_cache=True)
        return out.logits[:, -1]

    def _capture(self) -> None:
        """Warm up on a side stream (one eager run, the cache's lengths put back after it: the slot
        it writes is rewritten by the replay), then record the step into a CUDA graph; the
        replay that follows runs this position. Once per rollout: the graph holds the addresses
        of this rollout's cache and of the weights as sampling sees them (an adapter folded in)."""
        lengths = [layer.cumulative_length.clone() for layer in self.cache.layers]
        try:
            with _uncached_autocast():
                self._record_graph(lengths)
        except Exception as err:  # what capture refuses (a host sync in a model's forward) shows here
            for layer, n in zip(self.cache.layers, lengths):
                layer.cumulative_length.copy_(n)
            if self.strict:
                raise UserError(f"decode: static could not capture the decode step as a CUDA graph ({err}); "
                                "set decode: dynamic, or auto to run fixed shapes eagerly") from err
            warnings.warn(f"decode: the CUDA graph capture failed ({err}); decoding eagerly on fixed shapes")
            self.captured = False

    def _record_graph(self, lengths: list[Tensor]) -> None:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            self._forward()
            for layer, n in zip(self.cache.layers, lengths):
                layer.cumulative_length.copy_(n)
        torch.cuda.current_stream().wait_stream(side)
        self.captured = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.captured, capture_error_mode="thread_local"):
            self.out = self._forward()


def _uncached_autocast():
    """Autocast as the caller set it, without its cache of cast weights (a graph must not record
    casts that a later replay would skip): what CUDA-graph capture under autocast needs."""
    if not torch.is_autocast_enabled("cuda"):
        return contextlib.nullcontext()
    return torch.autocast("cuda", dtype=torch.get_autocast_dtype("cuda"), cache_enabled=False)
