"""math_correct (answer extraction + math-verify equivalence) and think_format (R1 style) on
hand-written completions, and the synthetic GSM8K-format generator."""
import builtins
import importlib.util
import re
import sys
from pathlib import Path

import pytest

from rewards import REGISTRY
from rewards.math import final_answer, math_correct, reference_answer, think_format
from rlhf.errors import UserError
from rlhf.rewards import RewardFn, score

GSM = "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\nAltogether she sold 48+24 = <<48+24=72>>72 clips.\n#### 72"


def test_reference_and_final_answers():
    assert reference_answer(GSM) == "72" and reference_answer("0.5") == "0.5"
    assert final_answer("<think>48 + 24 = 72</think> #### 72") == "72"
    assert final_answer("<think>maybe 70</think> The answer is \\boxed{\\frac{1}{2}}.") == "\\frac{1}{2}"
    assert final_answer("<think>12 and 30</think> so 1,000 in total") == "1,000"
    assert final_answer("<think>#### 5</think> no number here") is None  # only after </think>


CASES = [  # (completion, reference answer, math_correct)
    ("<think>48/2 = 24, 48 + 24 = 72</think> #### 72", GSM, 1.0),
    ("<think>48 + 24</think> #### 71", GSM, 0.0),
    ("<think>half</think> #### 1/2", "#### 0.5", 1.0),            # equivalent forms
    ("<think>half</think> #### 0.5", "#### 1/2", 1.0),
    ("<think>half</think> \\boxed{\\frac{1}{2}}", "#### 0.5", 1.0),
    ("<think>big</think> #### 1,000", "#### 1000", 1.0),
    ("She sold 72 clips.", GSM, 1.0),                              # no tags: last number still counts
    ("<think>72</think> I do not know.", GSM, 0.0),                # the thought's number is not the answer
    ("", GSM, 0.0),
]


def test_math_correct_on_hand_written_completions():
    completions = [c for c, _, _ in CASES]
    assert math_correct(None, completions, [a for _, a, _ in CASES]) == [v for _, _, v in CASES]
    chat = [[{"role": "assistant", "content": c}] for c in completions]  # conversational completions
    assert math_correct(None, chat, [a for _, a, _ in CASES]) == [v for _, _, v in CASES]


def test_think_format():
    completions = [
        "<think>48 + 24 = 72</think> #### 72",      # 1: a thought, then the answer
        "<think>\nstep\n</think>\n#### 72",          # 1: newlines allowed
        "#### 72",                                   # 0: missing tags
        "<think>48 + 24 = 72 #### 72",               # 0: unclosed
        "<think>72</think>",                         # 0: nothing after the thought
        "<think>a</think> 72 <think>b</think> 72",   # 0: a second thought
        "The answer <think>x</think> 72",            # 0: text before the thought
    ]
    assert think_format(None, completions) == [1.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0]


def test_missing_math_verify_is_one_sentence(monkeypatch):
    real_import = builtins.__import__

    def no_math_verify(name, *args, **kwargs):
        if name == "math_verify":
            raise ImportError("No module named 'math_verify'")
        return real_import(name, *args, **kwargs)

    monkeypatch.delitem(sys.modules, "math_verify", raising=False)
    monkeypatch.setattr(builtins, "__import__", no_math_verify)
    with pytest.raises(UserError, match=r"math_correct needs the math-verify package: pip install 'rlhf\[math\]'"):
        score([RewardFn("math_correct", REGISTRY["math_correct"])], ["q"], ["#### 1"], {"answer": ["#### 1"]})


def test_generator_writes_consistent_gsm8k_rows(tmp_path):
    spec = importlib.util.spec_from_file_location(
        "make_gsm8k_like", Path(__file__).parents[2] / "benchmarks" / "make_gsm8k_like.py")
    gen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen)
    rows = gen.make_rows(200, seed=1)
    assert rows == gen.make_rows(200, seed=1) and rows != gen.make_rows(200, seed=2)
    for row in rows:
        assert set(row) == {"question", "answer"}
        # every <<a op b=c>> step is right, and the final answer is the last step's result
        steps = re.findall(r"<<([^=]+)=([^>]+)>>", row["answer"])
        for expr, result in steps:
            a, op, b = re.fullmatch(r"(\d+)([-+*/])(\d+)(?:/100)?", expr.replace("/100", "")).groups()
            value = {"+": int(a) + int(b), "-": int(a) - int(b), "*": int(a) * int(b), "/": int(a) / int(b)}[op]
            if "/100" in expr:
                value /= 100
            assert value == int(result)
        assert reference_answer(row["answer"]) == steps[-1][1]
    assert math_correct(None, [f"<think>x</think> #### {reference_answer(r['answer'])}" for r in rows],
                        [r["answer"] for r in rows]) == [1.0] * len(rows)


def test_gsm8k_recipe_runs_on_a_local_file_with_generation_options(tiny_model, tmp_path, capsys):
    """recipes/grpo_gsm8k.yaml end to end through the CLI on a GSM8K-format file, with
    top_p, a stop string and max_prompt_length on; then rlhf eval on its held-out 10%."""
    import json

    from rlhf.cli import main

    spec = importlib.util.spec_from_file_location(
        "make_gsm8k_like", Path(__file__).parents[2] / "benchmarks" / "make_gsm8k_like.py")
    gen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen)
    data = tmp_path / "gsm8k_like.jsonl"
    gen.main(["--n", "40", "--out", str(data)])
    sets = [f"model={tiny_model}", f"task={data}", "steps=2", "prompts_per_step=2", "group_size=2",
            "max_new_tokens=6", "lora_r=2", "lora_alpha=4", "top_p=0.9", 'stop=["\\n\\n"]',
            "max_prompt_length=48", "eval_problems=3"]
    code = main(["train", "recipes/grpo_gsm8k.yaml", "--no-progress", "--run-dir", str(tmp_path / "run"),
                 *[x for s in sets for x in ("--set", s)]])
    out, err = capsys.readouterr()
    assert code == 0, err
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    assert {"rewards/math_correct", "rewards/think_format"} <= set(rows[0])
    # the system prompt alone is longer than 48 tokens: every prompt is cut (2 per step)
    assert [r["prompts_truncated"] for r in rows] == [2, 4]
    assert all(r["logp_gap_rollout_trainer"] < 1e-4 for r in rows)  # bound: tests/lm/test_sampling_truncation_and_stop_strings.py
    assert main(["eval", str(tmp_path / "run"), "--no-progress"]) == 0
    ev = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert ev["problems"] == 3 and 0 <= ev["trained_reward"] <= 1.2
