from pathlib import Path

import pytest

from rlhf.config import LMConfig, load_recipe
from rlhf.errors import UserError

RECIPE_DIR = Path(__file__).resolve().parent.parent / "recipes"  # not the working directory


def test_recipe_overrides_defaults(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text("algo: grpo\nsteps: 7\nlr: 1e-3\n")
    cfg = load_recipe(str(p), ["group_size=4", "clip_high=0.28", "rewards=[arith_correct, {arith_format: 0.5}]"])
    assert (cfg.steps, cfg.lr, cfg.group_size, cfg.clip_range_high) == (7, 1e-3, 4, 0.28)
    assert cfg.rewards == ["arith_correct", {"arith_format": 0.5}]
    assert cfg.beta == LMConfig().beta


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
