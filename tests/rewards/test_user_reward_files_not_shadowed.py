"""A user's own ``rewards.py`` is never the installed built-in ``rewards`` package: a path
(``rewards.py:fn``, ``./rewards.py:fn``, an absolute path) loads that file under a module name
of its own; a module name that the built-in package (or any other module) answers instead of
the working directory's file of that name is refused with the name to use."""
from __future__ import annotations

import sys

import pytest

import rewards as builtin_rewards
from rlhf.errors import UserError
from rlhf.reward_loading import USER_MODULE_PREFIX, load_reward
from rlhf.rewards import load_rewards, score

OWN = "def fn(completions, **kw):\n    return [{value}] * len(completions)\n"


@pytest.fixture
def here(tmp_path, monkeypatch):
    """A working directory holding the user's own rewards.py (fn scores 0.25)."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "rewards.py").write_text(OWN.format(value=0.25))
    return tmp_path


@pytest.mark.parametrize("name", ["rewards.py:fn", "./rewards.py:fn", "ABS"])
def test_a_path_to_your_rewards_py_loads_that_file(here, name):
    name = f"{here / 'rewards.py'}:fn" if name == "ABS" else name
    assert score(load_rewards([name]), ["p"] * 2, ["a", "b"], {})[0].tolist() == [0.25, 0.25]
    fn = load_reward(name)
    assert fn.__module__.startswith(USER_MODULE_PREFIX) and fn.__module__ != "rewards"


def test_two_files_of_the_same_name_are_two_modules(here):
    (here / "other").mkdir()
    (here / "other" / "rewards.py").write_text(OWN.format(value=0.75))
    a, b = load_reward("rewards.py:fn"), load_reward("other/rewards.py:fn")
    assert a.__module__ != b.__module__ and (a(completions=["c"]), b(completions=["c"])) == ([0.25], [0.75])


def test_worker_processes_load_your_file_too(here):
    fns = load_rewards(["./rewards.py:fn"], workers=1)
    try:
        assert score(fns, ["p"], ["a"], {})[0].tolist() == [0.25]
    finally:
        fns[0].pool.close()


def test_a_module_name_the_builtin_package_answers_is_refused_with_the_file_form(here):
    with pytest.raises(UserError, match=r"reward 'rewards:fn' names module 'rewards', which imports .*"
                                        r"rewards/__init__.py, not rewards.py in the working directory; "
                                        r"name your file as rewards.py:fn"):
        load_rewards(["rewards:fn"])
    # a name your file defines but the built-in package has too: refused as well, never the wrong one
    (here / "rewards.py").write_text(OWN.format(value=0.5).replace("def fn", "def arith_correct"))
    with pytest.raises(UserError, match="name your file as rewards.py:arith_correct"):
        load_reward("rewards:arith_correct")


def test_builtin_names_still_load_beside_your_rewards_py(here):
    assert load_reward("arith_correct") is builtin_rewards.arith_correct
    assert load_reward("rewards:arith_correct") is builtin_rewards.arith_correct  # your file has no such name
    assert load_reward("rewards.arith:arith_correct") is builtin_rewards.arith_correct


def test_without_a_file_here_the_message_says_how_to_name_one(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserError, match=r"'rewards' has no function 'mine' .*built-in rewards package; "
                                        r"name a file of your own as path/to/file.py:mine"):
        load_reward("rewards:mine")
    (tmp_path / "my_scores.py").write_text(OWN.format(value=1.0))
    # the `rlhf` command's sys.path has no working directory on it
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", ".", str(tmp_path))])
    with pytest.raises(UserError, match=r"cannot import module 'my_scores'.*name it my_scores.py:fn"):
        load_reward("my_scores:fn")


def test_a_script_run_beside_your_rewards_py_still_loads_it_by_path(here):
    """``python script.py`` / ``python -c`` put the working directory first on sys.path, so there
    ``import rewards`` is the user's file: a path still loads it, a built-in name says why it cannot."""
    import os
    import subprocess
    from pathlib import Path

    code = ("from rlhf.errors import UserError\nfrom rlhf.rewards import load_rewards, score\n"
            "print(score(load_rewards(['rewards.py:fn']), ['p'], ['c'], {})[0].tolist())\n"
            "try:\n    load_rewards(['arith_correct'])\nexcept UserError as e:\n    print(e)\n")
    root = str(Path(__file__).resolve().parents[2])
    done = subprocess.run([sys.executable, "-c", code], cwd=here, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": root})
    assert done.returncode == 0, done.stderr[-2000:]
    first, second = done.stdout.splitlines()[:2]
    assert first == "[0.25]"
    assert second.startswith("module 'rewards' here is ") and "not rlhf's built-in rewards package" in second
