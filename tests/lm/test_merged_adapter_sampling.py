"""Sampling with the adapter folded into the weights (fast_lora.merged): the same policy up to
fp32 rounding, and the base weights and adapter untouched afterwards."""
import pytest
import torch

from rlhf.lm import fast_lora
from rlhf.tasks import arith_row

from conftest import policy_with_adapter


def _policy(tiny_model, **kw):
    return policy_with_adapter(tiny_model, **kw)  # a non-zero adapter, so merging has something to fold


def _sample(policy):
    ids, attn = policy.encode_prompts([arith_row(12, 34)["prompt"], arith_row(56, 7)["prompt"]])
    u = torch.rand(6, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    return policy.generate(ids, attn, group_size=3, max_new_tokens=8, uniforms=u)


def test_merged_sampling_is_the_same_policy(tiny_model):
    policy = _policy(tiny_model)
    before = {n: p.detach().clone() for n, p in policy.model.named_parameters()}
    params = {n: p for n, p in policy.model.named_parameters()}
    merged = _sample(policy)
    # the weights are the same objects with the same bits afterwards: the reference stays the base
    assert {n: p for n, p in policy.model.named_parameters()} == params
    assert all(torch.equal(p, before[n]) for n, p in policy.model.named_parameters())
    assert all(not m.disable_adapters for m in policy.model.modules() if hasattr(m, "_rlhf_fused"))
    policy.merge_for_sampling = False
    plain = _sample(policy)
    # (W + s B A) x and W x + B (A x) s differ by fp32 rounding only: a few ulps of each logit
    # (|logit| < 10 here: ~1e-6), so the same tokens are drawn unless a uniform falls within
    # that of a CDF boundary (probability ~1e-6 per draw)
    assert torch.equal(merged.completion_ids, plain.completion_ids)
    torch.testing.assert_close(merged.rollout_logp, plain.rollout_logp, atol=1e-5, rtol=0)
    # and the trainer (unmerged, with gradients) reproduces the merged sampler's log-probs
    torch.testing.assert_close(policy.logp(merged).detach(), merged.rollout_logp, atol=1e-4, rtol=0)


def test_merged_restores_the_weights_when_sampling_fails(tiny_model):
    policy = _policy(tiny_model)
    layer = next(m for m in policy.model.modules() if getattr(m, "_rlhf_fused", False))
    weight = layer.base_layer.weight
    with pytest.raises(RuntimeError, match="boom"):
        with fast_lora.merged(policy.model, {}):
            assert layer.base_layer.weight is not weight and layer.disable_adapters
            raise RuntimeError("boom")
    assert layer.base_layer.weight is weight and not layer.disable_adapters


def test_bf16_base_is_not_merged(tiny_model):
    """A bf16 sum W + s B A would round the adapter's small update: the bf16 path keeps the
    fp32 adapter beside the weights."""
    policy = _policy(tiny_model, dtype="bfloat16")
    layer = next(m for m in policy.model.modules() if getattr(m, "_rlhf_fused", False))
    weight = layer.base_layer.weight
    with fast_lora.merged(policy.model, {}):
        assert layer.base_layer.weight is weight and not layer.disable_adapters
