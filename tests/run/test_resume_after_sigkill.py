"""A run killed with SIGKILL and resumed ends with the same metrics, step for step, as an
uninterrupted run with the same seed."""
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from rlhf.cli import main

RECIPE_DIR = Path(__file__).resolve().parents[2] / "recipes"  # not the working directory

STEPS = 24
ARGS = ["--no-progress", "--set", "steps=%d" % STEPS, "--set", "save_every=1", "--set", "threads=1",
        "--set", "prompts_per_step=2", "--set", "group_size=3", "--set", "max_new_tokens=5",
        "--set", "lora_r=2", "--set", "lora_alpha=4", "--set", "lr=0.02",
        "--set", "rewards=[arith_correct, length_penalty]"]


def cli(*argv, wait=True):
    cmd = [sys.executable, "-m", "rlhf.cli", *argv]
    root = RECIPE_DIR.parent  # -m finds this checkout's rlhf, wherever pytest was started
    if wait:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=root)
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=root)


def metrics(run: Path) -> list[dict]:
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if not k.startswith("time/")} for r in rows]


def test_sigkill_and_resume_matches_uninterrupted(tiny_model, tmp_path):
    model = ["--set", f"model={tiny_model}"]
    full, killed = tmp_path / "full", tmp_path / "killed"
    done = cli("train", str(RECIPE_DIR / "grpo_arith.yaml"), "--run-dir", str(full), *ARGS, *model)
    assert done.returncode == 0, done.stderr[-2000:]

    proc = cli("train", str(RECIPE_DIR / "grpo_arith.yaml"), "--run-dir", str(killed), *ARGS, *model, wait=False)
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        path = killed / "metrics.jsonl"
        if path.is_file() and len(path.read_text().splitlines()) >= STEPS // 3:
            break
        time.sleep(0.02)
    assert proc.poll() is None, "the run finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    logged = len((killed / "metrics.jsonl").read_text().splitlines())
    assert logged < STEPS

    resumed = cli("train", "--resume", str(killed), "--no-progress")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert json.loads(resumed.stdout.strip().splitlines()[-1])["steps"] == STEPS
    a, b = metrics(full), metrics(killed)
    assert [r["step"] for r in b] == list(range(1, STEPS + 1))
    for ra, rb in zip(a, b):
        assert ra.keys() == rb.keys()
        for k in ra:
            if isinstance(ra[k], float):
                assert rb[k] == pytest.approx(ra[k], rel=1e-5, abs=1e-6), (ra["step"], k)
            else:
                assert rb[k] == ra[k], (ra["step"], k)


def test_resume_errors_are_clear(tmp_path, capsys):
    assert main(["train", "--resume", str(tmp_path)]) == 2
    assert "not a run directory" in capsys.readouterr().err
    (tmp_path / "recipe.yaml").write_text("algo: grpo\n")
    assert main(["train", "--resume", str(tmp_path)]) == 2
    assert "no checkpoint to resume from" in capsys.readouterr().err


def test_fresh_run_refuses_to_overwrite_a_run(tmp_path, capsys):
    (tmp_path / "metrics.jsonl").write_text("{}\n")
    assert main(["train", str(RECIPE_DIR / "grpo_arith.yaml"), "--run-dir", str(tmp_path)]) == 2
    assert "already holds a run" in capsys.readouterr().err
