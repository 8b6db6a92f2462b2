"""Issue 13, items 5, 8 and 9: the adaptive-KL controller's input, refused one-step ratio
objectives, off-policy REINFORCE refused, and samples no reward function scored.

Names carry "kl", "none" or "reinforce" so ``pytest -k "kl or none or reinforce"`` selects them.
"""
import pytest

from rlhf.config import load_recipe
from rlhf.errors import UserError


# --- refusals at config load (items 5 and 9) ---------------------------------------------------

@pytest.mark.parametrize("algo", ["grpo", "rloo", "ppo"])
@pytest.mark.parametrize("objective", ["kl_penalty", "adaptive_kl", "none"])
def test_kl_ratio_objectives_with_one_update_step_are_refused(algo, objective):
    with pytest.raises(UserError, match=rf"objective {objective} with one optimiser step per rollout .*"
                                        r"set epochs or minibatches > 1"):
        load_recipe(None, [f"algo={algo}", f"objective={objective}", "epochs=1", "minibatches=1"])
    # two steps per rollout, by either knob, make the ratio and its penalty mean something
    assert load_recipe(None, [f"algo={algo}", f"objective={objective}", "epochs=2"]).epochs == 2
    assert load_recipe(None, [f"algo={algo}", f"objective={objective}", "minibatches=2"]).minibatches == 2


@pytest.mark.parametrize("objective", ["kl_penalty", "adaptive_kl"])
def test_gym_kl_objectives_with_one_update_step_are_refused(objective):
    base = ["env=CartPole-v1", "algo=ppo", f"objective={objective}", "n_envs=2", "n_steps=64"]
    with pytest.raises(UserError, match=rf"objective {objective} with one optimiser step per rollout.*"
                                        r"set epochs or minibatches > 1"):
        load_recipe(None, base + ["epochs=1", "minibatches=1"])
    with pytest.raises(UserError, match="one optimiser step per rollout"):  # the deprecated size, capped at n
        load_recipe(None, base + ["epochs=1", "minibatch_size=1000"])
    assert load_recipe(None, base + ["epochs=2", "minibatches=1"]).ppo_steps_per_rollout() == 2
    assert load_recipe(None, base + ["epochs=1", "minibatches=2"]).ppo_steps_per_rollout() == 2
    assert load_recipe(None, base[:2] + ["n_envs=2", "n_steps=64", "epochs=1", "minibatches=1"]).epochs == 1


@pytest.mark.parametrize("items", [["epochs=2"], ["minibatches=2"], ["epochs=3", "minibatches=2"]])
def test_reinforce_with_several_update_steps_is_refused(items):
    with pytest.raises(UserError, match=r"algo reinforce with epochs=\d x minibatches=\d > 1 trains off-policy "
                                        r"without importance weights.*use algo grpo, rloo or ppo.*"
                                        r"or epochs=1 and minibatches=1"):
        load_recipe(None, ["algo=reinforce", "prompts_per_step=4", *items])
    assert load_recipe(None, ["algo=reinforce"]).algo == "reinforce"  # one step: on-policy, accepted


# --- rows no reward function scored: the core estimators (item 8) ------------------------------

import math  # noqa: E402

import torch  # noqa: E402

from rlhf.core import group_normalize, leave_one_out  # noqa: E402

NAN = float("nan")
# float64 throughout: the expected values are exact up to one rounding of each operation


def T(x):
    return torch.tensor(x, dtype=torch.float64)


def test_group_normalize_leaves_none_rows_out_of_the_group_stats():
    # group 1: [1, 3, 5, None] -> mean 3, Bessel std over 3 rows sqrt((4 + 0 + 4) / 2) = 2 -> [-1, 0, 1, 0]
    # group 2: [2, 2, 4, 4] all scored -> mean 3, std sqrt(4 / 3)
    r = T([1.0, 3.0, 5.0, NAN, 2.0, 2.0, 4.0, 4.0])
    valid = torch.tensor([True, True, True, False, True, True, True, True])
    s = math.sqrt(4 / 3)
    torch.testing.assert_close(group_normalize(r, 4, eps=0.0, valid=valid),
                               T([-1.0, 0.0, 1.0, 0.0, -1 / s, -1 / s, 1 / s, 1 / s]))
    # scale none: only centred on the valid rows' mean
    torch.testing.assert_close(group_normalize(r, 4, scale_rewards="none", valid=valid),
                               T([-2.0, 0.0, 2.0, 0.0, -1.0, -1.0, 1.0, 1.0]))
    # scale batch: std over the 7 scored rows [1,3,5,2,2,4,4]: mean 3, sum of squares 12 / 6 -> sqrt 2
    torch.testing.assert_close(group_normalize(r, 4, scale_rewards="batch", eps=0.0, valid=valid),
                               T([-2.0, 0.0, 2.0, 0.0, -1.0, -1.0, 1.0, 1.0]) / math.sqrt(2))
    # the same rows without the None row, as a group of 3, give the same advantages
    torch.testing.assert_close(group_normalize(T([1.0, 3.0, 5.0]), 3, eps=0.0), T([-1.0, 0.0, 1.0]))


def test_group_normalize_with_none_groups_of_one_or_zero_scored_rows_gives_zero():
    r = T([7.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0])
    valid = torch.tensor([True, False, False, False, False, False, False, False])
    for scale in ("group", "batch", "none"):
        torch.testing.assert_close(group_normalize(r, 4, scale_rewards=scale, valid=valid), torch.zeros(8, dtype=torch.float64))


def test_leave_one_out_with_none_rows_averages_the_other_scored_rows():
    # [1, 2, 6, None]: baselines (2 + 6) / 2 = 4, (1 + 6) / 2 = 3.5, (1 + 2) / 2 = 1.5; None -> 0
    # [5, None, None, None]: no scored sibling -> no baseline -> 0
    r = T([1.0, 2.0, 6.0, NAN, 5.0, NAN, 0.0, 9.0])
    valid = torch.tensor([True, True, True, False, True, False, False, False])
    torch.testing.assert_close(leave_one_out(r, 4, valid=valid), T([-3.0, -1.5, 4.5, 0.0, 0.0, 0.0, 0.0, 0.0]))
    # all scored: the usual leave-one-out
    torch.testing.assert_close(leave_one_out(T([1.0, 2.0, 6.0, 3.0]), 4, valid=torch.ones(4, dtype=torch.bool)),
                               T([1 - 11 / 3, 2 - 10 / 3, 6 - 6 / 3, 3 - 9 / 3]))


def test_none_mask_of_the_wrong_shape_is_an_error():
    with pytest.raises(ValueError, match="valid must be"):
        group_normalize(T([1.0, 2.0]), 2, valid=torch.ones(3, dtype=torch.bool))


# --- rows no reward function scored: scoring and the LM advantages (item 8) ---------------------

from rlhf.lm.rollout import RolloutPass  # noqa: E402
from rlhf.rewards import load_rewards, score  # noqa: E402
from rlhf.trainers.lm import Baseline, advantages  # noqa: E402
from tests.trainers.test_lm_advantage_settings import roll_of  # noqa: E402


def test_score_returns_the_rows_no_reward_function_scored_none(tmp_path):
    f = tmp_path / "r.py"
    f.write_text("def a(prompts, completions, **kw):\n    return [None if c in ('x', 'y') else 1.0 for c in completions]\n"
                 "def b(prompts, completions, **kw):\n    return [2.0 if c == 'y' else None for c in completions]\n")
    total, means, scored = score(load_rewards([f"{f}:a", f"{f}:b"]), ["p"] * 4, ["u", "x", "y", "v"], {})
    assert total.tolist() == [1.0, 0.0, 2.0, 1.0]
    assert scored.tolist() == [True, False, True, True]  # 'x': both None; 'y': b scored it
    assert means["all_none"] == 0.25


def test_lm_advantages_with_none_rows_grpo_rloo_reinforce():
    r, passes = roll_of([[1]] * 4), RolloutPass(ref_logp=None, old_logp=None, old_values=None)
    rewards, scored = torch.tensor([1.0, 3.0, 5.0, 0.0]), torch.tensor([True, True, True, False])
    adv, _, _ = advantages(rewards, r, passes, load_recipe(None, ["group_size=4", "prompts_per_step=1"]),
                           Baseline(), scored=scored)
    # mean 3 and Bessel std 2 over the 3 scored rows; eps 1e-4 is GRPO's default
    torch.testing.assert_close(adv, torch.tensor([-2.0, 0.0, 2.0, 0.0]) / (2 + 1e-4))
    adv, _, _ = advantages(rewards, r, passes, load_recipe(None, ["algo=rloo", "group_size=4", "prompts_per_step=1"]),
                           Baseline(), scored=scored)
    torch.testing.assert_close(adv, torch.tensor([1 - 4.0, 3 - 3.0, 5 - 2.0, 0.0]))  # mean of the 2 other scored
    b, rc = Baseline(decay=0.5), load_recipe(None, ["algo=reinforce", "group_size=4", "prompts_per_step=1"])
    adv, _, _ = advantages(rewards, r, passes, rc, b, scored=scored)  # first batch: baseline = mean(1, 3, 5) = 3
    torch.testing.assert_close(adv, torch.tensor([-2.0, 0.0, 2.0, 0.0]))
    assert b.value == pytest.approx(3.0)
    adv, _, _ = advantages(torch.tensor([9.0] * 4), r, passes, rc, b, scored=torch.zeros(4, dtype=torch.bool))
    torch.testing.assert_close(adv, torch.zeros(4))  # nothing scored: no signal, baseline kept
    assert b.value == pytest.approx(3.0)


def test_lm_ppo_advantages_with_a_none_row_are_zero_and_out_of_whitening():
    # row 0: 3 tokens, reward 1, V = 0 -> gamma 1, lam 0.5: A = [0.25, 0.5, 1]; row 1 unscored
    r = roll_of([[1, 1, 1], [1, 1, 0]])
    values = torch.tensor([[0.0, 0.0, 0.0], [0.5, 0.5, 0.0]])
    passes = RolloutPass(ref_logp=None, old_logp=None, old_values=values)
    c = load_recipe(None, ["algo=ppo", "gae_lambda=0.5", "kl_coef=0", "group_size=2", "prompts_per_step=1"])
    adv, ret, _ = advantages(torch.tensor([1.0, 0.0]), r, passes, c, Baseline(), scored=torch.tensor([True, False]))
    a0 = torch.tensor([0.25, 0.5, 1.0])
    mean, var = a0.mean(), ((a0 - a0.mean()) ** 2).mean()  # whitening over row 0's 3 tokens only
    torch.testing.assert_close(adv[0], (a0 - mean) / torch.sqrt(var + 1e-8))
    torch.testing.assert_close(adv[1], torch.zeros(3))
    torch.testing.assert_close(ret, torch.tensor([[0.25, 0.5, 1.0], [0.5, 0.5, 0.0]]))  # unscored: V_old


def test_lm_training_with_none_rows_logs_all_none_and_zeroes_their_advantage(tiny_model, tmp_path, capsys,
                                                                           monkeypatch):
    import inspect
    import json

    import rlhf.trainers.lm as lm
    from tests.trainers.test_lm_recipes_smoke import TINY, run_cli, sets

    f = tmp_path / "first_none.py"  # the first completion of every batch has no reward
    f.write_text("def fn(prompts, completions, **kw):\n    return [None] + [float(len(str(c)) % 3) "
                 "for c in completions[1:]]\n")
    seen, real = [], lm.advantages

    def spy(*a, **k):
        out = real(*a, **k)
        seen.append((inspect.signature(real).bind(*a, **k).arguments["scored"], out[0]))
        return out

    monkeypatch.setattr(lm, "advantages", spy)
    run = tmp_path / "r"
    code, _, err = run_cli(capsys, "train", "recipes/grpo_arith.yaml", "--no-progress", "--run-dir", str(run),
                           *sets(f"model={tiny_model}", *TINY, f"rewards=[{f}:fn]"))
    assert code == 0, err
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [row["rewards/all_none"] for row in rows] == [0.25, 0.25]  # 1 of 2 prompts x 2 completions
    for scored, adv in seen:
        assert scored.tolist() == [False, True, True, True] and adv[0] == 0.0 and adv[1] == 0.0  # group of 1 scored
    assert len(seen) == 2


# --- the adaptive-KL controller measures KL(pi_old || pi) after the update (item 5) -------------

def test_gym_adaptive_kl_controller_is_fed_the_kl_after_the_update(monkeypatch):
    import rlhf.trainers.on_policy as on_policy
    from rlhf.gym.config import GymConfig
    from rlhf.gym.policies import ActorCritic
    from rlhf.trainers.on_policy import Batch, Updater

    torch.manual_seed(0)
    n = 32  # 2 minibatches of 16, one epoch: the first minibatch's pre-step KL is exactly 0
    cfg = GymConfig(algo="ppo", objective="adaptive_kl", epochs=1, minibatches=2, n_steps=16, n_envs=2,
                    lr=0.05, target_kl=0.01, penalty_coef=1.0)
    cfg.validate()
    policy = ActorCritic(4, 3, discrete=True)
    obs, actions = torch.randn(n, 4), torch.randint(0, 3, (n,))
    with torch.no_grad():  # the rollout's log-probs: the policy before the update
        old = torch.distributions.Categorical(logits=policy.actor(obs)).log_prob(actions)
    b = Batch(obs, actions, old, torch.zeros(n), torch.randn(n), torch.randn(n))
    fed, real = [], on_policy.adaptive_kl_coef
    monkeypatch.setattr(on_policy, "adaptive_kl_coef", lambda c, kl, t: fed.append(kl) or real(c, kl, t))
    update = Updater(cfg, policy)
    stats = update(b, 0.0)
    with torch.no_grad():  # by hand, another code path: rho = pi / pi_old, KL ~ mean(rho - 1 - log rho)
        log_rho = torch.distributions.Categorical(logits=policy.actor(obs)).log_prob(actions) - old
    expected = float((log_rho.exp() - 1 - log_rho).mean())
    assert expected > 1e-4  # the policy moved
    # the same float32 sum over 32 rows by two code paths: a few ulps of the value
    assert fed == [pytest.approx(expected, rel=1e-5)]
    assert float(stats["kl_after_update"]) == pytest.approx(expected, rel=1e-5)
    assert float(stats["penalty_coef"]) == real(1.0, expected, 0.01)
    # what the controller used to be fed: the mean of the pre-step KLs, the first one 0
    assert float(stats["approx_kl"]) != pytest.approx(expected, rel=1e-2)


def test_lm_adaptive_kl_controller_is_fed_the_kl_after_the_update(tiny_model, tmp_path, capsys, monkeypatch):
    import json

    import rlhf.trainers.lm as lm
    from tests.trainers.test_lm_recipes_smoke import TINY, run_cli, sets

    measured, fed = [], []
    real_update, real_coef = lm.update, lm.adaptive_kl_coef

    def update(policy, opt, sched, roll, adv, ret, passes, cfg, *a, **k):
        out = real_update(policy, opt, sched, roll, adv, ret, passes, cfg, *a, **k)
        with torch.no_grad():  # by hand: the updated policy's log-probs against the rollout's
            log_rho = policy.logp(roll) - passes.old_logp
        m = roll.mask
        measured.append(float(((log_rho.exp() - 1 - log_rho) * m).sum() / m.sum()))
        return out

    monkeypatch.setattr(lm, "update", update)
    monkeypatch.setattr(lm, "adaptive_kl_coef", lambda c, kl, t: fed.append(kl) or real_coef(c, kl, t))
    run = tmp_path / "r"
    code, _, err = run_cli(capsys, "train", "recipes/grpo_arith.yaml", "--no-progress", "--run-dir", str(run),
                           *sets(f"model={tiny_model}", *TINY, "steps=3", "minibatches=2", "lr=0.05",
                                 "objective=adaptive_kl", "penalty_coef=0.5", "target_kl=0.001"))
    assert code == 0, err
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(fed) == len(measured) == 3 and all(k > 0 for k in measured)
    # the same forward on the same inputs and the same float32 formula: equal to a few ulps
    assert fed == pytest.approx(measured, rel=1e-5)
    # metrics.jsonl keeps 6 decimals (rlhf/run.py): half a unit of the last one
    assert [r["kl_after_update"] for r in rows] == pytest.approx(measured, rel=1e-5, abs=5e-7)
    coefs = [r["penalty_coef"] for r in rows]  # the coefficient each update used
    assert coefs == pytest.approx([0.5, real_coef(0.5, measured[0], 0.001),
                                   real_coef(real_coef(0.5, measured[0], 0.001), measured[1], 0.001)])
