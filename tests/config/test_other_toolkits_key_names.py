"""Names from TRL, SB3 and CleanRL: every field of the installed TRL's GRPOConfig gets our key of
the same meaning, a sentence on the difference, or no hint; never a knob that means something
else. All unknown keys of a recipe are named in one error; a bad choice lists the choices."""
from __future__ import annotations

import dataclasses
import re

import pytest

from rlhf.config import LMConfig, load_recipe
from rlhf.errors import UserError
from rlhf.gym.config import GymConfig
from rlhf.renamed_keys import RENAMED
from rlhf.toolkit_names import EQUIVALENT, NO_COUNTERPART, SAME_NAME, SENTENCE, VALUE_NOTE

LM_KEYS = {f.name for f in dataclasses.fields(LMConfig)}
GYM_KEYS = {f.name for f in dataclasses.fields(GymConfig)}
FAMILIES = {"LMConfig": (LM_KEYS, []), "GymConfig": (GYM_KEYS, ["env=CartPole-v1", "algo=ppo"])}


def error_for(keys: list[str], family: str = "LMConfig") -> str:
    with pytest.raises(UserError) as err:
        load_recipe(None, FAMILIES[family][1] + [f"{k}=1" for k in keys])
    return str(err.value)


def grpo_fields() -> list[str]:
    trl = pytest.importorskip("trl")
    return [f.name for f in dataclasses.fields(trl.GRPOConfig)]


def classify(name: str) -> str:
    """The class a GRPOConfig field falls in, asserting the answer a recipe gets for it."""
    if name in LM_KEYS:  # loads as it is: the name and its meaning must be ours (hand-checked list), or
        # TRL writes its value another way and the type error says how (push_to_hub: true)
        if name in SAME_NAME:
            return "exact"
        assert name in VALUE_NOTE["LMConfig"], f"{name} loads here: is its meaning ours?"
        return "sentence"
    if name in RENAMED["LMConfig"]:  # beta: loads as kl_coef, with a line that says so
        return "exact"
    message = error_for([name])
    if name in EQUIVALENT["LMConfig"]:
        assert message == f"unknown recipe key {name!r}; did you mean {EQUIVALENT['LMConfig'][name]}?"
        return "exact"
    if name in SENTENCE["LMConfig"]:
        assert message == f"unknown recipe key {name!r}: {SENTENCE['LMConfig'][name]}"
        return "sentence"
    assert name in NO_COUNTERPART["LMConfig"], f"GRPOConfig.{name} is in none of the tables"
    assert message == f"unknown recipe key {name!r} (a TRL setting with no counterpart here)"
    return "none"


def test_every_grpo_config_field_gets_its_equivalent_a_sentence_or_no_hint():
    classes = {name: classify(name) for name in grpo_fields()}
    counts = {c: sum(v == c for v in classes.values()) for c in ("exact", "sentence", "none")}
    print(f"GRPOConfig: {len(classes)} fields: {counts}")
    assert sum(counts.values()) == len(classes) and counts["exact"] >= 20 and counts["sentence"] >= 10


def test_the_tables_point_at_real_keys_and_answer_each_name_once():
    for family, (keys, _) in FAMILIES.items():
        assert set(EQUIVALENT[family].values()) <= keys
        assert not set(EQUIVALENT[family]) & keys and not set(SENTENCE[family]) & keys
        assert not set(EQUIVALENT[family]) & set(SENTENCE[family])
        assert not (set(EQUIVALENT[family]) | set(SENTENCE[family])) & NO_COUNTERPART[family]
        assert set(VALUE_NOTE[family]) <= keys
        for name, sentence in SENTENCE[family].items():  # "steps: N", "dtype: bfloat16": our keys
            for key in re.findall(r"(?<![{\w])([a-z][a-z0-9_]*): ", sentence):
                assert key in keys, f"{family} sentence for {name} names {key!r}, not a key"
    assert set(SAME_NAME) <= LM_KEYS


@pytest.mark.parametrize("trl_name, wrong", [
    ("num_train_epochs", "epochs"), ("logging_steps", "max_nonfinite_steps"), ("reward_weights", "reward_workers"),
    ("use_peft", "seed"), ("save_steps", "steps"), ("hub_revision", "revision"), ("entropy_coef", "penalty_coef")])
def test_trl_names_never_hint_a_knob_with_another_meaning(trl_name, wrong):
    assert "did you mean" not in error_for([trl_name])


@pytest.mark.parametrize("typo, answer", [
    ("grop_size", "did you mean group_size?"), ("learning_rat", "did you mean lr?"),
    ("num_generation", "did you mean group_size?"),
    ("gradient_accumulation_step", SENTENCE["LMConfig"]["gradient_accumulation_steps"]),
    ("hub_revisio", "(a TRL setting with no counterpart here)")])
def test_a_typo_gets_the_answer_of_the_name_it_is_near(typo, answer):
    assert answer in error_for([typo])


def test_a_name_near_nothing_lists_the_valid_keys():
    message = error_for(["zzqq"])
    assert message.startswith("unknown recipe key 'zzqq'; valid keys: algo, adv_estimator, model") and "did you mean" not in message


def test_every_unknown_key_of_a_recipe_in_one_error(tmp_path):
    recipe = tmp_path / "trl.yaml"
    recipe.write_text("learning_rate: 1e-5\nnum_train_epochs: 1\nuse_vllm: true\nzzqq: 1\nsteps: 5\n")
    with pytest.raises(UserError) as err:
        load_recipe(str(recipe))
    message = str(err.value)
    assert message.startswith("4 unknown recipe keys: 'learning_rate' (did you mean lr?), 'num_train_epochs' "
                              "(steps sets a run's length here")
    assert "'use_vllm' (a TRL setting with no counterpart here) and 'zzqq' (no key near it); valid keys: " \
           in message
    assert "\n" not in message


def test_beta_loads_as_kl_coef_with_one_line_naming_trl(caplog):
    with caplog.at_level("WARNING", logger="rlhf.renamed_keys"):
        cfg = load_recipe(None, ["beta=0.02"])
    assert cfg.kl_coef == 0.02
    assert [r.getMessage() for r in caplog.records] == [
        "recipe key 'beta' is deprecated: use 'kl_coef', the same setting; beta is TRL's name for it"]


@pytest.mark.parametrize("item, family, message", [
    ("scale_rewards=true", "LMConfig", "recipe key 'scale_rewards' must be one of group, batch, none, got True; "
                                       "TRL's true is group here, and false is none"),
    ("push_to_hub=true", "LMConfig", "recipe key 'push_to_hub' must be str or NoneType, got True; it takes the "
                                     "Hub repo here (push_to_hub: user/name), not true/false"),
    ("warmup_steps=0.1", "LMConfig", "recipe key 'warmup_steps' must be int, got 0.1; it counts steps here "
                                     "(TRL's float in [0, 1) is a fraction of the run)"),
    ("kl_estimator=3", "LMConfig", "recipe key 'kl_estimator' must be one of k1, k2, k3, k3+, got 3"),
    ("optimizer=1", "GymConfig", "recipe key 'optimizer' must be one of adam, rmsprop, got 1"),
    ("clip_vloss=true", "GymConfig", "recipe key 'clip_range_value' must be float or NoneType, got True; "
                                     "CleanRL's clip_vloss: true is clip_range_value: C, its clip_coef C"),
])
def test_a_bad_choice_lists_the_choices_and_a_toolkits_form_is_explained(item, family, message):
    with pytest.raises(UserError) as err:
        load_recipe(None, FAMILIES[family][1] + [item])
    assert str(err.value) == message


@pytest.mark.parametrize("name, answer", [
    ("n_epochs", "did you mean epochs?"), ("total_timesteps", "did you mean total_steps?"),
    ("num_envs", "did you mean n_envs?"), ("update_epochs", "did you mean epochs?"),
    ("anneal_lr", SENTENCE["GymConfig"]["anneal_lr"]), ("learning_rate", "did you mean lr?")])
def test_sb3_and_cleanrl_names_in_a_gym_recipe(name, answer):
    assert answer in error_for([name], "GymConfig")


def test_the_rename_table_in_the_docstring_names_every_old_key():
    import rlhf.renamed_keys as renamed

    for family in RENAMED.values():
        for old, rule in family.items():
            assert f" {old} (" in renamed.__doc__ or f", {old} (" in renamed.__doc__, old


def test_the_cli_prints_the_one_sentence_and_exits_2(capsys):
    from rlhf.cli import main

    assert main(["train", "recipes/grpo_arith.yaml", "--set", "num_train_epochs=2", "--set", "use_vllm=true"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: 2 unknown recipe keys: 'num_train_epochs' (" + SENTENCE["LMConfig"]["num_train_epochs"]
                   + ") and 'use_vllm' (a TRL setting with no counterpart here)"]
