"""decode: static (a fixed-shape KV cache, rows that end stay in the batch; on CUDA a CUDA graph)
gives the dynamic sampler's tokens from the same per-row uniforms, and its log-probs within a
rounding bound derived from the weights, in fp32 and bf16; truncation, stop strings, EOS and
greedy behave the same; ``auto`` picks the dynamic path on the CPU."""
import pytest
import torch

from rlhf.config import LMConfig
from rlhf.errors import UserError
from rlhf.lm.sampler import decode
from rlhf.lm.static_decode import decode_engine, decode_static
from rlhf.tasks import arith_row

from conftest import logp_rounding_bound, policy_with_adapter

ROWS = [arith_row(12, 34), arith_row(5, 6), arith_row(567, 89)]  # prompts of different lengths: padding
G, BUDGET = 4, 16


def _policy(tiny_model, dtype):
    policy = policy_with_adapter(tiny_model, dtype=dtype)
    # the random tiny model rarely writes its own end token: one in ~12 of its tokens ends a row
    # here, so rows end at different positions and the dynamic path drops them from its batch
    vocab = policy.model.config.vocab_size
    policy.eos_ids = sorted(set(policy.eos_ids) | set(range(5, vocab, 12)))
    return policy


def _both(policy, greedy=False, adapter=True):
    ids, attn = policy.encode_prompts([r["prompt"] for r in ROWS])
    n = len(ROWS) * (1 if greedy else G)
    uniforms = torch.rand(n, BUDGET, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    out = []
    for mode in ("dynamic", "static"):
        policy.decode_mode = mode
        g = 1 if greedy else G
        out.append(policy.generate(ids, attn, g, BUDGET, greedy=greedy, adapter=adapter, uniforms=uniforms))
    return out


def _assert_same(dyn, sta, bound):
    assert torch.equal(dyn.completion_ids, sta.completion_ids)
    assert torch.equal(dyn.mask, sta.mask) and torch.equal(dyn.truncated, sta.truncated)
    gap = float((dyn.rollout_logp - sta.rollout_logp).abs().max())
    assert gap <= bound, (gap, bound)
    return gap


def _fp32_bound(policy):
    cfg = policy.model.config  # the longest dot product on the path: its worst-case sum error
    n = max(cfg.hidden_size, cfg.intermediate_size)
    return 2 * logp_rounding_bound(policy, n * 2.0 ** -24)  # two runs, each within the bound


@pytest.mark.parametrize("adapter", [True, False])
def test_fp32_same_tokens_and_logprobs_within_the_bound(tiny_model, adapter):
    policy = _policy(tiny_model, "float32")
    dyn, sta = _both(policy, adapter=adapter)
    lengths = dyn.mask.sum(1)
    assert lengths.min() < BUDGET and bool(dyn.truncated.any())  # rows ended early, others ran on
    assert len(set(lengths.tolist())) > 3
    _assert_same(dyn, sta, _fp32_bound(policy))


def test_bf16_same_tokens_and_logprobs_within_the_bound(tiny_model):
    """Both paths round to bf16 at the same places but sum in different orders (batch size, attention
    length): each is within the bf16 bound of the exact log-prob, so they are within twice it."""
    policy = _policy(tiny_model, "bfloat16")
    dyn, sta = _both(policy)
    assert dyn.mask.sum(1).min() < BUDGET
    _assert_same(dyn, sta, 2 * logp_rounding_bound(policy, 2.0 ** -8))


def test_greedy_is_the_same(tiny_model):
    policy = _policy(tiny_model, "float32")
    dyn, sta = _both(policy, greedy=True)
    assert dyn.completion_ids.shape[0] == len(ROWS)
    _assert_same(dyn, sta, _fp32_bound(policy))


def test_truncation_and_stop_strings_are_the_same(tiny_model):
    policy = _policy(tiny_model, "float32")
    policy.set_options(top_k=20, top_p=0.9, min_p=0.05, stop=["e", "7"])
    dyn, sta = _both(policy)
    policy.set_options(top_k=20, top_p=0.9, min_p=0.05)
    no_stop, _ = _both(policy)
    assert not torch.equal(dyn.mask, no_stop.mask[:, :dyn.mask.shape[1]])  # the stop strings cut rows
    _assert_same(dyn, sta, _fp32_bound(policy))


def test_auto_is_dynamic_on_the_cpu_and_static_on_cuda():
    assert decode_engine("auto", "cpu") is decode and decode_engine("dynamic", "cuda") is decode
    assert decode_engine("auto", "cuda") is not decode and decode_engine("static", "cpu") is not decode
    with pytest.raises(UserError, match="decode 'fast' is not one of auto, dynamic, static"):
        decode_engine("fast", "cpu")
    with pytest.raises(UserError, match="decode"):
        LMConfig(decode="fast").validate()


def test_static_without_a_cuda_graph_runs_eagerly_on_the_cpu(tiny_model):
    """graph=True is CUDA's; on the CPU (graph=False, the default there) the step is a plain call."""
    policy = _policy(tiny_model, "float32")
    ids, attn = policy.encode_prompts([ROWS[0]["prompt"]])
    roll = decode_static(policy.model, ids, attn, 2, 4, policy.decode_settings())
    assert roll.completion_ids.shape[0] == 2 and roll.rollout_logp.shape == roll.mask.shape


def test_a_refused_capture_is_an_error_under_static_and_a_warning_under_auto(tiny_model, monkeypatch):
    """What CUDA-graph capture refuses (here: a stand-in for it, on the CPU) stops decode: static
    with one sentence naming the setting to use, and under auto decodes the same fixed shapes
    eagerly, with the same tokens as without a graph."""
    from rlhf.lm import static_decode

    def refuse(self, lengths):
        self._forward()  # as a warm-up would: it writes a slot and advances the cache's lengths
        raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(static_decode.StaticStep, "_record_graph", refuse)
    policy = _policy(tiny_model, "float32")
    ids, attn = policy.encode_prompts([r["prompt"] for r in ROWS])
    s = policy.decode_settings()
    u = torch.rand(len(ROWS) * G, BUDGET, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    with pytest.raises(UserError, match="set decode: dynamic"):
        decode_static(policy.model, ids, attn, G, BUDGET, s, uniforms=u, graph=True, strict=True)
    with pytest.warns(UserWarning, match="decoding eagerly on fixed shapes"):
        fallback = decode_static(policy.model, ids, attn, G, BUDGET, s, uniforms=u, graph=True, strict=False)
    eager = decode_static(policy.model, ids, attn, G, BUDGET, s, uniforms=u, graph=False)
    assert torch.equal(fallback.completion_ids, eager.completion_ids)
    torch.testing.assert_close(fallback.rollout_logp, eager.rollout_logp, rtol=0, atol=0)


def test_sliding_window_models_are_refused_by_static_and_decoded_dynamically_by_auto():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from rlhf.core.logprobs import Truncation
    from rlhf.lm.sampler import DecodeSettings

    torch.manual_seed(0)
    model = Qwen2ForCausalLM(Qwen2Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, use_sliding_window=True,
                                         sliding_window=8, max_window_layers=0)).eval()
    ids = torch.randint(3, 64, (2, 5), generator=torch.Generator().manual_seed(0))
    s = DecodeSettings(1.0, Truncation(), (1,), 0)
    u = torch.rand(4, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    with pytest.raises(UserError, match="sliding-window"):
        decode_static(model, ids, torch.ones_like(ids), 2, 6, s, uniforms=u, strict=True)
    auto = decode_static(model, ids, torch.ones_like(ids), 2, 6, s, uniforms=u, strict=False)
    dyn = decode(model, ids, torch.ones_like(ids), 2, 6, s, uniforms=u)
    assert torch.equal(auto.completion_ids, dyn.completion_ids)
