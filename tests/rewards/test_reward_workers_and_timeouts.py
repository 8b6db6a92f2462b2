"""reward_timeout_s and reward_workers: rewards scored in worker processes, slow samples stopped."""
import json
import time

import pytest
import torch

from rewards import code_tests
from rlhf.config import load_recipe
from rlhf.errors import UserError
from rlhf.rewards import load_rewards, score
from rlhf.sandbox import Limits
from tests.trainers.test_lm_recipes_smoke import TINY, run_cli, sets

# spins (bounded at 60 s, so a failed kill cannot leave a runaway) on completions that say "hang"
SLOW = ("import time\n"
        "def fn(prompts, completions, **kw):\n"
        "    if completions[0] == 'hang':\n"
        "        end = time.monotonic() + 60\n"
        "        while time.monotonic() < end:\n"
        "            pass\n"
        "    return [float(len(c)) for c in completions]\n")


def test_workers_score_exactly_as_in_process(tmp_path, monkeypatch):
    monkeypatch.setattr(code_tests, "limits", Limits(cpu_s=2, wall_s=20))
    f = tmp_path / "mine.py"
    f.write_text("def fn(prompts, completions, answer, **kw):\n"
                 "    return [None if c == 'x' else len(c) / 7 + int(a) for c, a in zip(completions, answer)]\n")
    specs = ["arith_correct", {"arith_format": 0.5}, {"length_penalty": 0.1}, f"{f}:fn", "code_tests"]
    prog = "```python\nprint(int(input()) * 2)\n```"
    completions = ["68", " 12.", "it is 68", "x", prog, "print(5)"]
    columns = {"answer": ["68", "12", "68", "3", "1", "2"],
               "tests": [[{"input": "2", "output": "4"}, {"input": "0", "output": "1"}]] * 6}
    ref_total, ref_means, _ = score(load_rewards(specs), ["p"] * 6, completions, columns)
    pooled = load_rewards(specs, workers=2)
    assert all(rf.pool is pooled[0].pool is not None for rf in pooled)
    total, means, _ = score(pooled, ["p"] * 6, completions, columns)
    assert torch.equal(total, ref_total)  # same code on the same inputs: bit-identical
    assert means == ref_means and means["code_tests"] == pytest.approx(1 / 12)
    pooled[0].pool.close()


def test_a_slow_sample_is_stopped_named_and_scores_none(tmp_path, capsys):
    f = tmp_path / "slow.py"
    f.write_text(SLOW)
    fns = load_rewards([f"{f}:fn", "arith_correct"], timeout_s=1.0, workers=2)
    for _ in range(2):  # the killed worker is replaced: the next batch is scored the same way
        t = time.monotonic()
        total, means, _ = score(fns, ["p"] * 4, ["68", "hang", "abc", "hang"], {"answer": ["68"] * 4})
        took = time.monotonic() - t
        # startup is excluded from a sample's time; one worker is restarted mid-batch (~0.5 s, more
        # on a loaded machine): the bound only has to tell a stopped sample from a 60 s spin
        assert took < 30
        assert total.tolist() == [3.0, 0.0, 3.0, 0.0]
        assert means[f"{f}:fn/timeouts"] == 0.5 and means["arith_correct/timeouts"] == 0.0
        err = capsys.readouterr().err
        assert (f"reward function '{f}:fn' ran past reward_timeout_s=1 on sample 1 (completion 'hang') "
                "and 1 other sample(s)") in err
    fns[0].pool.close()


@pytest.mark.parametrize("body, pattern", [
    ("    raise KeyError('boom')", r"raised KeyError: 'boom' on sample 0 \(completion 'a'\)"),
    ("    import os; os._exit(3)", r"killed its worker process \(exit status 3\) on sample 0"),
    ("    return [float('nan') if completions[0] == 'b' else 1.0]", r"returned nan for sample 1 \(completion 'b'\)"),
])
def test_worker_failures_are_one_sentence(tmp_path, body, pattern):
    f = tmp_path / "bad.py"
    f.write_text(f"def fn(prompts, completions, **kw):\n{body}\n")
    fns = load_rewards([f"{f}:fn"], workers=1)
    with pytest.raises(UserError, match=pattern):
        score(fns, ["p", "p"], ["a", "b"], {})
    fns[0].pool.close()


def test_negative_guard_keys_are_refused():
    for key in ("reward_timeout_s=-1", "reward_workers=-2"):
        with pytest.raises(UserError, match=f"{key.split('=')[0]} must be >= 0"):
            load_recipe(None, [key])


def test_training_goes_on_past_a_timed_out_reward(tiny_model, tmp_path, capsys):
    reward = tmp_path / "once_slow.py"
    flag = tmp_path / "hung_once"
    reward.write_text(  # the very first sample scored hangs (bounded at 60 s); the rest are quick
        "import os, time\n"
        "def fn(prompts, completions, **kw):\n"
        f"    if not os.path.exists({str(flag)!r}):\n"
        f"        open({str(flag)!r}, 'w').close()\n"
        "        end = time.monotonic() + 60\n"
        "        while time.monotonic() < end:\n"
        "            pass\n"
        "    return [float(len(c[0]['content']) % 2) for c in completions]\n")
    run = tmp_path / "r"
    code, out, err = run_cli(capsys, "train", "recipes/grpo_arith.yaml", "--no-progress", "--run-dir", str(run),
                             *sets(f"model={tiny_model}", *TINY, f"rewards=[{reward}:fn]",
                                   "reward_timeout_s=1", "reward_workers=1"))
    assert code == 0, err
    assert f"reward function '{reward}:fn' ran past reward_timeout_s=1 on sample 0 (completion " in err
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2  # both steps ran
    assert rows[0][f"rewards/{reward}:fn/timeouts"] == 0.25 and rows[1][f"rewards/{reward}:fn/timeouts"] == 0.0


def test_pool_is_clean_after_a_failed_batch(tmp_path):
    f = tmp_path / "r.py"
    f.write_text("import time\ndef fn(prompts, completions, **kw):\n"
                 "    if completions[0] == 'bad':\n        raise ValueError('no')\n"
                 "    time.sleep(0.2)\n    return [float(len(completions[0]))]\n")
    fns = load_rewards([f"{f}:fn"], workers=2)
    with pytest.raises(UserError, match="on sample 1"):
        score(fns, ["p"] * 3, ["ok", "bad", "okay"], {})
    # the reply still pending from the failed batch must not be read as this batch's
    assert score(fns, ["p"] * 2, ["abc", "abcdefg"], {})[0].tolist() == [3.0, 7.0]
    fns[0].pool.close()
