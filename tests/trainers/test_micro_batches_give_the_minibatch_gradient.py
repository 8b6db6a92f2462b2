"""micro_batch_size splits an optimiser minibatch into forward/backward passes of fewer rows with
the same gradient as the unsplit step, per parameter, within a bound derived from the order of
the floating-point sums (below); a micro-batch normalised by its own tokens would fall outside.

The bound. Each entry of the gradient is one real number, ``g_p = sum_r g_{r,p}``: the sum over
the minibatch's rows r of their contributions, each already divided by the whole minibatch's
normaliser. Whole and split steps evaluate the same expression in float32 and differ only in
the order of the additions (which rows share a GEMM, where the accumulation in ``.grad``
splits the sum) and in which kernel ran a row's forward (batch shapes differ: oneDNN / AMX,
AVX-512 or AVX2 pick their own blocking). IEEE round-to-nearest alone bounds each evaluation's
error by ``gamma_K * sum_r |g_{r,p}|`` (Higham, Accuracy and Stability, Lemma 3.1 / eq. 3.5 for
sums and dot products in any order), ``gamma_K = K u / (1 - K u)``, ``u = 2^-24``, K the longest
chain of roundings one contribution passes: the sum over the step's tokens into the weight's
gradient (N * C), and per token the reductions of the forward and backward through every layer
(hidden d, MLP d_ff, attention keys Lp + C, each twice) and the head (vocab V, twice). So

    |g_split - g_whole| <= 2 * gamma_K * S_p,   S_p = sum_r |g_{r,p}|

(each side at most gamma_K * S_p from the exact value). Assumed: the tiny random network does
not amplify a rounding beyond its first-order size (every block is normalised; its condition
is O(1)), as the bf16 bound in tests/lm assumes. Nothing depends on the CPU's instruction set.
S_p is measured: every row's contribution computed alone (micro-batches of one row).
"""
import pytest
import torch

from rlhf.config import LMConfig
from rlhf.distributed import OneProcess
from rlhf.lm.rollout import RolloutPass
from rlhf.tasks import arith_row
from rlhf.trainers.lm import minibatch_gradients

from conftest import policy_with_adapter

U = 2.0 ** -24
N_PROMPTS, G, C = 2, 4, 6  # 8 rows of at most 6 tokens


class PerRow(OneProcess):
    """One process whose backward also records sum_r |g_r| per parameter (S_p above)."""

    def __init__(self, params):
        self.params = params
        self.abs_sum = [torch.zeros_like(p) for p in params]

    def backward(self, loss):
        grads = torch.autograd.grad(loss, self.params, allow_unused=True)
        for p, g, s in zip(self.params, grads, self.abs_sum):
            if g is not None:
                p.grad = g.clone() if p.grad is None else p.grad + g
                s += g.abs()


def _setup(tiny_model, ppo: bool):
    policy = policy_with_adapter(tiny_model, value_head=ppo)
    rows = [arith_row(12, 34), arith_row(56, 78)]
    ids, attn = policy.encode_prompts([r["prompt"] for r in rows])
    uniforms = torch.rand(N_PROMPTS * G, C, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    roll = policy.generate(ids, attn, group_size=G, max_new_tokens=C, uniforms=uniforms)
    # rows of different lengths (the tiny model rarely ends one), so seq_mean weighs rows unequally
    roll.mask = roll.mask * (torch.arange(C) < torch.tensor([6, 3, 5, 1, 6, 2, 4, 6])[:, None])
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        out = policy.forward(roll, values=ppo)
        # old log-probs off the current ones, so part of the tokens are clipped (ratio outside 1 +- 0.2)
        old = out["logp"] + 0.3 * torch.randn(roll.mask.shape, generator=gen) * roll.mask
        ref = policy.logp(roll, adapter=False)
    shape = roll.mask.shape if ppo else roll.mask.shape[:1]
    adv = torch.randn(shape, generator=gen)
    ret = torch.randn(roll.mask.shape, generator=gen) * roll.mask if ppo else None
    old_values = out["values"] + 0.1 * torch.randn(roll.mask.shape, generator=gen) if ppo else None
    return policy, roll, adv, ret, RolloutPass(ref, old, old_values)


def _gradient(policy, roll, adv, ret, passes, cfg, dist):
    params = policy.trainable_parameters()
    for p in params:
        p.grad = None
    stats, _, bad = minibatch_gradients(policy, roll, torch.arange(N_PROMPTS), adv, ret, passes, roll.mask, cfg,
                                        dist, None, first=True)
    assert not bad
    return [p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in params], stats


def _k(policy, roll) -> int:
    """K of the docstring for this model and rollout."""
    c = policy.model.config
    keys = roll.prompt_ids.shape[1] + C
    per_layer = 2 * (c.hidden_size + c.intermediate_size + keys)
    return roll.mask.numel() + c.num_hidden_layers * per_layer + 2 * c.vocab_size


@pytest.mark.parametrize("agg,ppo", [("token_mean", False), ("seq_mean", False), ("constant", False),
                                     ("token_mean", True)], ids=["token_mean", "seq_mean", "constant", "ppo"])
def test_micro_batches_give_the_minibatch_gradient_per_parameter(tiny_model, agg, ppo):
    policy, roll, adv, ret, passes = _setup(tiny_model, ppo)
    cfg = LMConfig(agg=agg, max_new_tokens=C, kl_coef=0.04, tis="none")
    whole, whole_stats = _gradient(policy, roll, adv, ret, passes, cfg, OneProcess())
    per_row = PerRow(policy.trainable_parameters())
    cfg.micro_batch_size = 1  # every row alone: S_p, and one split of the sum
    ones, one_stats = _gradient(policy, roll, adv, ret, passes, cfg, per_row)
    cfg.micro_batch_size = 3  # micro-batches that cut groups (their rows each get their prompt)
    threes, _ = _gradient(policy, roll, adv, ret, passes, cfg, OneProcess())
    k = _k(policy, roll)
    gamma = k * U / (1 - k * U)
    names = [n for n, p in policy.net.named_parameters() if p.requires_grad]
    assert len(names) == len(whole)
    moved = 0
    for name, w, a, b, s in zip(names, whole, ones, threes, per_row.abs_sum):
        bound = 2 * gamma * s
        assert ((a - w).abs() <= bound).all(), (name, float(((a - w).abs() - bound).max()))
        assert ((b - w).abs() <= bound).all(), (name, float(((b - w).abs() - bound).max()))
        moved += int((w != 0).sum())
    assert moved > 100  # the gradient is not trivially zero
    # the stats are the minibatch's: sums (loss parts) and token-weighted means (clip_frac, entropy, ...)
    for key, v in whole_stats.items():
        assert one_stats[key] == pytest.approx(v, rel=1e-5, abs=1e-6), key
    if ppo:
        assert "vf_loss" in whole_stats and whole_stats["vf_loss"] > 0
    assert 0 < whole_stats["clip_frac"] < 1


def test_a_micro_batch_normalised_by_its_own_tokens_falls_outside_the_bound(tiny_model, monkeypatch):
    """What the bound is for: the wrong normaliser (each micro-batch's own token count, what a
    plain loop over micro-batches calling the loss would do) changes the gradient far beyond it."""
    import rlhf.trainers.lm as lm

    policy, roll, adv, ret, passes = _setup(tiny_model, False)
    cfg = LMConfig(agg="token_mean", max_new_tokens=C, kl_coef=0.04, tis="none")
    whole, _ = _gradient(policy, roll, adv, ret, passes, cfg, OneProcess())
    per_row = PerRow(policy.trainable_parameters())
    cfg.micro_batch_size = 1
    _gradient(policy, roll, adv, ret, passes, cfg, per_row)
    real = lm.micro_loss
    monkeypatch.setattr(lm, "micro_loss", lambda out, roll, rows, *a, **kw: real(
        out, roll, rows, *a[:-2], float(roll.mask[rows].sum()), a[-1], **kw))
    cfg.micro_batch_size = 3
    wrong, _ = _gradient(policy, roll, adv, ret, passes, cfg, OneProcess())
    gamma = _k(policy, roll) * U
    outside = sum(int(((x - w).abs() > 2 * gamma * s).sum()) for x, w, s in zip(wrong, whole, per_row.abs_sum))
    assert outside > 100


def test_deepspeed_refuses_micro_batches_in_one_sentence():
    """DeepSpeed's engine steps the optimiser inside each backward: it cannot accumulate them."""
    from types import SimpleNamespace

    from rlhf.distributed import Dist
    from rlhf.errors import UserError

    Dist.check_micro_batches(SimpleNamespace(kind="DEEPSPEED"), 0)
    Dist.check_micro_batches(SimpleNamespace(kind="MULTI_CPU"), 4)
    with pytest.raises(UserError, match="micro_batch_size=4 .*set micro_batch_size: 0 under DeepSpeed"):
        Dist.check_micro_batches(SimpleNamespace(kind="DEEPSPEED"), 4)
