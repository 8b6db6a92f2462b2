"""rlhf.train / rlhf.evaluate used as a notebook would: a list of dicts, a lambda and an async
reward, a couple of steps on the tiny model; then the policy answers, and the run is evaluated."""
import asyncio
import subprocess
import sys

import pytest
import yaml

import rlhf
from rlhf.errors import UserError

# 20 rows: the held-out 10% (rlhf.evaluate's prompts) is 2 of them
ROWS = [{"prompt": f"What is {a} + {b}?", "answer": str(a + b)} for a, b in zip(range(10, 30), range(60, 80))]


def tiny(tiny_model, **more):
    return {**dict(model=tiny_model, steps=2, prompts_per_step=2, group_size=2, max_new_tokens=6, threads=1,
                   eval_problems=2, save_every=0), **more}


def test_import_rlhf_stays_cheap():
    code = "import sys, rlhf; rlhf.__version__; print(sorted(m for m in ('torch', 'transformers', 'datasets') " \
           "if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_train_then_generate_then_evaluate_like_a_notebook(tiny_model, tmp_path):
    seen_steps = []

    async def judge(completions, answer, trainer_state, **kwargs):  # e.g. an HTTP judge
        seen_steps.append((trainer_state.global_step, trainer_state.max_steps))
        await asyncio.sleep(0)
        return [1.0 if a in c else 0.0 for c, a in zip(completions, answer)]

    result = rlhf.train("grpo_arith", rewards=[lambda completions, **kw: [len(c) / 10 for c in completions],
                                               {judge: 2.0}],
                        dataset=ROWS, run_dir=tmp_path / "run", **tiny(tiny_model))
    assert result.run_dir == tmp_path / "run" and result.summary["steps"] == 2
    assert [m["step"] for m in result.metrics] == [1, 2] and result.final is result.metrics[-1]
    assert seen_steps == [(0, 2), (1, 2)]  # one batched call per step, told which step it is
    for m in result.metrics:  # no None anywhere: the total's mean is the weighted sum of the means
        # (metrics are rounded to 6 decimals: 1e-5 covers three roundings)
        assert m["reward"] == pytest.approx(m["rewards/<lambda>"] + 2 * m["rewards/judge"], abs=1e-5)
    saved = yaml.safe_load((result.run_dir / "recipe.yaml").read_text())
    assert saved["rewards"] == ["callable:<lambda>", {"callable:judge": 2.0}]
    assert saved["task"] == str((tmp_path / "run" / "dataset").resolve())  # the rows, kept as Arrow
    from datasets import load_from_disk

    assert load_from_disk(saved["task"]).to_list() == ROWS
    assert not list(tmp_path.glob("rlhf-data-*"))

    text = result.policy.generate("What is 2 + 3?", max_new_tokens=4)
    assert isinstance(text, str) and result.policy.tokenizer is not None

    out = rlhf.evaluate(result, problems=2)  # the TrainResult keeps the callables
    assert out["problems"] == 2 and {"base_reward", "trained_reward"} <= set(out)
    with pytest.raises(UserError, match=r"reward 'callable:<lambda>' was a Python function given to rlhf.train"):
        rlhf.evaluate(result.run_dir, problems=2)  # by directory, the lambda must be given again
    again = rlhf.evaluate(str(result.run_dir), problems=2, rewards=result.rewards)
    assert again == out  # greedy, same adapter, same rows


def test_a_dict_recipe_and_a_named_reward(tiny_model, tmp_path):
    recipe = {"algo": "rloo", "rewards": ["arith_format"], "out_dir": str(tmp_path / "runs")}
    result = rlhf.train(recipe, rewards="arith_correct", dataset=ROWS, **tiny(tiny_model, steps=1))  # one name alone
    assert result.run_dir.parent == tmp_path / "runs" and result.run_dir.name.startswith("rloo-")
    assert result.config.algo == "rloo" and result.config.rewards == ["arith_correct"]
    assert "rewards/arith_correct" in result.final and "rewards/arith_format" not in result.final


@pytest.mark.parametrize("kwargs, pattern", [
    ({"lr": -1.0}, r"lr must be > 0 \(got -1.0\)"),
    ({"learning_rate": 1e-4}, "unknown recipe key 'learning_rate'; did you mean lr"),
    ({"dataset": [{"question": "q"}]}, r"dataset \(the rows given as dataset=\) has no 'prompt' column"),
    ({"dataset": {"prompt": ["q"]}}, "dataset must be a datasets.Dataset, a list of dicts or a pandas DataFrame"),
    ({"rewards": [lambda completions, answr: [0.0]]}, r"lacks columns \['answr'\]; reward '<lambda>'"),
    ({"rewards": [42]}, "reward entry 42 must be a name, a function"),
])
def test_bad_input_is_one_sentence_and_leaves_nothing(tiny_model, tmp_path, kwargs, pattern):
    kwargs = {"dataset": ROWS, **kwargs}
    with pytest.raises(UserError, match=pattern):
        rlhf.train("grpo_arith", run_dir=tmp_path / "run", **tiny(tiny_model), **kwargs)
    assert not (tmp_path / "run").exists()


def test_gym_recipes_train_and_evaluate_too(tmp_path):
    result = rlhf.train("ppo_cartpole", total_steps=512, n_envs=2, n_steps=64, epochs=1, log_every=128,
                        run_dir=tmp_path / "g")
    assert result.metrics and result.config.env == "CartPole-v1"
    assert rlhf.evaluate(result, episodes=2)["episodes"] == 2
    with pytest.raises(UserError, match="rewards= applies to language-model recipes"):
        rlhf.train("ppo_cartpole", rewards=["arith_correct"], run_dir=tmp_path / "g2")


def test_the_cli_and_the_api_run_a_recipe_through_one_function(tmp_path, monkeypatch, capsys):
    """``rlhf train`` and ``rlhf.train`` differ in how they build the config, not in what runs it."""
    import json
    from pathlib import Path
    from types import SimpleNamespace

    from rlhf import api
    from rlhf.cli import main

    calls = []

    def run_recipe(cfg, recipe=None, run_dir=None, **kwargs):
        calls.append((type(cfg).__name__, cfg.algo, cfg.total_steps, run_dir, kwargs.get("resume", False)))
        return SimpleNamespace(dir=Path(run_dir), history=[]), {"ran": cfg.algo}

    monkeypatch.setattr(api, "run_recipe", run_recipe)
    assert main(["train", "ppo_cartpole", "--run-dir", str(tmp_path / "c"), "--set", "total_steps=512"]) == 0
    assert json.loads(capsys.readouterr().out.splitlines()[-1]) == {"ran": "ppo"}
    assert rlhf.train("ppo_cartpole", run_dir=tmp_path / "a", total_steps=512).summary == {"ran": "ppo"}
    assert calls == [("GymConfig", "ppo", 512, str(tmp_path / "c"), False),
                     ("GymConfig", "ppo", 512, str(tmp_path / "a"), False)]


def test_a_gym_recipe_under_several_processes_is_one_sentence(tmp_path, monkeypatch, capsys):
    from rlhf.cli import main

    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main(["train", "ppo_cartpole", "--run-dir", str(tmp_path / "r"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "runs in one process; launch it without accelerate" in err and not (tmp_path / "r").exists()
