"""Learning tier: a short PPO run on CartPole measurably beats a random policy (~22)."""
import json
from pathlib import Path

import pytest

pytest.importorskip("gymnasium")


def test_ppo_cartpole_learns(tmp_path, capsys):
    from rlhf.cli import main

    recipe = str(Path(__file__).resolve().parents[2] / "recipes" / "ppo_cartpole.yaml")
    args = ["train", recipe, "--run-dir", str(tmp_path / "r"), "--no-progress",
            "--set", "total_steps=25000", "--set", "eval_episodes=5"]
    assert main(args) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["eval_mean_return"] > 150, result
