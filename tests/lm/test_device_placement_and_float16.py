"""Devices and precisions: evaluation and reward models follow the trainer's
device; no float64 tensor is made where an accelerator would hold it; ``dtype: float16`` trains
with a loss scaler; the training log-probs apply the model's own logit transforms (Gemma-2's
soft-cap, Cohere's and Granite's scales) as the sampler's ``model(...).logits`` do.

The CUDA side of the same checks (placement, no float64 on the device, bf16 and fp16 runs):
benchmarks/gpu_check.py."""
from __future__ import annotations

import math
import shutil
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes

import rlhf.core.advantages
import rlhf.core.logprobs
import rlhf.distributed
import rlhf.lm.sampler
import rlhf.trainers.lm
from rlhf.config import load_recipe
from rlhf.distributed import Dist, process_device
from rlhf.lm.policy import LMPolicy
from rlhf.run import Run
from rlhf.trainers.lm import train


def tiny_cfg(tiny_model, tmp_path, *overrides):
    return load_recipe(None, [f"model={tiny_model}", "task=arith", "rewards=[length_penalty]", "steps=2",
                              "prompts_per_step=2", "group_size=4", "max_new_tokens=6", "lr=0.01", "save_every=0",
                              f"out_dir={tmp_path}", *overrides])


# ---------------------------------------------------------------------------- devices
def test_eval_and_reward_models_run_on_the_trainers_device(tiny_model, tmp_path):
    """The trainer's device (accelerate's pick, ``Dist``) is the one evaluation and reward models
    use; ``rlhf eval`` reports it. (On this CPU they are all the CPU; gpu_check.py checks CUDA.)"""
    from rlhf.lm.evaluate import evaluate_lm
    from rlhf.lm.reward_model import RewardModel

    assert process_device() == Dist().device
    cfg = tiny_cfg(tiny_model, tmp_path, "eval_problems=4", "eval_batch=4")
    run = Run(cfg, run_dir=str(tmp_path / "run"))
    train(cfg, run, progress=False)
    assert evaluate_lm(str(run.dir), problems=4, progress=False)["device"] == str(process_device())
    rm = RewardModel(tiny_model, lora_r=2, lora_alpha=4)
    assert rm.device == process_device()
    assert {p.device for p in rm.model.parameters()} == {process_device()}
    scores = rm.score(["What is 1 + 2?"] * 2, ["3", "4"])
    assert scores.device == process_device() and scores.shape == (2,)


# ---------------------------------------------------------------------------- no float64
class Float64Watch(TorchDispatchMode):
    """Records every op that outputs a float64 tensor."""

    def __init__(self):
        super().__init__()
        self.ops: set[str] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and t.dtype == torch.float64:
                self.ops.add(str(func))
        return out


@pytest.mark.parametrize("algo", ["grpo", "ppo"])
def test_no_float64_tensor_in_a_training_step_under_the_accelerator_dtypes(tiny_model, tmp_path, monkeypatch, algo):
    """With ``wide_dtype`` answering as it does on an accelerator (float32), a GRPO / PPO run
    (sampling with top_p, reference, advantages, whitening, explained variance, update, metrics)
    makes no float64 tensor at all. The one float64 source left is the host-side sampling noise
    (``sampling_uniforms``: CPU generators), run outside the watch here; the sampler converts it
    with ``wide_dtype`` of the device (float32 on an accelerator) before use."""
    float32 = lambda device: torch.float32  # noqa: E731
    for module in (rlhf.core.logprobs, rlhf.core.advantages, rlhf.distributed, rlhf.lm.sampler):
        monkeypatch.setattr(module, "wide_dtype", float32)
    host_noise = rlhf.trainers.lm.rank_uniforms

    def outside_watch(*args):
        with _disable_current_modes():
            return host_noise(*args)

    monkeypatch.setattr(rlhf.trainers.lm, "rank_uniforms", outside_watch)
    cfg = tiny_cfg(tiny_model, tmp_path, f"algo={algo}", "top_p=0.9", "kl_coef=0.1")
    run = Run(cfg, run_dir=str(tmp_path / "run"))
    watch = Float64Watch()
    with watch:
        out = train(cfg, run, progress=False)
    assert watch.ops == set()
    assert out["adapter_norm"] > 0 and len(run.history) == 2


def test_sample_categorical_in_float32_draws_the_distribution_and_never_a_zero(monkeypatch):
    """The accelerator path (float32 sums): the draws follow ``probs`` (within 5 binomial standard
    deviations per entry over 40,000 draws), and an entry of probability 0 is never drawn, at the
    block ends and for uniforms that round to 1.0 in float32."""
    from rlhf.core import sample_categorical

    monkeypatch.setattr(rlhf.core.logprobs, "wide_dtype", lambda device: torch.float32)
    g = torch.Generator().manual_seed(0)
    probs = torch.rand(1, 50, generator=g) * (torch.rand(1, 50, generator=g) > 0.3)
    n = 40_000
    draws = sample_categorical(probs.expand(n, 50), generator=g, block=8)
    freq = torch.bincount(draws, minlength=50).double() / n
    p = (probs[0] / probs[0].sum()).double()
    assert torch.all((freq - p).abs() <= 5 * (p * (1 - p) / n).sqrt() + 1e-12)
    assert torch.all(freq[p == 0] == 0)
    # zeros at the end of each block and at the very end; uniforms at and next to 1 and 0
    probs = torch.tensor([[0.0, 0.3, 0.0, 0.0, 0.2, 0.0, 0.5, 0.0, 0.0]]).repeat(4, 1)
    u = torch.tensor([0.0, 1 - 2 ** -26, 0.999999, 1 - 1e-9], dtype=torch.float64)
    picked = sample_categorical(probs, uniform=u, block=3)
    assert torch.all(probs[torch.arange(4), picked] > 0), picked


# ---------------------------------------------------------------------------- float16
def test_float16_training_keeps_lora_in_float32_and_scales_the_loss(tiny_model, tmp_path):
    cfg = tiny_cfg(tiny_model, tmp_path, "dtype=float16")
    run = Run(cfg, run_dir=str(tmp_path / "run"))
    out = train(cfg, run, progress=False)
    assert out["adapter_norm"] > 0
    for row in run.history:
        assert row["amp/loss_scale"] == 2.0 ** 16 and row["amp/overflow"] == 0.0  # torch's initial scale
        assert math.isfinite(row["loss"]) and row["logp_gap_rollout_trainer"] < 0.05  # (gpu_check's bound)


def test_float16_step_skips_an_overflow_halves_the_scale_then_steps(tiny_model, tmp_path):
    """The scaler path of ``_step``: a loss whose scaled gradient overflows float32 skips the step
    (weights unchanged, not counted as a non-finite step) and halves the scale; the next, finite
    one steps with the gradient unscaled (the clipped norm is the true one)."""
    from rlhf.trainers.lm import _step, build

    cfg = tiny_cfg(tiny_model, tmp_path, "dtype=float16", "max_grad_norm=0")
    policy, opt, sched = build(cfg, Dist())
    assert policy.scaler is not None
    lora = [p for p in policy.trainable_parameters()]
    assert {p.dtype for p in lora} == {torch.float32}  # master weights
    assert {p.dtype for n, p in policy.model.named_parameters() if "lora_" not in n} == {torch.float16}
    before = [p.detach().clone() for p in lora]
    k = next(i for i, (n, p) in enumerate((n, p) for n, p in policy.model.named_parameters() if p.requires_grad)
             if "lora_B" in n)
    b = lora[k]
    stats = {}
    norm, bad = _step(policy, opt, sched, b.sum() * 1e35, stats, cfg)  # x 65536: > float32's max
    assert not math.isfinite(norm) and not bad and stats["amp/overflow"] == 1.0
    assert all(torch.equal(p, q) for p, q in zip(lora, before))
    assert policy.scaler.get_scale() == 2.0 ** 15
    stats = {}
    norm, bad = _step(policy, opt, sched, 3.0 * b.sum(), stats, cfg)
    assert not bad and stats["amp/overflow"] == 0.0 and stats["amp/loss_scale"] == 2.0 ** 15
    assert norm == pytest.approx(3.0 * math.sqrt(b.numel()), rel=1e-6)  # d(3 sum b)/db = 3: unscaled
    assert not torch.equal(b.detach(), before[k])


def test_float16_logprobs_are_float32(tiny_model):
    policy = LMPolicy(tiny_model, dtype="float16", lora_r=2, lora_alpha=4)
    ids, attn = policy.encode_prompts(["What is 12 + 3?"])
    roll = policy.generate(ids, attn, 2, 4)
    assert roll.rollout_logp.dtype == torch.float32
    assert policy.forward(roll)["logp"].dtype == torch.float32


# ---------------------------------------------------------------------------- logit transforms
FAMILIES = {  # a transform strong enough at this test's logit scale (~3) that missing it shows
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", dict(final_logit_softcapping=1.5, head_dim=8,
                                                          query_pre_attn_scalar=8, sliding_window=16)),
    "cohere": ("CohereConfig", "CohereForCausalLM", dict(logit_scale=0.3)),
    "granite": ("GraniteConfig", "GraniteForCausalLM", dict(logits_scaling=4.0)),
    "llama": ("LlamaConfig", "LlamaForCausalLM", dict()),  # no transform: the fused head
}


def family_checkpoint(tiny_model, path: Path, family: str) -> str:
    import transformers

    config_cls, model_cls, extra = FAMILIES[family]
    tok = transformers.AutoTokenizer.from_pretrained(tiny_model)
    cfg = getattr(transformers, config_cls)(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, tie_word_embeddings=True, **extra)
    torch.manual_seed(0)
    model = getattr(transformers, model_cls)(cfg)
    with torch.no_grad():  # logits of order 3, where the transforms are far from the identity
        model.get_output_embeddings().weight.mul_(3.0 / model.get_output_embeddings().weight.std() / 32 ** 0.5)
    model.save_pretrained(path, safe_serialization=True)
    for f in Path(tiny_model).iterdir():
        if "token" in f.name or f.name.endswith(".jinja"):
            shutil.copy(f, path / f.name)
    return str(path)


@pytest.mark.parametrize("top_p", [1.0, 0.9])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_training_logprobs_equal_the_models_own_logits(tiny_model, tmp_path, family, top_p):
    """The trainer's log-probs (prompt run once, completions on its cache, the head on completion
    tokens) equal ``log_softmax(model(prompt + completion).logits / T)`` at the completion tokens,
    the truncated distribution's when top_p < 1 (renormalised over the tokens whose renormalised
    mass before them is < top_p). Both are float32 computations of the same logits in different
    batch shapes: they differ by rounding, ~1e-6 relative per op, far below the 1e-4 bound on
    log-probs of size ~log V ~ 6; a missed transform moves them by > 0.05 here (checked too)."""
    from rlhf.core.logprobs import Truncation, truncation_mask

    path = family_checkpoint(tiny_model, tmp_path / family, family)
    temperature = 0.7
    policy = LMPolicy(path, lora_r=2, lora_alpha=4, temperature=temperature)
    policy.set_options(top_p=top_p)
    ids, attn = policy.encode_prompts(["What is 12 + 3?", "What is 31 + 64? Answer."])
    roll = policy.generate(ids, attn, 2, 6, uniforms=torch.rand(4, 6, generator=torch.Generator().manual_seed(1)))
    with torch.no_grad():
        got = policy.forward(roll)["logp"]
        owner = torch.arange(4) // 2
        full_ids = torch.cat([roll.prompt_ids[owner], roll.completion_ids], 1)
        full_mask = torch.cat([roll.prompt_mask[owner], roll.mask.long()], 1)
        pos = (full_mask.cumsum(-1) - 1).clamp(min=0)
        logits = policy.model(input_ids=full_ids, attention_mask=full_mask, position_ids=pos).logits.float()
        c = roll.completion_ids.shape[1]
        x = logits[:, -c - 1:-1] / temperature
        keep = truncation_mask(x, Truncation(top_p=top_p))
        keep.scatter_(-1, roll.completion_ids[..., None], True)
        want = torch.log_softmax(x.masked_fill(~keep, float("-inf")), -1)
        want = want.gather(-1, roll.completion_ids[..., None]).squeeze(-1) * roll.mask
        plain = policy.model.get_output_embeddings()
        hidden = policy.model.get_base_model().get_decoder()(input_ids=full_ids, attention_mask=full_mask,
                                                             position_ids=pos).last_hidden_state
        raw = torch.log_softmax(plain(hidden[:, -c - 1:-1]).float() / temperature, -1)
        raw = raw.gather(-1, roll.completion_ids[..., None]).squeeze(-1) * roll.mask
    assert (got - want).abs().max() < 1e-4
    assert (roll.rollout_logp - want).abs().max() < 1e-4  # the sampler's own record agrees
    if family != "llama":  # the transform matters at this scale: skipping it would be caught
        assert (raw - want).abs().max() > 0.05


def test_float16_resume_keeps_the_loss_scale(tiny_model, tmp_path):
    """A checkpoint of a float16 run keeps the scaler's state, and ``--resume`` goes on at the
    scale reached, not at torch's initial 2^16 (which would overflow again, skipping steps)."""
    from rlhf.checkpoint import read_state

    cfg = tiny_cfg(tiny_model, tmp_path, "dtype=float16", "save_every=1")
    run = Run(cfg, run_dir=str(tmp_path / "run"))
    train(cfg, run, progress=False)
    run.close()
    state = read_state(run.dir / "checkpoint")
    assert state["amp_scaler"]["scale"] == 2.0 ** 16
    state["amp_scaler"]["scale"] = 2.0 ** 9  # as if overflows had halved it seven times
    torch.save(state, run.dir / "checkpoint" / "state.pt")
    cfg3 = tiny_cfg(tiny_model, tmp_path, "dtype=float16", "save_every=1", "steps=3")
    resumed = Run(cfg3, run_dir=str(run.dir), resume=True)
    train(cfg3, resumed, progress=False, resume=True)
    last = resumed.history[-1]
    assert last["step"] == 3 and last["amp/loss_scale"] == 2.0 ** 9
    assert read_state(run.dir / "checkpoint")["amp_scaler"]["scale"] == 2.0 ** 9
