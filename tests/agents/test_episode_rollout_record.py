"""Multi-turn episodes as a rollout source, on the tiny model: token-in/token-out (the record's
ids are the conversation the template renders, built turn by turn), environment ids mask 0 and
attended, the policy's own ids mask 1, the prefix property checked, the turn and token budgets,
invalid actions, GRPO groups from one seed, the sampler/trainer log-prob gap over whole
episodes, and ``choose`` mode's log-probs against a softmax computed by hand."""
import pytest
import torch

from rlhf.agents.choose import ChoicePolicy, reply_ids
from rlhf.agents.env_loading import env_factory
from rlhf.agents.episodes import EpisodeSettings, EpisodeSource
from rlhf.core import selective_log_softmax
from rlhf.errors import UserError
from rlhf.testing import CHAT_TEMPLATE

from conftest import logp_rounding_bound

ROWS = [{"seed": 3}, {"seed": 4}]


@pytest.fixture(scope="module")
def policy(tiny_model):
    torch.manual_seed(0)
    p = ChoicePolicy(tiny_model, lora_r=4, lora_alpha=8, temperature=0.9)
    with torch.no_grad():  # a non-trivial adapter
        gen = torch.Generator().manual_seed(1)
        for n, w in p.model.named_parameters():
            if "lora_B" in n:
                w.copy_(torch.randn(w.shape, generator=gen) * 0.05)
    return p


def episodes(policy, mode="generate", g=2, rows=ROWS, env="FrozenLakeRandom-v0", **kw):
    settings = EpisodeSettings(**{"max_turns": 3, "max_turn_tokens": 6, "action_mode": mode, **kw})
    torch.manual_seed(5)
    return EpisodeSource(policy, env_factory(env), g, settings)(rows)


def full_text(policy, roll, i):
    ids = torch.cat([roll.prompt_ids[i // roll.group_size][roll.prompt_mask[i // roll.group_size] > 0],
                     roll.completion_ids[i][roll.attention[i] > 0]])
    return policy.tokenizer.decode(ids)


def test_a_choose_episode_is_the_conversation_the_template_renders(policy):
    """The ids the trainer gets are those of the conversation rendered as a whole, the final
    observation aside; the policy's ids are its actions' (mask 1 on each action's first token)."""
    roll = episodes(policy, "choose")
    for i, messages in enumerate(roll.reward_inputs.prompts):
        conv = messages + roll.reward_inputs.completions[i]
        rendered = policy.tokenizer.apply_chat_template(conv[:-1], tokenize=False)
        assert full_text(policy, roll, i) + "\n" == rendered  # (the template's newline after the last turn)
        replies = [m["content"] for m in conv if m["role"] == "assistant"]
        assert len(replies) == int(roll.mask[i].sum()) == roll.reward_inputs.columns["turns"][i] == 3
        firsts = roll.completion_ids[i][roll.mask[i] > 0].tolist()
        assert firsts == [policy.tokenizer(r, add_special_tokens=False).input_ids[0] for r in replies]


def test_generate_episode_masks_the_environment_and_keeps_the_sampled_ids(policy):
    roll = episodes(policy, "generate")
    assert roll.completion_ids.shape[0] == 4 and roll.prompt_ids.shape[0] == 2
    for i in range(4):
        m, a = roll.mask[i], roll.attention[i]
        assert ((m == 1) <= (a == 1)).all() and (m < a).any()  # environment ids: attended, mask 0
        assert (roll.rollout_logp[i][m == 0] == 0).all() and (roll.rollout_logp[i][m == 1] < 0).all()
        n = int(a.sum())
        assert (a[:n] == 1).all() and (a[n:] == 0).all()  # contiguous, padding last
        # the environment's ids begin with the end of the assistant's turn the template writes
        env_start = int((m[:n] == 0).nonzero()[0])
        assert policy.tokenizer.decode(roll.completion_ids[i][env_start:n]).startswith(("<|im_end|>\n", "\n"))


def test_a_group_is_episodes_of_one_seed(policy):
    roll = episodes(policy, "choose", g=3)
    assert roll.group_size == 3 and roll.reward_inputs.columns["seed"] == [3, 3, 3, 4, 4, 4]
    assert roll.reward_inputs.prompts[0] == roll.reward_inputs.prompts[2] != roll.reward_inputs.prompts[3]


def test_sampler_and_trainer_agree_over_multi_turn_episodes(policy):
    """The training forward over a whole episode (environment ids attended, not scored) gives the
    log-probs the sampler drew with: within today's single-turn bound (fp32: 1e-4)."""
    for mode in ("generate", "choose"):
        roll = episodes(policy, mode)
        logp = policy.forward(roll)["logp"].detach()
        gap = ((logp - roll.rollout_logp).abs() * roll.mask).max()
        assert float(gap) < 1e-4, (mode, float(gap))
        assert (logp[roll.mask == 0] == 0).all()


def test_bf16_choose_sampler_and_trainer_agree_within_the_rounding_bound(tiny_model):
    """In bf16 the sampler (a KV cache kept across turns, candidates behind it) and the trainer
    (one pass, candidates under a 4-D mask) round differently. Each token log-prob is within
    B = logp_rounding_bound(u = 2^-8) of the exact one (IEEE round-to-nearest only: any CPU);
    an action's score sums at most L of them (L: its ids), and log pi(a) = s_a - logsumexp(s)
    moves by at most 2 max |ds| (logsumexp is 1-Lipschitz in the max norm), so the two differ
    by at most 2 * 2 * L * B (each side within 2 L B of the exact value)."""
    torch.manual_seed(0)
    p = ChoicePolicy(tiny_model, lora_r=4, lora_alpha=8, temperature=0.9, dtype="bfloat16")
    with torch.no_grad():
        gen = torch.Generator().manual_seed(1)
        for n, w in p.model.named_parameters():
            if "lora_B" in n:
                w.copy_(torch.randn(w.shape, generator=gen) * 0.05)
    roll = episodes(p, "choose")
    longest = max(len(c) for row in roll.choices for _, cands, _ in row for c in cands)
    bound = 4 * longest * logp_rounding_bound(p, 2.0 ** -8)
    with torch.no_grad():
        logp = p.forward(roll)["logp"]
    gap = ((logp - roll.rollout_logp).abs() * roll.mask).max()
    assert 0 < roll.mask.sum() and float(gap) <= bound, (float(gap), bound)


def test_a_micro_batch_of_a_choose_record_scores_its_actions(policy):
    """micro_batch_size splits a record into rows: a choose record's rows keep their turns, so
    they score the same log pi(a) as in the whole record (not the actions' text as generated)."""
    roll = episodes(policy, "choose", g=2)
    whole = policy.forward(roll, entropy=True)
    rows = torch.tensor([1, 2])
    part = policy.forward(roll.select_rows(rows), entropy=True)
    assert torch.allclose(part["logp"], whole["logp"][rows], atol=1e-5)
    assert torch.allclose(part["entropy"], whole["entropy"][rows], atol=1e-5)


@pytest.mark.parametrize("score", ["sum", "mean"])
def test_choose_logprobs_are_a_softmax_over_each_actions_sequence_logprob(policy, score):
    """log pi(a_t) = s_a - logsumexp_b s_b, s_b the sum of b's token log-probs (its text, then the
    end token) after the context (``mean``: that sum over b's token count), each computed here by
    a plain forward over the whole text."""
    roll = episodes(policy, "choose", g=1, rows=ROWS[:1], choose_score=score)
    names = ["left", "down", "right", "up"]
    cands = reply_ids(policy.tokenizer, names, policy.tokenizer.eos_token_id)
    prompt = roll.prompt_ids[0][roll.prompt_mask[0] > 0]
    trained = policy.forward(roll)["logp"].detach()
    for t, start in enumerate(roll.mask[0].nonzero()[:, 0].tolist()):
        s = []
        for c in cands:
            ids = torch.cat([prompt, roll.completion_ids[0, :start], torch.tensor(c)])[None]
            with torch.no_grad():
                logits = policy.model(input_ids=ids).logits[0, -len(c) - 1:-1] / 0.9
            s.append(selective_log_softmax(logits, torch.tensor(c)).sum() / (len(c) if score == "mean" else 1))
        chosen = names.index(roll.reward_inputs.completions[0][2 * t]["content"])
        expected = torch.log_softmax(torch.stack(s).double(), 0)[chosen]
        assert abs(float(trained[0, start]) - float(expected)) < 1e-5
        assert abs(float(roll.rollout_logp[0, start]) - float(expected)) < 1e-5


def test_a_template_that_rewrites_earlier_turns_is_refused(policy):
    """A thinking model's template that drops an earlier reply's text breaks the prefix property."""
    dropping = CHAT_TEMPLATE.replace("{{ m['content'] }}", "{% if m['role'] == 'assistant' and not loop.last %}"
                                     "...{% else %}{{ m['content'] }}{% endif %}")
    policy.tokenizer.chat_template = dropping
    try:
        with pytest.raises(UserError, match="breaks the prefix property") as err:
            episodes(policy, "choose")
    finally:
        policy.tokenizer.chat_template = CHAT_TEMPLATE
    import re
    said = re.sub(r"'[^']*'", "", str(err.value))  # (the quoted excerpts of the two renderings aside)
    assert "rendering the next turn rewrites earlier text (at character" in said and ". " not in said


def test_turn_and_token_budgets(policy):
    roll = episodes(policy, "generate", max_turns=2)
    assert roll.reward_inputs.columns["turns"] == [2, 2, 2, 2] and not roll.truncated.any()
    roll = episodes(policy, "generate", max_turns=50, max_episode_tokens=40)
    assert roll.truncated.all() and (roll.attention.sum(1) <= 40).all()


def test_invalid_actions_cost_the_penalty_or_end_the_episode(policy):
    """The tiny model's replies name no action: every turn is invalid."""
    cols = episodes(policy, "generate", invalid_penalty=-0.25).reward_inputs.columns
    assert cols["invalid_actions"] == cols["turns"] == [3, 3, 3, 3]
    assert cols["env_return"] == [-0.75] * 4
    cols = episodes(policy, "generate", invalid_action="end", invalid_penalty=-0.25).reward_inputs.columns
    assert cols["turns"] == [1] * 4 and cols["env_return"] == [-0.25] * 4


def test_gae_runs_over_the_policys_tokens_alone():
    """Environment tokens between two policy turns are no steps of the policy: GAE over a row
    with gaps equals GAE over its policy tokens packed together, scattered back; a prefix mask
    is untouched (bit for bit)."""
    from rlhf.core import gae

    mask = torch.tensor([[1., 1., 0., 0., 1., 0.], [1., 1., 1., 0., 0., 0.]])
    values = torch.tensor([[0.5, 0.2, 9.0, 9.0, 0.1, 9.0], [0.3, 0.4, 0.6, 0.0, 0.0, 0.0]])
    rewards = torch.tensor([[0.0, 0.0, 0.0, 0.0, 1.0, 0.0], [0.0, 0.0, 2.0, 0.0, 0.0, 0.0]])
    adv, ret = gae(rewards, values, 0.9, 0.8, mask=mask)
    packed, packed_ret = gae(torch.tensor([[0.0, 0.0, 1.0]]), torch.tensor([[0.5, 0.2, 0.1]]), 0.9, 0.8)
    assert adv[0, [0, 1, 4]].tolist() == packed[0].tolist() and adv[0, [2, 3, 5]].tolist() == [0.0] * 3
    assert ret[0, [0, 1, 4]].tolist() == packed_ret[0].tolist()
    # by hand: deltas 0 + 0.9*0.2 - 0.5 = -0.32, 0 + 0.9*0.1 - 0.2 = -0.11, 1 - 0.1 = 0.9
    assert torch.allclose(adv[0, [0, 1, 4]], torch.tensor([-0.32 + 0.72 * (-0.11 + 0.72 * 0.9),
                                                           -0.11 + 0.72 * 0.9, 0.9]))
    plain, _ = gae(rewards[1:], values[1:], 0.9, 0.8, mask=mask[1:])
    assert torch.equal(adv[1:], plain)
