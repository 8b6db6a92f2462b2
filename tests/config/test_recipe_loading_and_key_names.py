from pathlib import Path

import pytest
import yaml

from rlhf.config import LMConfig, load_recipe, to_dict
from rlhf.errors import UserError

RECIPE_DIR = Path(__file__).resolve().parents[2] / "recipes"  # not the working directory


def test_recipe_overrides_defaults(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text("algo: grpo\nsteps: 7\nlr: 1e-3\n")
    cfg = load_recipe(str(p), ["group_size=4", "clip_range_high=0.28", "rewards=[arith_correct, {arith_format: 0.5}]"])
    assert (cfg.steps, cfg.lr, cfg.group_size, cfg.clip_range_high) == (7, 1e-3, 4, 0.28)
    assert cfg.rewards == ["arith_correct", {"arith_format": 0.5}]
    assert cfg.kl_coef == LMConfig().kl_coef


def test_shipped_recipes_load():
    cfg = load_recipe(str(RECIPE_DIR / "grpo_arith.yaml"))
    assert cfg.algo == "grpo" and cfg.group_size >= 2


@pytest.mark.parametrize("recipe", sorted(str(p) for p in Path("recipes").glob("*.yaml")))
def test_every_shipped_recipe_passes_validation(recipe):
    # a refused setting (e.g. a KL estimator whose gradient is wrong where it is placed) in a
    # shipped recipe would make the quickstart fail with an error
    load_recipe(recipe)


def test_unknown_key_names_closest_valid_keys():
    with pytest.raises(UserError, match=r"unknown recipe key 'learning_rat'.*did you mean"):
        load_recipe(None, ["learning_rat=0.1"])
    with pytest.raises(UserError, match="'grop_size'.*group_size"):
        load_recipe(None, ["grop_size=4"])


@pytest.mark.parametrize("item, pattern", [
    ("steps=ten", "'steps' must be int"),
    ("kl_estimator=k9", "kl_estimator='k9' is not valid"),
    ("algo=sarsa", "unknown algo 'sarsa'"),
    ("group_size=1", "grpo needs group_size >= 2"),
    ("temperature=0", "temperature must be > 0"),
    ("minibatches=3", "must divide prompts_per_step"),
    ("novalue", "must look like key=value"),
])
def test_bad_values_get_one_clear_sentence(item, pattern):
    with pytest.raises(UserError, match=pattern):
        load_recipe(None, [item])


def test_missing_or_malformed_recipe(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load_recipe(str(tmp_path / "nope.yaml"))
    bad = tmp_path / "bad.yaml"
    bad.write_text("steps: [1,\n")
    with pytest.raises(UserError, match="not valid YAML"):
        load_recipe(str(bad))


def test_yaml_is_loaded_safely(tmp_path):
    bad = tmp_path / "evil.yaml"
    bad.write_text("steps: !!python/object/apply:os.system ['true']\n")
    with pytest.raises(UserError):
        load_recipe(str(bad))


@pytest.mark.parametrize("key, pattern", [
    ("gradient_accumulation_steps", "no counterpart here.*minibatches: N is not accumulation"),
    ("gradient_accumulation_step", "no counterpart here"),  # a typo of it gets the same sentence
    ("per_device_train_batch_size", "prompts_per_step x group_size completions"),
])
def test_trl_names_that_are_not_our_knobs_explain_instead_of_mapping(key, pattern):
    # following "did you mean minibatches / prompts_per_step" would change the algorithm
    with pytest.raises(UserError, match=f"unknown recipe key '{key}': .*{pattern}") as err:
        load_recipe(None, [f"{key}=2"])
    assert "did you mean" not in str(err.value)


def test_trl_names_with_true_equivalents_still_hint():
    with pytest.raises(UserError, match="'num_generations'.*did you mean group_size"):
        load_recipe(None, ["num_generations=4"])


def test_ppo_recipe_puts_k1_in_the_reward():
    cfg = load_recipe("recipes/ppo_arith.yaml")
    assert (cfg.kl_estimator, cfg.kl_placement) == ("k1", "reward")


# ---- one name per knob: old names load per family, with a one-line hint
OLD_LM = {"clip_range": "clip_low", "clip_range_high": "clip_high", "clip_range_value": "value_clip",
          "gae_lambda": "lam", "norm_adv": "whiten_advantages"}
OLD_GYM = {"clip_range_value": "clip_vloss", "penalty_coef": "kl_coef"}


@pytest.mark.parametrize("old, new, value, base", [
    ("clip_low", "clip_range", 0.15, []), ("clip_high", "clip_range_high", 0.28, []),
    ("value_clip", "clip_range_value", 0.3, ["algo=ppo"]), ("lam", "gae_lambda", 0.9, ["algo=ppo"]),
    ("whiten_advantages", "norm_adv", False, ["algo=ppo"]),
    ("beta", "kl_coef", 0.07, []),                                  # KL(pi || ref) coefficient
    ("beta", "rm_beta", 0.5, ["algo=reward_model"]),                # a reward model's log-ratio scale
    ("clip_vloss", "clip_range_value", 0.3, ["env=CartPole-v1", "algo=ppo"]),
    ("kl_coef", "penalty_coef", 0.3, ["env=CartPole-v1", "algo=ppo"]),  # gym: the PPO-paper penalty
])
def test_old_key_maps_to_its_family_concept_with_one_line_hint(old, new, value, base, caplog):
    with caplog.at_level("WARNING", logger="rlhf.renamed_keys"):
        cfg = load_recipe(None, base + [f"{old}={value}"])
    assert getattr(cfg, new) == value
    note = ""
    if old == "kl_coef":
        note = "; kl_coef was the PPO-paper penalty here, and names the KL-to-reference coefficient of LM recipes"
    elif (old, new) == ("beta", "kl_coef"):  # TRL's beta: the same line says so
        note = "; beta is TRL's name for it"
    assert [r.getMessage() for r in caplog.records] == [
        f"recipe key {old!r} is deprecated: use {new!r}, the same setting{note}"]
    fresh = load_recipe(None, base + [f"{new}={value}"])
    assert to_dict(fresh) == to_dict(cfg)


def test_gym_kl_coef_is_the_penalty_never_the_lm_kl_to_reference(caplog):
    gym = load_recipe(None, ["env=CartPole-v1", "algo=ppo", "objective=adaptive_kl", "kl_coef=0.3"])
    assert type(gym).__name__ == "GymConfig" and gym.penalty_coef == 0.3 and not hasattr(gym, "kl_coef")
    caplog.clear()
    with caplog.at_level("WARNING", logger="rlhf.renamed_keys"):
        lm = load_recipe(None, ["algo=ppo", "kl_coef=0.3"])       # the new LM name: no hint
    assert (lm.kl_coef, lm.penalty_coef, caplog.records) == (0.3, LMConfig().penalty_coef, [])


@pytest.mark.parametrize("size, n_steps, n_envs, count", [
    (256, 32, 8, 1), (512, 32, 8, 1), (64, 256, 16, 64), (512, 512, 2, 2)])
def test_gym_minibatch_size_becomes_the_count_of_the_same_minibatches(size, n_steps, n_envs, count, caplog):
    base = ["env=CartPole-v1", "algo=ppo", f"n_steps={n_steps}", f"n_envs={n_envs}"]
    with caplog.at_level("WARNING", logger="rlhf.renamed_keys"):
        cfg = load_recipe(None, base + [f"minibatch_size={size}"])
    # the old loop made minibatches of min(size, N) rows; N / count rows is the same size
    assert cfg.minibatches == count and n_steps * n_envs // count == min(size, n_steps * n_envs)
    assert caplog.records[0].getMessage() == (f"recipe key 'minibatch_size' is deprecated: use "
                                              f"'minibatches': minibatches={count} makes the same minibatches here")


def test_gym_minibatches_must_divide_the_rollout():
    with pytest.raises(UserError, match=r"minibatch_size=100 \(deprecated\) does not divide n_steps \* "
                                        r"n_envs = 1024.*set minibatches"):
        load_recipe(None, ["env=CartPole-v1", "algo=ppo", "minibatch_size=100"])
    with pytest.raises(UserError, match=r"minibatches=3 must divide n_steps \* n_envs = 1024"):
        load_recipe(None, ["env=CartPole-v1", "algo=ppo", "minibatches=3"])


def test_old_and_new_name_together_the_later_counts(tmp_path, caplog):
    # --set after the recipe file: an old name typed on the command line overrides the file's new one
    assert load_recipe(str(RECIPE_DIR / "ppo_cartpole.yaml"), ["minibatch_size=128"]).minibatches == 2
    assert load_recipe(None, ["lam=0.9", "gae_lambda=0.8"]).gae_lambda == 0.8
    assert load_recipe(None, ["gae_lambda=0.8", "lam=0.9"]).gae_lambda == 0.9
    gym = load_recipe(None, ["env=CartPole-v1", "algo=ppo", "kl_coef=0.3", "penalty_coef=0.2"])
    assert gym.penalty_coef == 0.2
    assert "'kl_coef' and 'penalty_coef' are the same setting ('kl_coef' is its old name); the later, " \
           "'penalty_coef', is used" in caplog.text


def _with_old_names(cfg) -> dict:
    """The resolved recipe of ``cfg`` as a run before the rename wrote it (its recipe.yaml)."""
    values = to_dict(cfg)
    if type(cfg).__name__ == "GymConfig":
        n = values["n_steps"] * values["n_envs"]
        values["minibatch_size"] = n // values.pop("minibatches")
        renames = OLD_GYM
    else:
        values["beta"] = values.pop("rm_beta" if cfg.algo == "reward_model" else "kl_coef")
        values.pop("kl_coef" if cfg.algo == "reward_model" else "rm_beta")  # the old config had one beta
        renames = OLD_LM
    return {renames.get(k, k): v for k, v in values.items()}


@pytest.mark.parametrize("recipe", sorted(p.name for p in RECIPE_DIR.glob("*.yaml")))
def test_old_runs_recipe_yaml_loads_to_the_same_config(recipe, tmp_path):
    cfg = load_recipe(str(RECIPE_DIR / recipe))
    old = tmp_path / "recipe.yaml"
    old.write_text(yaml.safe_dump(_with_old_names(cfg), sort_keys=False))
    again = load_recipe(str(old))
    if cfg.algo == "reward_model":  # kl_coef is unused there and an old file could not hold it
        again.kl_coef = cfg.kl_coef
    elif type(cfg) is LMConfig:
        again.rm_beta = cfg.rm_beta
    assert to_dict(again) == to_dict(cfg)
