"""The decode loop's KV cache (kv_cache.InPlaceLayer): writes in place, and rows that end leave it
with every other row's keys and values intact."""
import torch
from transformers.cache_utils import DynamicLayer

from rlhf.lm.kv_cache import InPlaceLayer


def test_rows_leave_and_the_rest_keep_their_keys_and_values():
    gen = torch.Generator().manual_seed(0)
    k0, v0 = torch.randn(5, 2, 3, 4, generator=gen), torch.randn(5, 2, 3, 4, generator=gen)
    base = DynamicLayer()
    base.update(k0, v0)
    layer = InPlaceLayer(base, extra=4)
    ref_k, ref_v, rows = k0, v0, torch.arange(5)
    for keep in ([0, 1, 3, 4], [0, 2, 3], [1, 2], [0]):
        k, v = torch.randn(len(rows), 2, 1, 4, generator=gen), torch.randn(len(rows), 2, 1, 4, generator=gen)
        keys, values = layer.update(k, v)
        ref_k, ref_v = torch.cat([ref_k, k], 2), torch.cat([ref_v, v], 2)
        assert torch.equal(keys, ref_k) and torch.equal(values, ref_v)
        idx = torch.tensor(keep)
        layer.batch_select_indices(idx)
        ref_k, ref_v, rows = ref_k[idx], ref_v[idx], rows[idx]
        assert torch.equal(layer.keys, ref_k) and torch.equal(layer.values, ref_v)
