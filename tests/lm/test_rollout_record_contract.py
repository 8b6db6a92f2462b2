"""The rollout record's contract: a mask that is not a prefix of ones (environment tokens
between the policy's), the attention over every real token, the last policy token, whole-group
selection, and today's sampler as one source of the record."""
import torch

from rlhf.config import LMConfig
from rlhf.core import selective_log_softmax
from rlhf.lm.forward import length_buckets
from rlhf.lm.policy import LMPolicy
from rlhf.lm.rollout import SamplerSource, collect
from rlhf.lm.rollout_record import RewardInputs, Rollout, RolloutSource, completion_id_lists, last_index
from rlhf.tasks import arith_row

# a policy turn, two environment tokens, a second policy turn, padding
MASK = torch.tensor([[1, 1, 0, 0, 1, 0], [1, 1, 1, 1, 1, 1], [0, 0, 0, 0, 0, 0]]).float()
ATTN = torch.tensor([[1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 1, 1], [0, 0, 0, 0, 0, 0]]).float()


def test_last_index_is_the_last_nonzero_not_the_count():
    assert last_index(MASK).tolist() == [4, 5, -1]
    prefix = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0], [1, 1, 1, 1]]).float()
    assert last_index(prefix).tolist() == (prefix.sum(1).long() - 1).tolist()  # today's formula, there
    roll = Rollout(torch.zeros(3, 1, dtype=torch.long), torch.ones(3, 1), torch.zeros(3, 6, dtype=torch.long),
                   MASK, torch.zeros(3, dtype=torch.bool), attn_mask=ATTN)
    assert roll.last_policy_token().tolist() == [4, 5, 0]


def test_length_buckets_measure_to_the_last_real_token():
    """A row's width runs to its last attended token, environment tokens included, so the
    training forward never cuts a turn off."""
    rows = torch.tensor([[1, 0, 0, 0, 0, 1], [1, 0, 0, 0, 0, 0], [1, 0, 0, 0, 0, 0]]).float()
    [(order, width)] = length_buckets(rows[:1])
    assert width == 6
    widths = {int(r): w for rs, w in length_buckets(rows) for r in rs}
    assert widths[0] == 6


def test_select_groups_keeps_attention_and_reward_inputs():
    ids = torch.arange(12).reshape(4, 3)
    inputs = RewardInputs(["p0", "p0", "p1", "p1"], ["a", "b", "c", "d"], {"answer": [1, 1, 2, 2]})
    roll = Rollout(torch.zeros(2, 1, dtype=torch.long), torch.ones(2, 1), ids, torch.ones(4, 3),
                   torch.zeros(4, dtype=torch.bool), group_size=2, attn_mask=torch.ones(4, 3) * 2,
                   reward_inputs=inputs)
    sub = roll.select_groups(torch.tensor([1]))
    assert sub.completion_ids.tolist() == ids[2:].tolist() and sub.attn_mask.shape == (2, 3)
    assert (sub.reward_inputs.prompts, sub.reward_inputs.completions) == (["p1", "p1"], ["c", "d"])
    assert sub.reward_inputs.columns == {"answer": [2, 2]}
    assert Rollout(roll.prompt_ids, roll.prompt_mask, ids, roll.mask, roll.truncated).attention is roll.mask


def _policy(tiny_model):
    torch.manual_seed(0)
    policy = LMPolicy(tiny_model, lora_r=4, lora_alpha=8, temperature=0.9)
    with torch.no_grad():  # a non-trivial adapter
        for n, p in policy.model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    return policy


def test_environment_tokens_are_attended_but_not_scored(tiny_model):
    """A completion with environment tokens (mask 0, attended) in the middle: the training
    forward's log-probs of the policy's tokens equal a plain forward over the whole sequence,
    and are 0 on the environment's tokens and on padding."""
    policy = _policy(tiny_model)
    ids, attn = policy.encode_prompts([arith_row(12, 34)["prompt"]])
    roll = policy.generate(ids, attn, group_size=3, max_new_tokens=6)
    c = roll.completion_ids.shape[1]
    mask, attn_mask = MASK[:, :c], ATTN[:, :c]
    episode = Rollout(ids, attn, roll.completion_ids, mask, roll.truncated, 3, attn_mask=attn_mask)
    out = policy.forward(episode)["logp"]
    full_ids = torch.cat([ids.repeat_interleave(3, 0), roll.completion_ids], 1)
    full_attn = torch.cat([attn.repeat_interleave(3, 0), attn_mask], 1)
    pos = (full_attn.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        logits = policy.model(input_ids=full_ids, attention_mask=full_attn, position_ids=pos).logits
    plain = selective_log_softmax(logits[:, -c - 1:-1] / 0.9, roll.completion_ids)
    torch.testing.assert_close(out, plain * mask, atol=1e-5, rtol=0)
    assert (out[mask == 0] == 0).all() and (out[mask == 1] != 0).all()


def test_the_sampler_is_a_rollout_source(tiny_model):
    """``SamplerSource`` fills the whole record, the reward inputs included, and ``collect``
    hands the trainer exactly what the record holds."""
    policy = _policy(tiny_model)
    cfg = LMConfig(model=tiny_model, group_size=2, max_new_tokens=5)
    rows = [arith_row(1, 2), arith_row(3, 4)]
    source: RolloutSource = SamplerSource(policy, cfg.group_size, cfg.max_new_tokens)
    torch.manual_seed(1)
    roll = source(rows)
    torch.manual_seed(1)
    again, prompts, completions, columns = collect(policy, rows, cfg)
    assert torch.equal(roll.completion_ids, again.completion_ids)
    assert (prompts, completions, columns) == (roll.reward_inputs.prompts, roll.reward_inputs.completions,
                                               roll.reward_inputs.columns)
    assert len(prompts) == len(roll) == 4 and prompts[0] == prompts[1] == rows[0]["prompt"]
    assert columns["answer"] == [rows[0]["answer"]] * 2 + [rows[1]["answer"]] * 2
    assert [len(x) for x in completion_id_lists(roll)] == roll.mask.sum(1).long().tolist()
