import pytest

from rewards import arith_correct, arith_format, last_integer
from rlhf.errors import UserError
from rlhf.rewards import load_rewards, score


def msgs(text):
    return [{"role": "assistant", "content": text}]


def test_last_integer_and_arith_rewards():
    assert last_integer("23 + 45 = 68") == 68
    assert last_integer("no digits") is None
    assert last_integer("it is 1,234.") == 1234
    assert arith_correct(None, ["68", "the answer is 68", "69", msgs("= 68")], answer=["68"] * 4) == [1, 1, 0, 1]
    assert arith_format(None, ["68", " 68.", "it is 68", msgs("68")]) == [1, 0 + 1, 0, 1]


def test_weighted_sum_and_none(tmp_path):
    f = tmp_path / "my_rewards.py"
    f.write_text("def half(prompts, completions, **kw):\n    return [None if c == 'x' else 0.5 for c in completions]\n")
    fns = load_rewards(["arith_correct", {f"{f}:half": 2.0}])
    total, means, _ = score(fns, ["p"] * 3, ["68", "1", "x"], {"answer": ["68", "68", "68"]})
    assert total.tolist() == [2.0, 1.0, 0.0]
    assert means["arith_correct"] == pytest.approx(1 / 3) and means[f"{f}:half"] == 0.5


def test_trl_style_function_plugs_in_unchanged(tmp_path):
    # written exactly as for TRL's GRPOTrainer: keyword args, dataset columns in **kwargs
    f = tmp_path / "trl_reward.py"
    f.write_text(
        "def reward_len(completions, **kwargs):\n"
        "    return [-abs(20 - len(c[0]['content'])) for c in completions]\n")
    fns = load_rewards([f"{f}:reward_len"])
    total, _, _ = score(fns, [[{"role": "user", "content": "q"}]], [msgs("a" * 18)], {"answer": ["1"]})
    assert total.tolist() == [-2.0]


def test_module_colon_function():
    fns = load_rewards(["rewards.arith:arith_correct"])
    assert fns[0].fn is arith_correct


@pytest.mark.parametrize("spec, pattern", [
    ("arith_corect", "unknown reward 'arith_corect'; did you mean arith_correct"),
    ("no_such_module_xyz:fn", "cannot import module"),
    ("rewards.arith:nope", "has no function 'nope'"),
    ("./missing.py:fn", "does not exist"),
])
def test_bad_reward_names(spec, pattern):
    with pytest.raises(UserError, match=pattern):
        load_rewards([spec])


def _score_with(tmp_path, body):
    f = tmp_path / "r.py"
    f.write_text(body)
    return score(load_rewards([f"{f}:fn"]), ["p"] * 3, ["a", "b", "c"], {"answer": ["1", "2", "3"]})


def test_raising_reward_names_function_and_sample(tmp_path):
    body = "def fn(prompts, completions, **kw):\n    return [1 / (c != 'b') for c in completions]\n"
    with pytest.raises(UserError, match=r"'.*r.py:fn' raised ZeroDivisionError.*sample 1 \(completion 'b'\)"):
        _score_with(tmp_path, body)


@pytest.mark.parametrize("ret, pattern", [
    ("[1.0]", "returned 1 values for 3 completions"),
    ("[1.0, 'x', 2.0]", "returned 'x' for sample 1"),
    ("[1.0, float('nan'), 2.0]", "returned nan for sample 1"),
    ("3.0", "returned float; it must return a list"),
])
def test_wrong_returns_get_clear_errors(tmp_path, ret, pattern):
    with pytest.raises(UserError, match=pattern):
        _score_with(tmp_path, f"def fn(prompts, completions, **kw):\n    return {ret}\n")
