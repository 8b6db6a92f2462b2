"""The sampler's KV cache: keys and values written in place into a buffer sized for the rollout.

Where a faster decode path (a static cache, fixed shapes for CUDA graphs) would change the
cache, it changes here; the decode loop (``rlhf.lm.sampler``) uses transformers' cache API
only (``update``, ``batch_select_indices``, ``batch_repeat_interleave``).
"""
from __future__ import annotations

from torch import Tensor
from transformers.cache_utils import DynamicLayer


class InPlaceLayer(DynamicLayer):
    """A KV-cache layer for decoding whose keys and values live in a buffer with room for
    ``extra`` more tokens: each step writes its slot, where transformers' DynamicLayer
    concatenates (copies) the whole cache of every layer at every step."""

    def __init__(self, layer: DynamicLayer, extra: int):
        super().__init__()
        k, v = layer.keys, layer.values
        b, h, n, d = k.shape
        self.kbuf, self.vbuf = k.new_empty(b, h, n + extra, d), v.new_empty(b, h, n + extra, d)
        self.kbuf[:, :, :n], self.vbuf[:, :, :n] = k, v
        self.n = n
        self.dtype, self.device, self.is_initialized = k.dtype, k.device, True
        self._views()

    def _views(self) -> None:
        self.keys, self.values = self.kbuf[:, :, :self.n], self.vbuf[:, :, :self.n]

    def update(self, key_states: Tensor, value_states: Tensor, *args, **kwargs) -> tuple[Tensor, Tensor]:
        m = self.n + key_states.shape[-2]
        self.kbuf[:, :, self.n:m] = key_states
        self.vbuf[:, :, self.n:m] = value_states
        self.n = m
        self._views()
        return self.keys, self.values

    def batch_select_indices(self, indices: Tensor) -> None:
        self.kbuf, self.vbuf = self.kbuf[indices], self.vbuf[indices]
        self._views()

    def batch_repeat_interleave(self, repeats: int) -> None:
        self.kbuf = self.kbuf.repeat_interleave(repeats, 0)
        self.vbuf = self.vbuf.repeat_interleave(repeats, 0)
        self._views()
