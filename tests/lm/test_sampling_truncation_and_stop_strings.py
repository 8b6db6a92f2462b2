"""top_k / top_p / min_p and stop strings: the truncation by hand, the trainer's log-probs
under the sampler's truncated distribution, and completions that end at a stop string."""
import math

import pytest
import torch

from rlhf.core.logprobs import Truncation, truncated_linear_logprobs, truncation_mask
from rlhf.lm.policy import LMPolicy
from rlhf.lm.sampler import stop_hit
from rlhf.tasks import arith_row

P = torch.tensor([[0.4, 0.3, 0.2, 0.1]])
LOGITS = P.log()


def _kept_probs(trunc: Truncation) -> list[float]:
    keep = truncation_mask(LOGITS, trunc)
    p = torch.where(keep, P, 0.0)
    return (p / p.sum()).squeeze(0).tolist()


@pytest.mark.parametrize("trunc, expected", [
    (Truncation(top_k=2), [4 / 7, 3 / 7, 0, 0]),
    # smallest top set with mass >= 0.5: 0.4 < 0.5, 0.4 + 0.3 >= 0.5
    (Truncation(top_p=0.5), [4 / 7, 3 / 7, 0, 0]),
    # p >= 0.3 * 0.4 = 0.12 keeps 0.4, 0.3, 0.2
    (Truncation(min_p=0.3), [4 / 9, 3 / 9, 2 / 9, 0]),
    # top_p alone at 0.75 keeps three (0.4 + 0.3 < 0.75); after top_k=3 the renormalised
    # 4/9 + 3/9 = 0.78 >= 0.75 already: two (top_p applies to the top_k distribution, as in HF)
    (Truncation(top_p=0.75), [4 / 9, 3 / 9, 2 / 9, 0]),
    (Truncation(top_k=3, top_p=0.75), [4 / 7, 3 / 7, 0, 0]),
    (Truncation(top_k=3, top_p=0.5, min_p=0.3), [4 / 7, 3 / 7, 0, 0]),
    (Truncation(), [0.4, 0.3, 0.2, 0.1]),
])
def test_truncation_by_hand(trunc, expected):
    # float32 probabilities of a 4-way categorical: errors ~1e-7, far below 1e-6
    assert _kept_probs(trunc) == pytest.approx(expected, abs=1e-6)


def test_truncation_keeps_ties_and_the_top_token():
    x = torch.tensor([[2.0, 1.0, 1.0, 0.0], [5.0, -1.0, -2.0, -3.0]])
    assert truncation_mask(x, Truncation(top_k=2)).tolist() == [[True, True, True, False],
                                                               [True, True, False, False]]
    assert truncation_mask(x, Truncation(top_p=1e-6))[:, 0].all()


def test_truncated_linear_logprobs_by_hand():
    # logits = log p exactly (identity weight): top_p=0.5 keeps tokens 0 and 1; a chosen
    # token outside the kept set (3) is kept too, so it is never -inf: 0.1 / (0.4+0.3+0.1)
    hidden = LOGITS.repeat(3, 1)
    ids = torch.tensor([0, 1, 3])
    logp, ent = truncated_linear_logprobs(hidden, torch.eye(4), ids, 1.0, Truncation(top_p=0.5), entropy=True)
    want = [math.log(4 / 7), math.log(3 / 7), math.log(0.125)]
    assert logp.tolist() == pytest.approx(want, abs=1e-6)
    h2 = -(4 / 7 * math.log(4 / 7) + 3 / 7 * math.log(3 / 7))
    h3 = -sum(q * math.log(q) for q in (0.5, 0.375, 0.125))
    assert ent.tolist() == pytest.approx([h2, h2, h3], abs=1e-6)


@pytest.mark.parametrize("trunc", [Truncation(top_p=0.9), Truncation(top_k=5, min_p=0.2)])
def test_truncated_linear_logprobs_matches_masked_log_softmax(trunc):
    """Values and gradients equal autograd through the plain masked log-softmax, with blocks of
    rows smaller than the input (block_elems = 3 rows of V)."""
    g = torch.Generator().manual_seed(0)
    h = torch.randn(7, 6, generator=g, dtype=torch.float64).requires_grad_()
    w = torch.randn(11, 6, generator=g, dtype=torch.float64).requires_grad_()
    ids = torch.randint(0, 11, (7,), generator=g)
    logp, _ = truncated_linear_logprobs(h, w, ids, 0.7, trunc, block_elems=33)
    x = (h @ w.t()) / 0.7
    keep = truncation_mask(x.detach(), trunc)
    keep[torch.arange(7), ids] = True
    plain = torch.log_softmax(x.masked_fill(~keep, float("-inf")), -1).gather(-1, ids[:, None]).squeeze(-1)
    # float64 in, float32 logits inside: agreement to float32 rounding of O(1) values
    torch.testing.assert_close(logp, plain.float(), atol=1e-5, rtol=0)
    weights = torch.randn(7, generator=g, dtype=torch.float64)
    ga = torch.autograd.grad((logp.double() * weights).sum(), (h, w))
    gb = torch.autograd.grad((plain * weights).sum(), (h, w))
    for a, b in zip(ga, gb):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def _policy(tiny_model, **kw):
    torch.manual_seed(0)
    return LMPolicy(tiny_model, lora_r=4, lora_alpha=8, **kw)


def _rollout(policy, g=4, n=10):
    rows = [arith_row(12, 34), arith_row(56, 78)]
    ids, attn = policy.encode_prompts([r["prompt"] for r in rows])
    u = torch.rand(2 * g, n, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    return policy.generate(ids, attn, group_size=g, max_new_tokens=n, uniforms=u)


@pytest.mark.parametrize("opts", [{"top_p": 0.9}, {"top_k": 20}, {"min_p": 0.5, "top_p": 0.95}])
def test_trainer_logp_uses_the_samplers_truncated_distribution(tiny_model, opts):
    """logp_gap_rollout_trainer stays ~0 under truncation. The sampler's logits (KV-cache decode)
    and the trainer's (prompt cache + batched completions) differ only by float32 rounding:
    ~1e-7 relative per op over two layers of width 32, i.e. ~1e-6 on O(1) logits, and a
    log-prob moves by at most twice its logits' change; 1e-4 leaves a wide margin on any CPU.
    (A flip of the kept set at a near-tie would show as ~1/V = 3e-3; none occurs here.)
    Without the renormalisation the gap is -log(kept mass) per token, >= 1e-2 here."""
    policy = _policy(tiny_model, temperature=0.7)
    with torch.no_grad():  # a non-trivial adapter, so policy and reference differ
        for n, p in policy.model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    policy.set_options(**opts)
    roll = _rollout(policy)
    logp = policy.logp(roll)
    gap = ((logp - roll.rollout_logp).abs() * roll.mask).max()
    assert gap < 1e-4
    # the control: the full distribution's log-probs are far from the sampler's
    policy.net.truncation = Truncation()
    untruncated = policy.logp(roll)
    assert ((untruncated - roll.rollout_logp).abs() * roll.mask).sum() / roll.mask.sum() > 1e-2
    # every sampled token is inside the kept set the trainer computes, and the sampler's
    # log-probs are >= the full distribution's (renormalised over fewer tokens)
    assert ((roll.rollout_logp - untruncated) * roll.mask >= -1e-4).all()
    # the reference keeps its full distribution (finite KL against the truncated policy)
    ref = policy.logp(roll, adapter=False)
    assert torch.isfinite(ref).all()


def test_top_k_one_is_greedy(tiny_model):
    policy = _policy(tiny_model)
    policy.set_options(top_k=1)
    sampled = _rollout(policy, g=2)
    ids, attn = sampled.prompt_ids, sampled.prompt_mask
    greedy = policy.generate(ids, attn, 1, 10, greedy=True)
    c = greedy.completion_ids.shape[1]
    assert torch.equal(sampled.completion_ids[::2, :c], greedy.completion_ids)
    assert (sampled.rollout_logp.abs() < 1e-6).all()  # one kept token: probability 1


def _char_ids(policy, text):
    return [policy.tokenizer.convert_tokens_to_ids(policy.tokenizer.tokenize(ch))[0] for ch in text]


def test_stop_string_across_tokens(tiny_model):
    policy = _policy(tiny_model)
    policy.set_options(stop=["ab"])
    tokens = torch.tensor([_char_ids(policy, "xaby")])
    stopped = torch.full((1,), -1)
    live = torch.tensor([0])
    assert not stop_hit(policy.decode_settings(), tokens, live, 1, stopped)[0]      # "xa"
    assert stop_hit(policy.decode_settings(), tokens, live, 2, stopped)[0]          # "xab": the stop string ends at token 2
    assert stopped.tolist() == [2]


def test_completions_end_at_the_first_stop_string(tiny_model):
    policy = _policy(tiny_model)
    free = _rollout(policy, n=12)
    texts = [policy.tokenizer.decode(r) for r in free.completion_ids.tolist()]
    stop = max("0123456789", key=lambda ch: sum(ch in t for t in texts))  # the commonest digit
    policy.set_options(stop=[stop])
    roll = _rollout(policy, n=12)  # same uniforms: the same tokens up to each stop
    lengths = roll.mask.sum(1).long().tolist()
    stopped_rows = 0
    for row, k in enumerate(lengths):
        ids = roll.completion_ids[row].tolist()
        assert ids[:k] == free.completion_ids[row, :k].tolist()
        text = policy.tokenizer.decode(ids[:k])
        if stop in text:  # ends with the token that completes it (included), nothing after
            stopped_rows += 1
            assert stop not in policy.tokenizer.decode(ids[:k - 1])
            assert not roll.truncated[row]
            assert (roll.rollout_logp[row, k:] == 0).all()
    assert stopped_rows >= 1
    # rewards see the decoded kept tokens: text up to and including the stop string
    assert sum(t.endswith(stop) for t in policy.decode(roll.completion_ids, roll.mask)) == stopped_rows
    torch.testing.assert_close(policy.logp(roll), roll.rollout_logp, atol=1e-4, rtol=0)


@pytest.mark.parametrize("item, match", [
    ("top_p=0", r"top_p must be in \(0, 1\] \(got 0"), ("top_k=-1", "top_k must be >= 0"),
    ("min_p=1.5", r"min_p must be in \[0, 1\]"), ('stop=[""]', "stop must be a list of non-empty strings"),
    ("max_prompt_length=-1", "max_prompt_length must be >= 0"),
])
def test_bad_generation_keys_are_one_sentence(item, match):
    from rlhf.config import load_recipe
    from rlhf.errors import UserError

    with pytest.raises(UserError, match=match):
        load_recipe(None, [item])
