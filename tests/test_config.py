from pathlib import Path

import pytest

from rlhf.config import LMConfig, load_recipe
from rlhf.errors import UserError

RECIPE_DIR = Path(__file__).resolve().parent.parent / "recipes"  # not the working directory


def test_recipe_overrides_defaults(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text("algo: grpo\nsteps: 7\nlr: 1e-3\n")
    cfg = load_recipe(str(p), ["group_size=4", "clip_high=0.28", "rewards=[arith_correct, {arith_format: 0.5}]"])
    assert (cfg.steps, cfg.lr, cfg.group_size, cfg.clip_high) == (7, 1e-3, 4, 0.28)
    assert cfg.rewards == ["arith_correct", {"arith_format": 0.5}]
    assert cfg.beta == LMConfig().beta


def test_shipped_recipes_load():
    cfg = load_recipe(str(RECIPE_DIR / "grpo_arith.yaml"))
    assert cfg.algo == "grpo" and cfg.group_size >= 2


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
