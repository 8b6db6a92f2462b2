"""Trackers (through accelerate's tracking) and the sampled-completions log.

TensorBoard's event files are read back with TensorBoard's own reader and must hold every
number of metrics.jsonl at the same step; completions.jsonl holds each sample's prompt,
completion, rewards and advantage, and those advantages are the group-normalised rewards."""
import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from rlhf.cli import main
from rlhf.errors import UserError
from rlhf.tracking import Tracking, markdown_table, prompt_text, sample_rows, tracker_names

TINY_LM = ["steps=3", "prompts_per_step=2", "group_size=2", "max_new_tokens=4", "lora_r=2", "lora_alpha=4",
           "threads=1", "rewards=[arith_correct, length_penalty]", "log_completions_every=2"]
TINY_GYM = ["total_steps=256", "n_steps=16", "n_envs=2", "log_every=64", "eval_episodes=1", "minibatches=2"]


def sets(*items):
    return [x for item in items for x in ("--set", item)]


def train(capsys, *argv, progress: bool = False) -> dict:
    code = main(["train", *argv] + ([] if progress else ["--no-progress"]))
    out, err = capsys.readouterr()
    assert code == 0, err
    return {**json.loads(out.strip().splitlines()[-1]), "stderr": err}


def tensorboard_scalars(run_dir: Path):
    """({tag: [(step, value)]}, the reader) from the run's event files, read by TensorBoard's own reader."""
    pytest.importorskip("tensorboard", reason="pip install tensorboard (the dev extra has it)")
    from tensorboard.backend.event_processing import event_accumulator

    logdir = run_dir / "tensorboard" / "rlhf"
    acc = event_accumulator.EventAccumulator(str(logdir), size_guidance={event_accumulator.SCALARS: 0,
                                                                         event_accumulator.TENSORS: 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}, acc


def assert_same_scalars(run_dir: Path) -> set[str]:
    """Every number of metrics.jsonl is in TensorBoard at its step, and nothing else is. TensorBoard
    stores scalars as float32, so a logged value must equal the float32 rounding of the JSON one
    exactly (JSON holds the same double that was logged: Run.log rounds once, before both)."""
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    expected: dict[str, list] = {}
    for row in rows:
        for k, v in row.items():
            if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool):
                expected.setdefault(k, []).append((row["step"], float(np.float32(v))))
    scalars, _ = tensorboard_scalars(run_dir)
    assert set(scalars) == set(expected), set(scalars) ^ set(expected)
    for tag, points in expected.items():
        assert scalars[tag] == points, tag
    return set(expected)


def test_lm_run_reports_to_tensorboard_the_numbers_of_metrics_jsonl(tiny_model, tmp_path, capsys):
    run_dir = tmp_path / "run"
    result = train(capsys, "grpo_arith", "--run-dir", str(run_dir), *sets(f"model={tiny_model}", *TINY_LM,
                                                                          "report_to=tensorboard"))
    tags = assert_same_scalars(run_dir)
    assert {"reward", "kl", "entropy", "clip_frac", "rewards/arith_correct", "completion_len"} <= tags
    # the sample table: TensorBoard text at the steps completions.jsonl logged (1, every 2nd, last)
    _, acc = tensorboard_scalars(run_dir)
    text = acc.Tensors("completions/text_summary")
    assert [e.step for e in text] == [1, 2, 3]
    table = text[-1].tensor_proto.string_val[0].decode()
    first = json.loads((run_dir / "completions.jsonl").read_text().splitlines()[-4])
    assert table.startswith("| step | prompt | completion | reward | arith_correct | length_penalty |")
    assert first["prompt"] in table
    assert Path(result["report"]) == run_dir / "report.html" and Path(result["report"]).is_file()


def test_gym_run_reports_to_tensorboard_the_numbers_of_metrics_jsonl(tmp_path, capsys):
    pytest.importorskip("gymnasium")
    run_dir = tmp_path / "run"
    result = train(capsys, "ppo_cartpole", "--run-dir", str(run_dir), *sets(*TINY_GYM, "report_to=[tensorboard]"))
    tags = assert_same_scalars(run_dir)
    assert {"return", "ep_length", "clip_frac"} <= tags
    assert [s for s, _ in tensorboard_scalars(run_dir)[0]["return"]] == [64, 128, 192, 256]
    assert (run_dir / "report.html").is_file() and result["report"] == str(run_dir / "report.html")


def test_wandb_offline_run_holds_the_metrics_and_the_sample_table(tiny_model, tmp_path, capsys, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    run_dir = tmp_path / "run"
    train(capsys, "grpo_arith", "--run-dir", str(run_dir), *sets(f"model={tiny_model}", *TINY_LM, "report_to=wandb"))
    runs = list((run_dir / "wandb").glob("offline-run-*"))
    assert len(runs) == 1, list((run_dir / "wandb").iterdir())
    assert list(runs[0].glob("run-*.wandb")), "no offline run file"
    tables = sorted(runs[0].glob("files/media/table/completions_*.table.json"))
    assert len(tables) == 3  # steps 1, 2 and 3
    table = json.loads(tables[0].read_text())
    assert table["columns"][:4] == ["step", "prompt", "completion", "reward"] and len(table["data"]) == 4


# ------------------------------------------------------------------------------ report_to values
def test_report_to_takes_one_name_a_list_or_none():
    assert tracker_names("tensorboard") == ["tensorboard"]
    assert tracker_names(["TensorBoard", "wandb", "tensorboard"]) == ["tensorboard", "wandb"]
    assert tracker_names("none") == tracker_names(None) == tracker_names([]) == []
    with pytest.raises(UserError, match="unknown tracker"):
        tracker_names([{"wandb": 1}])


def test_an_unknown_tracker_is_one_sentence(tmp_path, capsys):
    code = main(["train", "grpo_arith", "--run-dir", str(tmp_path / "run"), "--set", "report_to=[tensorbord]"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1
    assert "unknown tracker 'tensorbord'" in err and "tensorboard, wandb, trackio, mlflow" in err
    assert not (tmp_path / "run").exists()


def test_a_tracker_not_installed_names_the_pip_command(tmp_path, capsys, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "mlflow" else real(name, *a))
    code = main(["train", "ppo_cartpole", "--run-dir", str(tmp_path / "run"), "--set", "report_to=mlflow"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1
    assert "mlflow is not installed here; pip install mlflow" in err
    assert not (tmp_path / "run").exists()  # refused before the run directory was made


# ------------------------------------------------------------------------------ completions
def test_completions_jsonl_holds_every_sample_of_the_logged_steps(tiny_model, tmp_path, capsys):
    from rlhf.core import group_normalize

    run_dir = tmp_path / "run"
    err = train(capsys, "grpo_arith", "--run-dir", str(run_dir), *sets(f"model={tiny_model}", *TINY_LM),
                progress=True)["stderr"]
    rows = [json.loads(x) for x in (run_dir / "completions.jsonl").read_text().splitlines()]
    # the end of the progress output: three of the last step's samples, then the report's path
    tail = err.splitlines()[-11:]
    assert tail[0] == "sample completions (step 3):" and tail[-1] == f"report: {run_dir / 'report.html'}"
    assert [line.split(":")[0].strip() for line in tail[1:10:3]] == ["prompt"] * 3
    assert [r["step"] for r in rows] == [1] * 4 + [2] * 4 + [3] * 4  # every 2nd step, the first and last
    metrics = {r["step"]: r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())}
    for step in (1, 2, 3):
        batch = [r for r in rows if r["step"] == step]
        for r in batch:
            assert set(r) == {"step", "prompt", "completion", "reward", "rewards", "advantage", "length", "truncated"}
            assert r["prompt"].startswith("user: What is ") and 1 <= r["length"] <= 4
            if r["length"] < 4:  # ended by its EOS before max_new_tokens
                assert not r["truncated"]
            # weights 1: the total is the sum of the functions' values (each rounded to 1e-6)
            assert r["reward"] == pytest.approx(sum(r["rewards"].values()), abs=3e-6)
        rewards = torch.tensor([r["reward"] for r in batch], dtype=torch.float64)
        # the advantages are the group-normalised rewards (what GRPO trained on); the file rounds
        # both to 1e-6, and |d adv / d r| <= 1/std, so compare to the rounding's reach
        adv = group_normalize(rewards, 2, "group")
        scale = 1e-6 * (1 + 2 / max(float(rewards.reshape(-1, 2).std(1).min()), 1e-3))
        assert [r["advantage"] for r in batch] == pytest.approx(adv.tolist(), abs=scale + 1e-6)
        assert metrics[step]["reward"] == pytest.approx(float(rewards.mean()), abs=2e-6)


def test_completions_are_logged_on_schedule():
    run = SimpleNamespace(main=True, trackers=None)
    track = Tracking(SimpleNamespace(report_to="none", log_completions_every=10, steps=25), run)
    assert [s for s in range(1, 26) if track.due(s)] == [1, 10, 20, 25]
    track.every = 0
    assert not any(track.due(s) for s in range(1, 26))


def test_sample_rows_average_per_token_advantages_over_the_completion():
    roll = SimpleNamespace(mask=torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]]), truncated=torch.tensor([False, True]))
    adv = torch.tensor([[1.0, 3.0, 100.0], [0.5, -0.5, 3.0]])  # masked token (100) left out
    rows = sample_rows(7, [[{"role": "user", "content": "hi"}]] * 2,
                       [[{"role": "assistant", "content": "a"}], [{"role": "assistant", "content": "b"}]],
                       torch.tensor([1.0, 0.0]), {"f": [1.0, None]}, adv, roll)
    assert [r["advantage"] for r in rows] == [2.0, 1.0]
    assert [r["length"] for r in rows] == [2, 3] and [r["truncated"] for r in rows] == [False, True]
    assert rows[0]["prompt"] == "user: hi" and rows[1]["completion"] == "b"
    assert rows[1]["rewards"] == {"f": None}


def test_resume_drops_the_samples_of_steps_it_redoes(tmp_path):
    from rlhf.config import LMConfig
    from rlhf.run import Run

    run = Run(LMConfig(), run_dir=str(tmp_path / "run"))
    (run.dir / "metrics.jsonl").write_text("".join(json.dumps({"step": s}) + "\n" for s in (1, 2, 3)))
    (run.dir / "completions.jsonl").write_text("".join(json.dumps({"step": s, "prompt": "p"}) + "\n"
                                                       for s in (1, 1, 2, 3)) + '{"step": 4, "pro')
    run.truncate_history(2)
    assert [json.loads(x)["step"] for x in (run.dir / "completions.jsonl").read_text().splitlines()] == [1, 1, 2]
    run.close()


def test_text_helpers_escape_what_a_table_cannot_hold():
    assert markdown_table(["a", "b"], [["x|y", "1\n2"], [0.123456, True]]).splitlines() == [
        "| a | b |", "|---|---|", "| x\\|y | 1<br>2 |", "| 0.1235 | True |"]
    assert prompt_text("plain") == "plain"
    assert prompt_text([{"role": "system", "content": "s"}, {"role": "user", "content": "u"}]) == "system: s\nuser: u"


def test_the_end_of_a_run_shows_a_few_samples(tmp_path, capsys):
    from rlhf.tracking import show_samples

    show_samples([{"step": 5, "prompt": "What is\n2 + 2?", "completion": "4", "reward": 1.0,
                   "rewards": {"arith_correct": 1.0, "x": None}, "advantage": 0.5, "length": 2, "truncated": False}])
    err = capsys.readouterr().err
    assert err.splitlines() == ["sample completions (step 5):", "  prompt:     What is 2 + 2?", "  completion: 4",
                                "  reward 1 (arith_correct 1, x -), advantage +0.500, 2 tokens"]


def test_samples_shown_at_the_end_spread_over_prompts():
    """Groups of one prompt come together in a step's rows; the end-of-run display takes one row
    per prompt first, then the rest in order."""
    from rlhf.tracking import distinct_prompts_first

    rows = [{"prompt": p, "i": i} for i, p in enumerate(["a", "a", "a", "b", "b", "c"])]
    assert [r["i"] for r in distinct_prompts_first(rows, 3)] == [0, 3, 5]
    assert [r["i"] for r in distinct_prompts_first(rows, 5)] == [0, 3, 5, 1, 2]
    assert [r["i"] for r in distinct_prompts_first(rows[:3], 3)] == [0, 1, 2]
    assert distinct_prompts_first([], 3) == []
