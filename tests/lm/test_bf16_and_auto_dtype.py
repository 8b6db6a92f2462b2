"""dtype: float32 | bfloat16 | auto. Under bf16 the base weights are bf16; the adapter, its
gradients, the log-probs and the loss stay fp32, and the log-probs stay within a bf16 bound of
fp32's. ``auto`` picks bf16 only where the probe finds it faster."""
import pytest
import torch

from rlhf.config import LMConfig
from rlhf.errors import UserError
from rlhf.lm import fast_lora, precision
from rlhf.lm.policy import LMPolicy
from rlhf.tasks import arith_row

from conftest import logp_rounding_bound, policy_with_adapter

U = 2.0 ** -8  # bf16's unit roundoff: 8 significant bits, round to nearest


def _policy(tiny_model, dtype):
    return policy_with_adapter(tiny_model, dtype=dtype)  # same adapter draws for both dtypes


def _rollout(policy):
    rows = [arith_row(12, 34), arith_row(56, 78)]
    ids, attn = policy.encode_prompts([r["prompt"] for r in rows])
    uniforms = torch.rand(6, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    return policy.generate(ids, attn, group_size=3, max_new_tokens=8, uniforms=uniforms)


def _bf16_logp_bound(policy) -> float:
    return logp_rounding_bound(policy, U)


def test_bf16_keeps_adapter_logprobs_and_loss_in_fp32(tiny_model):
    policy = _policy(tiny_model, "bfloat16")
    assert policy.dtype == "bfloat16"
    frozen = {p.dtype for p in policy.model.parameters() if not p.requires_grad}
    trainable = {p.dtype for p in policy.trainable_parameters()}
    assert frozen == {torch.bfloat16} and trainable == {torch.float32}
    roll = _rollout(policy)
    assert roll.rollout_logp.dtype == torch.float32
    policy.update_mode()
    out = policy.forward(roll, entropy=True)
    assert out["logp"].dtype == torch.float32 and out["entropy"].dtype == torch.float32
    loss = -(out["logp"] * roll.mask).sum() / roll.mask.sum()
    assert loss.dtype == torch.float32
    loss.backward()
    grads = [p.grad for p in policy.trainable_parameters()]
    assert all(g is not None and g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads)
    assert any(float(g.abs().sum()) > 0 for g in grads)


def test_bf16_logprobs_within_a_bf16_bound_of_fp32(tiny_model):
    p32, p16 = _policy(tiny_model, "float32"), _policy(tiny_model, "bfloat16")
    roll = _rollout(p32)  # the same tokens scored by both
    bound = _bf16_logp_bound(p32)
    m = roll.mask.bool()
    with torch.no_grad():
        lp32, lp16 = p32.logp(roll)[m], p16.logp(roll)[m]
        ref32, ref16 = p32.logp(roll, adapter=False)[m], p16.logp(roll, adapter=False)[m]
    assert float((lp16 - lp32).abs().max()) <= bound
    assert float((ref16 - ref32).abs().max()) <= bound
    # the adapter acts under bf16 as under fp32: its effect on the log-probs agrees within the
    # two bounds, and exceeds them, so an adapter dropped under bf16 (effect16 = 0) would fail
    effect32, effect16 = lp32 - ref32, lp16 - ref16
    assert float(effect32.abs().max()) > 2 * bound
    assert float((effect16 - effect32).abs().max()) <= 2 * bound


def test_bf16_trainer_reproduces_its_sampler_within_the_bound(tiny_model):
    """Sampler (incremental decode) and trainer (prompt once, completions in one pass) run the
    same bf16 weights with different operation orders: their log-probs differ by rounding only."""
    policy = _policy(tiny_model, "bfloat16")
    roll = _rollout(policy)
    m = roll.mask.bool()
    with torch.no_grad():
        gap = (policy.logp(roll) - roll.rollout_logp)[m].abs().max()
    assert float(gap) <= _bf16_logp_bound(policy)


def test_fused_lora_on_a_bf16_base_matches_peft(tiny_model):
    """The fused LoRA forward on a bf16 base with an fp32 adapter computes peft's sum (base output
    + adapter in fp32, rounded to bf16 once); the two differ only in the order of the fp32 scaling,
    so at most by one bf16 ulp of the output (<= 2^-7 relative)."""
    policy = _policy(tiny_model, "bfloat16")
    layer = policy.model.get_base_model().model.layers[0].mlp.up_proj
    assert getattr(layer, "_rlhf_fused", False)
    x = torch.randn(5, 7, layer.in_features, generator=torch.Generator().manual_seed(3)).bfloat16()
    fused = layer(x)
    peft = type(layer).forward(layer, x)
    assert fused.dtype == peft.dtype == torch.bfloat16
    assert bool(((fused.float() - peft.float()).abs() <= 2.0 ** -7 * peft.float().abs() + 1e-30).all())
    fast_lora.uninstall(policy.model)


def test_auto_picks_bf16_only_where_the_probe_says_it_is_faster(monkeypatch):
    precision.bf16_is_faster.cache_clear()
    times = {torch.float32: 1.0, torch.bfloat16: 3.0}  # bf16 slower (a CPU without native bf16)
    monkeypatch.setattr(precision, "matmul_seconds", lambda dtype, **kw: times[dtype])
    assert precision.resolve_dtype("auto", "cpu") == "float32"
    precision.bf16_is_faster.cache_clear()
    times[torch.bfloat16] = 0.9  # faster, but by less than MIN_SPEEDUP: not worth the precision
    assert precision.resolve_dtype("auto", "cpu") == "float32"
    precision.bf16_is_faster.cache_clear()
    times[torch.bfloat16] = 0.2  # bf16 matrix units (AMX)
    assert precision.resolve_dtype("auto", "cpu") == "bfloat16"
    # cached: probed once per process
    times[torch.bfloat16] = 5.0
    assert precision.resolve_dtype("auto", "cpu") == "bfloat16"
    precision.bf16_is_faster.cache_clear()
    # explicit choices are kept whatever the probe says
    assert precision.resolve_dtype("float32", "cpu") == "float32"
    assert precision.resolve_dtype("bfloat16", "cpu") == "bfloat16"


def test_auto_on_cuda_asks_the_card(monkeypatch):
    precision.bf16_is_faster.cache_clear()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert precision.resolve_dtype("auto", "cuda") == "float32"
    precision.bf16_is_faster.cache_clear()
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert precision.resolve_dtype("auto", "cuda:0") == "bfloat16"
    precision.bf16_is_faster.cache_clear()


def test_matmul_probe_times_both_dtypes():
    for dtype in (torch.float32, torch.bfloat16):
        t = precision.matmul_seconds(dtype, rows=4, inner=8, out=8, reps=2)
        assert 0 < t < 10


def test_dtype_is_checked(tiny_model):
    LMConfig(dtype="auto").validate()
    with pytest.raises(UserError, match="dtype"):
        precision.resolve_dtype("float64", "cpu")
    with pytest.raises(UserError, match="dtype"):
        LMPolicy(tiny_model, dtype="half")


def test_fused_head_in_bf16_is_fp32_math_on_bf16_logits():
    """linear_logprobs with bf16 hidden states and head: the only roundings are each logit's
    (the GEMM accumulates in fp32 and rounds once: |dz| <= u |z|) and, in backward, the fp32
    gradient's before the bf16 GEMM and that GEMM's output (u each). So, with d = u max|z|:
    |d logp| <= 2 d (logsumexp is 1-Lipschitz in the max norm), and with G = g (onehot - p),
    |dp_v| <= 2 p_v d, so |d grad_h| <= (2 d + 2 u) (|g| (onehot + p)) @ |W| (plus fp32 noise)."""
    from rlhf.core import linear_logprobs

    gen = torch.Generator().manual_seed(4)
    h = torch.randn(6, 16, generator=gen).bfloat16()
    w = (torch.randn(100, 16, generator=gen) * 0.5).bfloat16()
    ids = torch.randint(0, 100, (6,), generator=gen)
    g = torch.randn(6, generator=gen)
    h16 = h.clone().requires_grad_()
    lp16, _ = linear_logprobs(h16, w, ids, chunk=32)
    (lp16 * g).sum().backward()
    h32 = h.float().requires_grad_()
    z = h32.detach() @ w.float().t()
    lp32 = torch.log_softmax(z, -1).gather(1, ids[:, None]).squeeze(1)
    torch.log_softmax(h32 @ w.float().t(), -1).gather(1, ids[:, None]).squeeze(1).mul(g).sum().backward()
    assert lp16.dtype == torch.float32 and h16.grad.dtype == torch.bfloat16
    d = U * float(z.abs().max())
    assert float((lp16.detach() - lp32).abs().max()) <= 2 * d + 1e-5
    p = torch.softmax(z, -1)
    weight = g.abs()[:, None] * (torch.nn.functional.one_hot(ids, 100) + p)
    bound = (2 * d + 2 * U) * (weight @ w.float().abs()) + U * h32.grad.abs()  # + the bf16 grad's own rounding
    assert bool(((h16.grad.float() - h32.grad).abs() <= bound + 1e-5).all())


def test_truncated_head_runs_in_bf16(tiny_model):
    policy = _policy(tiny_model, "bfloat16")
    policy.set_options(top_k=40, top_p=0.9)
    roll = _rollout(policy)
    policy.update_mode()
    out = policy.forward(roll, entropy=True)
    assert out["logp"].dtype == torch.float32 and bool(torch.isfinite(out["logp"]).all())
    (out["logp"] * roll.mask).sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in policy.trainable_parameters() if p.grad is not None)



def test_fused_head_in_bf16_is_consistent_on_confident_tokens():
    """Confident tokens (chosen logits 25-43) through a bf16 head: log p <= 0, and each
    log-prob within the bound one consistent rounding allows (derived in
    ``rlhf.testing.confident_head_check``); an fp32 chosen logit against a bf16-rounded
    log-sum-exp gave log p up to +0.12 and errors ~500x that bound."""
    from rlhf.testing import confident_head_check

    out = confident_head_check()
    assert out["min_chosen_logit"] >= 24.0
    assert out["max_logp"] <= 0.0, "log p > 0: the chosen logit and its lse are not one computation"
    assert out["worst_ratio"] <= 1.0, out
