"""The LM adapter on a tiny model: masks, log-probs, reference, padding, saved adapters."""
import torch

from rlhf.lm.policy import LMPolicy
from rlhf.lm.sampler import completion_mask
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
    assert roll.completion_ids.shape[0] == 6 and roll.prompt_ids.shape[0] == 2
    assert roll.rollout_logp is not None
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
    alone = roll.select_groups(torch.tensor([0]))
    alone.prompt_ids, alone.prompt_mask = alone_ids, alone_attn
    torch.testing.assert_close(policy.logp(roll)[:1], policy.logp(alone), atol=1e-5, rtol=0)


def test_shared_prompt_logp_equals_full_sequence_forward(tiny_model):
    """The prefix-sharing forward gives the same log-probs (and gradients) as running every
    row's prompt + completion as one plain sequence."""
    from rlhf.core import selective_log_softmax

    policy = _policy(tiny_model, temperature=0.9)
    with torch.no_grad():  # make the adapter non-trivial so gradients are meaningful
        for n, p in policy.model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    rows = [arith_row(12, 34), {"prompt": [{"role": "user", "content": "a longer question " * 3}]}]
    ids, attn = policy.encode_prompts([r["prompt"] for r in rows])
    roll = policy.generate(ids, attn, group_size=3, max_new_tokens=7)
    shared = policy.logp(roll)
    full_ids = torch.cat([ids.repeat_interleave(3, 0), roll.completion_ids], 1)
    full_attn = torch.cat([attn.repeat_interleave(3, 0), roll.mask], 1)
    pos = (full_attn.cumsum(-1) - 1).clamp(min=0)
    logits = policy.model(input_ids=full_ids, attention_mask=full_attn, position_ids=pos).logits
    c = roll.completion_ids.shape[1]
    plain = selective_log_softmax(logits[:, -c - 1:-1] / 0.9, roll.completion_ids) * roll.mask
    torch.testing.assert_close(shared, plain, atol=1e-5, rtol=0)
    params = policy.trainable_parameters()
    g_shared = torch.autograd.grad(shared.sum(), params)
    g_plain = torch.autograd.grad(plain.sum(), params)
    for a, b in zip(g_shared, g_plain):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_greedy_generation_matches_transformers_generate(tiny_model):
    policy = _policy(tiny_model)
    ids, attn = policy.encode_prompts([arith_row(12, 34)["prompt"], arith_row(5, 6)["prompt"]])
    ours = policy.generate(ids, attn, 1, 6, greedy=True)
    ref = policy.model.generate(input_ids=ids, attention_mask=attn, do_sample=False, max_new_tokens=6,
                                pad_token_id=policy.tokenizer.pad_token_id, eos_token_id=policy.eos_ids)
    theirs = ref[:, ids.shape[1]:]
    c = min(theirs.shape[1], ours.completion_ids.shape[1])
    assert torch.equal((ours.completion_ids * ours.mask.long())[:, :c], (theirs * ours.mask.long()[:, :c])[:, :c])


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



def test_length_buckets():
    from rlhf.lm.forward import length_buckets

    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 0, 0, 0, 0, 0], [1, 1, 0, 0, 0, 0], [1, 1, 1, 1, 1, 1]])
    (short, w1), (long, w2) = length_buckets(mask.float())
    assert sorted(short.tolist()) == [1, 2] and w1 == 2 and sorted(long.tolist()) == [0, 3] and w2 == 6
    same = torch.ones(3, 4)
    [(rows, width)] = length_buckets(same)
    assert rows.tolist() == [0, 1, 2] and width == 4


def test_bucketed_forward_equals_full_sequence_forward(tiny_model):
    """Rows of very different lengths (two buckets) give the same log-probs, values and
    gradients as running each row's prompt + completion as one plain sequence."""
    from rlhf.core import selective_log_softmax

    policy = _policy(tiny_model, temperature=0.8, value_head=True)
    with torch.no_grad():
        for n, p in policy.model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
        policy.value_head.weight.normal_(0, 0.1)
    rows = [arith_row(12, 34), {"prompt": [{"role": "user", "content": "a longer question " * 3}]}]
    ids, attn = policy.encode_prompts([r["prompt"] for r in rows])
    roll = policy.generate(ids, attn, group_size=3, max_new_tokens=8)
    lengths = [1, 8, 2, 8, 8, 3]
    roll.mask = (torch.arange(roll.completion_ids.shape[1])[None] < torch.tensor(lengths)[:, None]).float()
    out = policy.forward(roll, values=True)
    full_ids = torch.cat([ids.repeat_interleave(3, 0), roll.completion_ids], 1)
    full_attn = torch.cat([attn.repeat_interleave(3, 0), roll.mask], 1)
    pos = (full_attn.cumsum(-1) - 1).clamp(min=0)
    res = policy.model(input_ids=full_ids, attention_mask=full_attn, position_ids=pos, output_hidden_states=True)
    c = roll.completion_ids.shape[1]
    plain = selective_log_softmax(res.logits[:, -c - 1:-1] / 0.8, roll.completion_ids) * roll.mask
    plain_v = policy.value_head(res.hidden_states[-1][:, -c - 1:-1]).squeeze(-1) * roll.mask
    torch.testing.assert_close(out["logp"], plain, atol=1e-5, rtol=0)
    torch.testing.assert_close(out["values"], plain_v, atol=1e-5, rtol=0)
    params = policy.trainable_parameters()
    g_ours = torch.autograd.grad((out["logp"].sum() + out["values"].sum()), params)
    g_plain = torch.autograd.grad((plain.sum() + plain_v.sum()), params)
    for a, b in zip(g_ours, g_plain):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_gradient_checkpointing_gives_the_same_logp_values_and_gradients(tiny_model):
    """With gradient checkpointing the training forward runs whole sequences (checkpointed
    layers keep no KV cache); it must agree with the prompt-sharing forward."""
    policy = _policy(tiny_model, value_head=True)
    with torch.no_grad():
        for n, p in policy.model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
        policy.value_head.weight.normal_(0, 0.1)
    ids, attn = policy.encode_prompts([arith_row(12, 34)["prompt"], arith_row(56, 7)["prompt"]])
    roll = policy.generate(ids, attn, group_size=2, max_new_tokens=6)
    params = policy.trainable_parameters()
    policy.model.train()

    def run():
        out = policy.forward(roll, values=True, entropy=True)
        return out, torch.autograd.grad(out["logp"].sum() + out["values"].sum(), params)

    shared, g_shared = run()
    policy.enable_gradient_checkpointing()
    full, g_full = run()
    for key in ("logp", "values", "entropy"):
        torch.testing.assert_close(full[key], shared[key], atol=1e-5, rtol=0)
    for a, b in zip(g_full, g_shared):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_separate_critic_has_its_own_trunk(tiny_model, tmp_path):
    """critic: separate -- values come from a second LoRA-adapted copy of the base: they match a
    plain full-sequence pass of that copy, their gradient never reaches the policy's adapter,
    the policy's log-probs are unchanged, and both adapters save and load."""
    from rlhf.core import selective_log_softmax

    policy = _policy(tiny_model, value_head=True, critic="separate")
    assert policy.critic_model is not policy.model
    with torch.no_grad():
        for model in (policy.model, policy.critic_model):
            for n, p in model.named_parameters():
                if "lora_B" in n:
                    p.normal_(0, 0.05)
        policy.value_head.weight.normal_(0, 0.1)
    ids, attn = policy.encode_prompts([arith_row(12, 34)["prompt"]])
    roll = policy.generate(ids, attn, group_size=3, max_new_tokens=6)
    out = policy.forward(roll, values=True)
    full_ids = torch.cat([ids.repeat_interleave(3, 0), roll.completion_ids], 1)
    full_attn = torch.cat([attn.repeat_interleave(3, 0), roll.mask], 1)
    pos = (full_attn.cumsum(-1) - 1).clamp(min=0)
    c = roll.completion_ids.shape[1]
    crit = policy.critic_model(input_ids=full_ids, attention_mask=full_attn, position_ids=pos,
                               output_hidden_states=True)
    plain_v = policy.value_head(crit.hidden_states[-1][:, -c - 1:-1]).squeeze(-1) * roll.mask
    torch.testing.assert_close(out["values"], plain_v, atol=1e-5, rtol=0)
    act = policy.model(input_ids=full_ids, attention_mask=full_attn, position_ids=pos)
    plain_logp = selective_log_softmax(act.logits[:, -c - 1:-1], roll.completion_ids) * roll.mask
    torch.testing.assert_close(out["logp"], plain_logp, atol=1e-5, rtol=0)
    actor_params = [p for p in policy.model.parameters() if p.requires_grad]
    critic_params = [p for p in policy.critic_model.parameters() if p.requires_grad]
    g_actor = torch.autograd.grad(out["values"].sum(), actor_params, allow_unused=True, retain_graph=True)
    assert all(g is None or float(g.abs().max()) == 0 for g in g_actor)
    g_critic = torch.autograd.grad(out["values"].sum(), critic_params)
    assert max(float(g.abs().max()) for g in g_critic) > 0
    assert len(policy.trainable_parameters()) == len(actor_params) + len(critic_params) + 2

    policy.save_adapter(tmp_path / "adapter")
    again = LMPolicy(tiny_model, adapter_path=str(tmp_path / "adapter"), value_head=True, critic="separate")
    torch.testing.assert_close(again.forward(roll, values=True)["values"], out["values"].detach())
