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


def test_bf16_full_fine_tuning_is_refused_in_one_sentence(tiny_model):
    with pytest.raises(UserError, match="lora_r: 0.*float32"):
        LMPolicy(tiny_model, lora_r=0, dtype="bfloat16")


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
