"""The LM adapter on a tiny model: masks, log-probs, reference, padding, saved adapters."""
import torch

from rlhf.lm.policy import LMPolicy, completion_mask
from rlhf.tasks import arith_row


def test_completion_mask_keeps_first_eos_and_masks_after():
    c = torch.tensor([[5, 6, 2, 9, 9], [5, 6, 7, 8, 9], [2, 9, 9, 9, 9]])
    mask, truncated = completion_mask(c, [2])
    assert mask.tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]]
    assert truncated.tolist() == [False, True, False]


def _policy(tiny_model, **kw):
    torch.manual_seed(0)
    return LMPolicy(tiny_model, lora_r=4, lora_alpha=8, **kw)


def test_trainer_logp_matches_sampler_and_reference_at_init(tiny_model):
    policy = _policy(tiny_model)
    rows = [arith_row(12, 34), arith_row(56, 78)]
    ids, attn = policy.encode_prompts([r["prompt"] for r in rows])
    roll = policy.generate(ids, attn, group_size=3, max_new_tokens=6)
    assert roll.completion_ids.shape[0] == 6 and roll.rollout_logp is not None
    logp = policy.logp(roll)
    # the training forward reproduces the sampler's log-probs (left padding, positions, temperature)
    torch.testing.assert_close(logp, roll.rollout_logp, atol=1e-4, rtol=0)
    # LoRA B starts at zero: the adapter-disabled reference equals the policy at init
    torch.testing.assert_close(policy.logp(roll, adapter=False), logp.detach(), atol=1e-6, rtol=0)
    assert (logp * (1 - roll.mask)).abs().sum() == 0


def test_left_padding_does_not_change_logp(tiny_model):
    policy = _policy(tiny_model, temperature=0.7)
    short, long = arith_row(1, 2), {"prompt": [{"role": "user", "content": "a much longer question " * 4}]}
    ids, attn = policy.encode_prompts([short["prompt"], long["prompt"]])
    roll = policy.generate(ids, attn, 1, 5)
    alone_ids, alone_attn = policy.encode_prompts([short["prompt"]])
    alone = roll.select(slice(0, 1))
    alone.prompt_ids, alone.prompt_mask = alone_ids, alone_attn
    torch.testing.assert_close(policy.logp(roll)[:1], policy.logp(alone), atol=1e-5, rtol=0)


def test_adapter_saves_in_peft_format(tiny_model, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    policy = _policy(tiny_model)
    with torch.no_grad():
        for n, p in policy.model.named_parameters():
            if "lora_B" in n:
                p.add_(0.01)
    assert policy.adapter_norm() > 0
    policy.save_adapter(tmp_path / "adapter")
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
    loaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model), tmp_path / "adapter")
    x = torch.tensor([[1, 5, 7, 9]])
    torch.testing.assert_close(loaded(x).logits, policy.model(x).logits, atol=1e-5, rtol=0)
