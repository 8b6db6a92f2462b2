"""Every optional package a shipped recipe imports is checked by the preflight: hidden here (as
if not installed), ``rlhf train RECIPE`` stops with exit 2 and one sentence holding the pip line
that brings it, before a run directory exists; the recipes that need none of them pass the check
with every optional package hidden."""
from __future__ import annotations

import filecmp
import sys
from pathlib import Path

import pytest

from rlhf.catalog import recipes_dir
from rlhf.cli import main
from rlhf.config import load_recipe
from rlhf.errors import UserError
from rlhf.extras import EXTRAS
from rlhf.preflight import check_packages
from rlhf.tracking import TRACKERS

ROOT = Path(__file__).resolve().parents[2]
RECIPES = sorted(p.stem for p in recipes_dir().glob("*.yaml"))
# recipe -> {module it needs beyond the base install: the pip line the sentence must give}
NEEDS = {
    "grpo_gsm8k": {"math_verify": "pip install 'rlhf[math]'"},
    "ppo_lunarlander": {"Box2D": "pip install 'rlhf[box2d]'"},
    "ppo_mujoco": {"mujoco": "pip install 'rlhf[mujoco]'"},
    "dqn_atari_pong": {"ale_py": "pip install 'rlhf[atari]'", "cv2": "pip install 'rlhf[atari]'"},
    "dqn_minatar_breakout": {"minatar": "pip install 'rlhf[minatar]'"},
}
OPTIONAL_MODULES = sorted({*EXTRAS, *(module for module, _ in TRACKERS.values())})


def hide(monkeypatch, *modules: str) -> None:
    """Make ``modules`` look uninstalled: find_spec gives None and importing them fails."""
    for module in modules:
        monkeypatch.setitem(sys.modules, module, None)


def test_both_recipe_folders_hold_the_same_recipes():
    top = sorted(p.name for p in (ROOT / "recipes").glob("*.yaml"))
    assert top == sorted(p.name for p in recipes_dir().glob("*.yaml")) and top
    assert all(filecmp.cmp(ROOT / "recipes" / name, recipes_dir() / name, shallow=False) for name in top)
    assert set(NEEDS) <= set(RECIPES)


@pytest.mark.parametrize("recipe,module", [(r, m) for r, needs in NEEDS.items() for m in needs])
def test_a_missing_package_stops_the_recipe_in_one_sentence_before_a_run_directory(
        recipe, module, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    hide(monkeypatch, module)
    assert main(["train", recipe, "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    assert NEEDS[recipe][module] in err and "is not installed here" in err, err
    assert list(tmp_path.iterdir()) == [], "a run directory was written"


@pytest.mark.parametrize("recipe", [r for r in RECIPES if r not in NEEDS])
def test_the_other_recipes_need_no_optional_package(recipe, monkeypatch):
    """Base install only: gymnasium's classic-control and toy-text envs, the arith rewards."""
    cfg = load_recipe(str(recipes_dir() / f"{recipe}.yaml"), [])
    hide(monkeypatch, *OPTIONAL_MODULES)
    if recipe == "grpo_rm_arith":  # no package: its reward model, trained by rm_arith, is checked instead
        with pytest.raises(UserError, match="not found .*train it first"):
            check_packages(cfg)
    else:
        check_packages(cfg)


def test_a_reward_model_not_trained_yet_stops_before_a_run_directory(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["train", "grpo_rm_arith", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "reward model 'runs/rm_arith/reward_model' not found" in err and "rlhf train recipes/rm_arith.yaml" in err
    assert err.count("\n") == 1 and list(tmp_path.iterdir()) == [], "a run directory was written"


def test_a_tracker_named_in_report_to_is_checked(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    hide(monkeypatch, "tensorboard")
    assert main(["train", "ppo_cartpole", "--no-progress", "--set", "report_to=tensorboard"]) == 2
    err = capsys.readouterr().err
    assert "pip install tensorboard" in err and err.count("\n") == 1, err
    assert list(tmp_path.iterdir()) == []


def test_a_users_reward_names_its_packages_in_requires():
    def needs_a_package(completions, **_):
        return [0.0] * len(completions)

    needs_a_package.requires = ("no_such_module_for_rlhf_tests",)
    cfg = load_recipe(str(recipes_dir() / "grpo_arith.yaml"), [])
    cfg.rewards = [needs_a_package]
    with pytest.raises(UserError, match=r"reward 'needs_a_package' needs the no_such_module_for_rlhf_tests "
                                        r"package, which is not installed here; run `pip install "
                                        r"no_such_module_for_rlhf_tests`"):
        check_packages(cfg)
