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
                                        r"set epochs > 1 or minibatch_size < n_steps x n_envs"):
        load_recipe(None, base + ["epochs=1", "minibatch_size=128"])
    with pytest.raises(UserError, match="one optimiser step per rollout"):  # the minibatch is capped at n
        load_recipe(None, base + ["epochs=1", "minibatch_size=1000"])
    assert load_recipe(None, base + ["epochs=2", "minibatch_size=128"]).ppo_steps_per_rollout() == 2
    assert load_recipe(None, base + ["epochs=1", "minibatch_size=64"]).ppo_steps_per_rollout() == 2
    assert load_recipe(None, base[:2] + ["n_envs=2", "n_steps=64", "epochs=1", "minibatch_size=128"]).epochs == 1


@pytest.mark.parametrize("items", [["epochs=2"], ["minibatches=2"], ["epochs=3", "minibatches=2"]])
def test_reinforce_with_several_update_steps_is_refused(items):
    with pytest.raises(UserError, match=r"algo reinforce with epochs=\d x minibatches=\d > 1 trains off-policy "
                                        r"without importance weights.*use algo grpo, rloo or ppo.*"
                                        r"or epochs=1 and minibatches=1"):
        load_recipe(None, ["algo=reinforce", "prompts_per_step=4", *items])
    assert load_recipe(None, ["algo=reinforce"]).algo == "reinforce"  # one step: on-policy, accepted
