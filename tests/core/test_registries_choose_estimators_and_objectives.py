"""The registries of ``rlhf.core``: advantage estimators and policy objectives are chosen by the
recipe's own names, one signature each, and adding an estimator is one function and its
registration (the LM trainer then trains with it)."""
from __future__ import annotations

import math

import pytest
import torch

from rlhf.core import (ADV_ESTIMATORS, POLICY_OBJECTIVES, AdvInput, Registry, discounted_returns, gae,
                       group_normalize, leave_one_out, policy_loss, register_adv_est)
from rlhf.errors import UserError


def test_lookup_fails_in_one_sentence_that_lists_the_valid_names():
    with pytest.raises(ValueError, match=r"^unknown adv_estimator 'gea'; valid: gae, grpo, reinforce, rloo$"):
        ADV_ESTIMATORS.get("gea")
    with pytest.raises(ValueError, match=r"unknown objective 'clipped'; valid: adaptive_kl, clip, kl_penalty, "
                                         r"none, reinforce"):
        POLICY_OBJECTIVES.get("clipped")


def test_a_name_is_registered_once_and_entries_may_be_imported_lazily():
    reg = Registry("thing")
    reg.register("a", "b")(len)
    with pytest.raises(ValueError, match="registered already"):
        reg.register("a")(max)
    reg.register("lazy")("math:sqrt")
    assert reg.get("lazy") is math.sqrt and reg.get("b") is len and list(reg) == ["a", "b", "lazy"]
    reg.unregister("a")
    assert "a" not in reg


def test_the_built_in_estimators_are_the_pure_functions():
    """One signature: ``estimator(AdvInput) -> (adv, ret-or-None)``, thin over core's maths."""
    torch.manual_seed(0)
    r, valid = torch.randn(8), torch.tensor([1, 1, 0, 1, 1, 1, 1, 0], dtype=torch.bool)
    x = AdvInput(r, valid=valid, group_size=4, scale_rewards="batch")
    assert torch.equal(ADV_ESTIMATORS.get("grpo")(x)[0], group_normalize(r, 4, "batch", valid=valid))
    assert torch.equal(ADV_ESTIMATORS.get("rloo")(x)[0], leave_one_out(r, 4, valid=valid))
    assert ADV_ESTIMATORS.get("grpo")(x)[1] is None
    # LM reinforce: reward minus the moving baseline
    adv, ret = ADV_ESTIMATORS.get("reinforce")(AdvInput(r, baseline=lambda rw: torch.tensor(0.5)))
    assert torch.equal(adv, r - 0.5) and ret is None
    # gym: per-step rewards [N envs, T] with bootstrap tensors
    rw, v, nv = torch.randn(2, 5), torch.randn(2, 5), torch.randn(2, 5)
    term = torch.tensor([[0, 0, 1, 0, 0], [0, 0, 0, 0, 0.]])
    dones = torch.tensor([[0, 0, 1, 0, 0], [0, 1, 0, 0, 0.]])  # env 1 truncated at step 1
    g = AdvInput(rw, values=v, gamma=0.9, gae_lambda=0.8, next_values=nv, terminated=term, dones=dones,
                 last_value=nv[:, -1])
    adv, ret = ADV_ESTIMATORS.get("gae")(g)
    expected = gae(rw, v, 0.9, 0.8, next_values=nv, terminated=term, dones=dones)
    assert torch.equal(adv, expected[0]) and torch.equal(ret, expected[1])
    adv, ret = ADV_ESTIMATORS.get("reinforce")(g)
    mc = discounted_returns(rw + 0.9 * (dones - term) * nv, 0.9, dones=dones, last_value=nv[:, -1])
    assert torch.equal(ret, mc) and torch.equal(adv, mc - v)


def test_lm_gae_puts_the_reward_on_the_last_token():
    # row 0: 3 tokens, reward 1; row 1: 1 token, reward 0; V = 0, gamma 1, lambda 0.5: A = [0.25, 0.5, 1]
    mask = torch.tensor([[1, 1, 1], [1, 0, 0.]])
    adv, ret = ADV_ESTIMATORS.get("gae")(AdvInput(torch.tensor([1.0, 0.0]), mask=mask, values=torch.zeros(2, 3),
                                                  gae_lambda=0.5))
    assert adv.tolist() == [[0.25, 0.5, 1.0], [0.0, 0.0, 0.0]] and torch.equal(ret, adv)


def test_objectives_by_the_recipes_names():
    """none is the KL-penalised surrogate at beta 0; adaptive_kl is kl_penalty at the beta passed."""
    torch.manual_seed(1)
    logp, old, adv = torch.randn(3, 4, requires_grad=True), torch.randn(3, 4), torch.randn(3, 4)
    kw = dict(old_logp=old, clip_range=0.2)
    none, _ = policy_loss(logp, adv, objective="none", penalty_coef=5.0, **kw)
    zero, _ = policy_loss(logp, adv, objective="kl_penalty", penalty_coef=0.0, **kw)
    adaptive, _ = policy_loss(logp, adv, objective="adaptive_kl", penalty_coef=0.7, **kw)
    fixed, _ = policy_loss(logp, adv, objective="kl_penalty", penalty_coef=0.7, **kw)
    assert torch.equal(none, zero) and torch.equal(adaptive, fixed)
    pg, _ = policy_loss(logp, adv, objective="reinforce")
    assert torch.allclose(pg, (-adv * logp).mean())


def test_adv_estimator_defaults_follow_the_algo_and_unknown_names_are_refused():
    from rlhf.config import load_recipe

    assert [load_recipe(None, [f"algo={a}", "group_size=2"]).adv_estimator
            for a in ("grpo", "rloo", "reinforce", "ppo")] == ["grpo", "rloo", "reinforce", "gae"]
    assert [load_recipe(None, ["env=CartPole-v1", f"algo={a}"]).adv_estimator
            for a in ("reinforce", "a2c", "ppo", "trpo", "dqn")] == ["reinforce", "gae", "gae", "gae", None]
    with pytest.raises(UserError, match=r"adv_estimator='gea' is not valid; choose one of gae, grpo, reinforce, rloo"):
        load_recipe(None, ["adv_estimator=gea"])
    with pytest.raises(UserError, match="pair gae with algo ppo only"):
        load_recipe(None, ["adv_estimator=gae"])
    assert load_recipe(None, ["adv_estimator=rloo"]).adv_estimator == "rloo"  # grpo's loop, rloo's baseline


def test_a_registered_toy_estimator_trains_a_step_of_the_lm_trainer(tiny_model, tmp_path):
    """Adding an estimator is one function and its registration: the recipe names it, and the
    advantages it returned are the ones the trainer logged and fed to the loss."""
    from safetensors.torch import load_file

    from rlhf.config import load_recipe
    from rlhf.run import Run
    from rlhf.trainers import get_trainer

    calls = []

    @register_adv_est("toy")
    def toy(x: AdvInput):
        """Every completion's advantage: its index, centred (ignores the rewards)."""
        adv = torch.arange(len(x.rewards), dtype=torch.float32)
        calls.append(adv - adv.mean())
        return x.local(calls[-1]), None

    try:
        cfg = load_recipe(None, [f"model={tiny_model}", "task=arith", "rewards=[length_penalty]", "steps=1",
                                 "prompts_per_step=2", "group_size=2", "max_new_tokens=4", "save_every=0",
                                 "adv_estimator=toy", "debug_tensors=true", f"out_dir={tmp_path}", "threads=1"])
        run = Run(cfg, run_dir=str(tmp_path / "run"))
        get_trainer(cfg)(cfg, run, progress=False)
    finally:
        ADV_ESTIMATORS.unregister("toy")
    assert "toy" not in ADV_ESTIMATORS and len(calls) == 1
    dumped = load_file(str(tmp_path / "run" / "debug" / "step0001_rank0.safetensors"))
    assert torch.equal(dumped["adv"], calls[0])  # what the update's loss received
    assert (tmp_path / "run" / "adapter").exists()
