"""lora_r: 0 trains every weight of the model: a frozen copy is the reference (none without a
KL term), the trainer reproduces its sampler, and the saved directory is a whole model that
``AutoModelForCausalLM.from_pretrained`` loads."""
import pytest
import torch

from rlhf.errors import UserError
from rlhf.lm.policy import LMPolicy
from rlhf.tasks import arith_row


def _rollout(policy, seed=2):
    rows = [arith_row(12, 34), arith_row(56, 78)]
    ids, attn = policy.encode_prompts([r["prompt"] for r in rows])
    uniforms = torch.rand(6, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    return policy.generate(ids, attn, group_size=3, max_new_tokens=8, uniforms=uniforms)


def _step(policy, roll, lr=1e-2):
    """One SGD step on -sum(logp): moves every weight that shapes the sampled tokens."""
    opt = torch.optim.SGD(policy.trainable_parameters(), lr=lr)
    (-policy.logp(roll).sum()).backward()
    opt.step()


def test_every_weight_trains_and_a_frozen_copy_is_the_reference(tiny_model):
    policy = LMPolicy(tiny_model, lora_r=0)
    n_model = sum(1 for _ in policy.model.parameters())
    assert len(policy.trainable_parameters()) == n_model and n_model > 10  # no adapter: the whole model
    assert all(p.dtype == torch.float32 for p in policy.trainable_parameters())
    ref = policy.net.reference[0]
    assert not any(p.requires_grad for p in ref.parameters())
    assert not any(p is q for p in ref.parameters() for q in policy.net.parameters())  # a copy, not shared
    assert all(not n.startswith("reference") for n, _ in policy.net.named_parameters())  # outside DDP's module
    roll = _rollout(policy)
    with torch.no_grad():
        assert torch.equal(policy.logp(roll, adapter=False), policy.logp(roll))  # the same weights at init
    _step(policy, roll)
    with torch.no_grad():
        moved = (policy.logp(roll) - policy.logp(roll, adapter=False))[roll.mask.bool()].abs().max()
    assert moved > 1e-3  # the policy moved, the reference stayed
    assert policy.adapter_norm() > 0  # full fine-tuning: the weights' distance from the reference


def test_no_reference_copy_without_a_kl_term(tiny_model):
    policy = LMPolicy(tiny_model, lora_r=0, reference=False)
    assert policy.net.reference == ()
    roll = _rollout(policy)
    with pytest.raises(ValueError, match="reference"):
        policy.logp(roll, adapter=False)


def test_trainer_reproduces_its_sampler(tiny_model):
    """Incremental decode and the one-pass training forward of the same fp32 weights, after a
    step (the weights are no longer the checkpoint's): the same bound as the LoRA test's."""
    policy = LMPolicy(tiny_model, lora_r=0)
    _step(policy, _rollout(policy, seed=3))
    roll = _rollout(policy)
    with torch.no_grad():
        gap = (policy.logp(roll) - roll.rollout_logp)[roll.mask.bool()].abs().max()
    assert float(gap) <= 1e-4


def test_the_saved_directory_is_a_whole_model_transformers_loads(tiny_model, tmp_path):
    from transformers import AutoModelForCausalLM

    policy = LMPolicy(tiny_model, lora_r=0)
    roll = _rollout(policy)
    _step(policy, roll)
    policy.save_adapter(tmp_path / "adapter")
    loaded = AutoModelForCausalLM.from_pretrained(str(tmp_path / "adapter"))
    ids = torch.cat([roll.prompt_ids[:1], roll.completion_ids[:1]], 1)
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, policy.model(ids).logits, rtol=0, atol=0)
    resumed = LMPolicy(tiny_model, lora_r=0, adapter_path=str(tmp_path / "adapter"))
    with torch.no_grad():  # resuming loads the trained weights; its reference is still the base
        assert torch.equal(resumed.logp(roll), policy.logp(roll))
        assert torch.equal(resumed.logp(roll, adapter=False), policy.logp(roll, adapter=False))


def _bf16_logp_bound(policy) -> float:
    """tests/lm/test_bf16_and_auto_dtype.py's first-order bound on a bf16 log-prob's error,
    2 K u |h| max_j |w_j|, K = 12 per layer + 2 at the head, u = 2^-8, for the weights now."""
    import math

    lm, layers = policy.model, policy.model.config.num_hidden_layers
    h_norm = math.sqrt(lm.config.hidden_size) * float(lm.model.norm.weight.abs().max())
    return 2 * (12 * layers + 2) * 2.0 ** -8 * h_norm * float(lm.get_output_embeddings().weight.norm(dim=1).max())


def test_bf16_full_fine_tuning_keeps_fp32_master_weights_and_computes_in_bf16(tiny_model):
    policy = LMPolicy(tiny_model, lora_r=0, dtype="bfloat16")
    fp32 = LMPolicy(tiny_model, lora_r=0)
    assert policy.dtype == "bfloat16"  # the compute dtype (tis: auto corrects in it)
    assert {p.dtype for p in policy.trainable_parameters()} == {torch.float32}  # the master weights
    roll = _rollout(policy)
    with torch.no_grad():
        bf16_logp, fp32_logp = policy.logp(roll), fp32.logp(roll)
        ref = policy.logp(roll, adapter=False)
    m = roll.mask.bool()
    gap = (bf16_logp - roll.rollout_logp)[m].abs().max()
    assert float(gap) <= _bf16_logp_bound(policy)  # sampler and trainer: both bf16, rounding apart
    assert 0 < float((bf16_logp - fp32_logp)[m].abs().max()) <= _bf16_logp_bound(policy)  # it is bf16
    assert torch.equal(ref, bf16_logp)  # the reference computes as the policy: equal at init
    assert (bf16_logp[m] <= 0).all()  # one computation, one rounding: log p never above 0
    # an update below bf16's resolution (2^-8 relative) is kept by the fp32 masters
    w = policy.model.model.layers[0].mlp.up_proj.weight
    before = w.detach().clone()
    with torch.no_grad():
        w.add_(before.abs() * 2.0 ** -12)
    kept = (w != before).float().mean()
    lost_in_bf16 = (w.to(torch.bfloat16) == before.to(torch.bfloat16)).float().mean()
    assert kept == 1.0 and lost_in_bf16 > 0.9  # a bf16 weight would have dropped (nearly) all of it


def test_a_full_fine_tuning_run_trains_without_a_reference_and_evaluates(tiny_model, tmp_path, capsys):
    """lora_r 0 with kl_coef 0 through the CLI: no reference is loaded for training, the run
    saves a whole model, and rlhf eval compares it with the base."""
    import json
    from pathlib import Path

    from rlhf.cli import main

    recipe = Path(__file__).resolve().parents[2] / "recipes" / "grpo_arith.yaml"
    sets = [f"model={tiny_model}", "lora_r=0", "kl_coef=0", "steps=2", "prompts_per_step=2", "group_size=3",
            "max_new_tokens=5", "micro_batch_size=2", "eval_problems=4", "threads=1"]
    run = tmp_path / "r"
    assert main(["train", str(recipe), "--no-progress", "--run-dir", str(run),
                 *[a for s in sets for a in ("--set", s)]]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["adapter_norm"] is None  # no reference to measure the move from
    assert (run / "adapter" / "model.safetensors").is_file() and (run / "adapter" / "config.json").is_file()
    assert "Full fine-tune" in (run / "adapter" / "README.md").read_text()
    assert main(["eval", str(run), "--no-progress"]) == 0
    ev = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert "base_accuracy" in ev and "trained_accuracy" in ev


def test_generate_loads_a_full_fine_tune_and_merge_says_there_is_nothing_to_merge(tiny_model, tmp_path, capsys):
    from pathlib import Path

    from rlhf.cli import main
    from rlhf.lm.share import load_adapted, merge

    recipe = Path(__file__).resolve().parents[2] / "recipes" / "grpo_arith.yaml"
    sets = [f"model={tiny_model}", "lora_r=0", "steps=1", "prompts_per_step=2", "group_size=2", "max_new_tokens=3",
            "threads=1"]
    run = tmp_path / "r"
    assert main(["train", str(recipe), "--no-progress", "--run-dir", str(run),
                 *[a for s in sets for a in ("--set", s)]]) == 0
    model, _ = load_adapted(str(run))
    assert type(model).__name__ == "LlamaForCausalLM"  # the whole trained model, no peft wrapper
    with pytest.raises(UserError, match="nothing to merge"):
        merge(str(run), str(tmp_path / "merged"))
