"""``--resume`` for every kind of run: a run stopped right after one of its checkpoints and
resumed ends with exactly the metrics (timings aside) and weights of an uninterrupted run.

The stop is deterministic: ``rlhf.checkpoint.publish`` is wrapped to end the process's training
(an exception past every handler) just after its k-th publication, the state a SIGKILL at that
instant leaves. The budget is the same in both runs, so schedules over ``total_steps`` (linear
lr, clip range, epsilon) are exercised too. Equality is exact (==, not a tolerance): the
resumed run executes the same float operations in the same order on the same machine.
"""
import hashlib
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from rlhf import checkpoint
from rlhf.cli import main

RECIPES = Path(__file__).resolve().parents[2] / "recipes"
COMMON = ["seed=3", "threads=1", "eval_episodes=2"]
GYM = {  # name -> (recipe, overrides, the checkpoint to stop after); a few seconds each
    "ppo": ("ppo_cartpole", ["total_steps=1024", "n_envs=4", "n_steps=32", "epochs=2", "log_every=128",
                             "save_every=256", "norm_obs=true", "norm_reward=true"], 2),
    "a2c": ("a2c_cartpole", ["total_steps=640", "log_every=64", "save_every=200"], 1),
    "trpo": ("trpo_cartpole", ["total_steps=1024", "n_envs=2", "n_steps=128", "critic_updates=2",
                               "log_every=256", "save_every=256"], 2),
    "dqn": ("double_dueling_dqn_cartpole", ["total_steps=800", "learning_starts=200", "log_every=100",
                                            "save_every=300", "target_update=100", "buffer_size=500"], 1),
    "sac": ("sac_pendulum", ["total_steps=300", "learning_starts=100", "log_every=50", "save_every=150",
                             "hidden=16", "batch_size=32"], 1),
    "q_learning": ("q_learning_frozenlake", ["total_steps=3000", "log_every=500", "save_every=1000"], 1),
    # the simulator's state is not a plain attribute: saved through mj_getState (rlhf/gym/resume.py)
    "ppo_mujoco": ("ppo_mujoco", ["total_steps=512", "n_steps=128", "minibatches=4", "epochs=2",
                                  "log_every=128", "save_every=256"], 1),
}
NEEDS = {"ppo_mujoco": "Hopper-v5"}  # an env of an optional extra (rlhf[mujoco]): skipped where it cannot be made


class Stop(BaseException):
    """Ends the first run just after a checkpoint (not an Exception: nothing catches it)."""


def _sets(items):
    return [a for x in items for a in ("--set", x)]


def stop_after(monkeypatch, k: int) -> None:
    calls = []
    real = checkpoint.publish

    def publish(*args, **kwargs):
        out = real(*args, **kwargs)
        calls.append(1)
        if len(calls) == k:
            raise Stop
        return out
    monkeypatch.setattr(checkpoint, "publish", publish)


def rows(run: Path) -> list[dict]:
    out = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if "time" not in k} for r in out]


def weights(run: Path, name: str) -> dict:
    link = run / name
    return {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in sorted(link.rglob("*.safetensors"))}


def run_pair(tmp_path, monkeypatch, capsys, train_args: list[str], k: int, out: str) -> None:
    full, cut = tmp_path / "full", tmp_path / "cut"
    assert main(["train", *train_args, "--run-dir", str(full)]) == 0
    expected = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    with monkeypatch.context() as m:
        stop_after(m, k)
        with pytest.raises(Stop):
            main(["train", *train_args, "--run-dir", str(cut)])
    capsys.readouterr()
    stopped_at = rows(cut)[-1]["step"]
    assert stopped_at < rows(full)[-1]["step"], "the first run was not stopped before its end"
    assert main(["train", "--resume", str(cut), "--no-progress"]) == 0
    got = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert rows(cut) == rows(full)
    assert weights(cut, out) == weights(full, out) and weights(full, out)
    paths = ("run_dir", "report", "reward_model", "wall_s", "cpu_s")  # differ between the two runs by nature
    strip = lambda r: {k: v for k, v in r.items() if "time" not in k and k not in paths}  # noqa: E731
    assert strip(got) == strip(expected)


@pytest.mark.parametrize("name", list(GYM))
def test_resume_gym_matches_uninterrupted(name, tmp_path, monkeypatch, capsys):
    if name in NEEDS:
        from rlhf.errors import UserError
        from rlhf.gym.envs import make_env

        try:
            make_env(NEEDS[name]).close()
        except UserError as exc:
            pytest.skip(str(exc))
    monkeypatch.chdir(tmp_path)  # (MuJoCo writes its warnings to MUJOCO_LOG.TXT in the working directory)
    recipe, overrides, k = GYM[name]
    args = [str(RECIPES / f"{recipe}.yaml"), "--no-progress", *_sets(COMMON + overrides)]
    run_pair(tmp_path, monkeypatch, capsys, args, k, "policy")


def test_resume_reward_model_matches_uninterrupted(tiny_model, tmp_path, monkeypatch, capsys):
    args = [str(RECIPES / "rm_arith.yaml"), "--no-progress",
            *_sets([f"model={tiny_model}", "steps=4", "save_every=2", "prompts_per_step=4", "lora_r=2",
                    "lora_alpha=4", "eval_problems=8", "seed=3", "threads=1"])]
    run_pair(tmp_path, monkeypatch, capsys, args, 1, "reward_model")


@pytest.mark.parametrize("extra", [["lora_r=0"], ["lora_r=0", "kl_coef=0", "micro_batch_size=2"],
                                   ["lora_r=0", "dtype=bfloat16"]],
                         ids=["full_fine_tuning", "full_no_reference_micro_batches", "full_bf16_fp32_masters"])
def test_resume_lm_full_fine_tuning_matches_uninterrupted(tiny_model, tmp_path, monkeypatch, capsys, extra):
    """lora_r: 0 (every weight, Adam's state for each) stopped after its first checkpoint and
    resumed: the same metrics and weights as an uninterrupted run, exactly."""
    args = [str(RECIPES / "grpo_arith.yaml"), "--no-progress",
            *_sets([f"model={tiny_model}", "steps=4", "save_every=2", "prompts_per_step=2", "group_size=3",
                    "max_new_tokens=5", "epochs=2", "lr=1e-3", "seed=3", "threads=1", *extra])]
    run_pair(tmp_path, monkeypatch, capsys, args, 1, "adapter")


def test_resume_gym_refuses_without_a_checkpoint(tmp_path, capsys):
    args = [str(RECIPES / "a2c_cartpole.yaml"), "--no-progress", *_sets(COMMON + ["total_steps=64"])]
    assert main(["train", *args, "--run-dir", str(tmp_path / "r")]) == 0
    assert main(["train", "--resume", str(tmp_path / "r"), "--no-progress"]) == 2
    assert "no checkpoint to resume from" in capsys.readouterr().err


def test_resume_gym_ppo_after_sigkill(tmp_path):
    """SIGKILL at a random moment of a PPO run, then --resume: the metrics of an uninterrupted run."""
    args = [str(RECIPES / "ppo_cartpole.yaml"), "--no-progress",
            *_sets(COMMON + ["total_steps=8192", "log_every=256", "save_every=256"])]
    root = RECIPES.parent

    def cli(*argv):
        return subprocess.run([sys.executable, "-m", "rlhf.cli", *argv], capture_output=True, text=True,
                              timeout=300, cwd=root)
    full, killed = tmp_path / "full", tmp_path / "killed"
    assert cli("train", *args, "--run-dir", str(full)).returncode == 0
    proc = subprocess.Popen([sys.executable, "-m", "rlhf.cli", "train", *args, "--run-dir", str(killed)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=root)
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        m = killed / "metrics.jsonl"
        if m.is_file() and len(m.read_text().splitlines()) >= 8:
            break
        time.sleep(0.01)
    assert proc.poll() is None, "the run finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    resumed = cli("train", "--resume", str(killed), "--no-progress")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert rows(killed) == rows(full)
    assert weights(killed, "policy") == weights(full, "policy")


def test_resume_extends_a_finished_budget(tmp_path, capsys):
    """A finished REINFORCE run continued with a larger budget (``--resume RUN --set
    total_steps=FULL``) matches a run given the full budget at once (a constant lr: a schedule
    over total_steps would differ between the two by design)."""
    common = [str(RECIPES / "reinforce_cartpole.yaml"), "--no-progress",
              *_sets(COMMON + ["lr_schedule=constant", "log_every=256", "save_every=512"])]
    full, cut = tmp_path / "full", tmp_path / "cut"
    assert main(["train", *common, "--set", "total_steps=2048", "--run-dir", str(full)]) == 0
    assert main(["train", *common, "--set", "total_steps=1024", "--run-dir", str(cut)]) == 0
    assert main(["train", "--resume", str(cut), "--no-progress", "--set", "total_steps=2048"]) == 0
    capsys.readouterr()
    assert rows(cut) == rows(full)
    assert weights(cut, "policy") == weights(full, "policy")


def test_save_every_refuses_env_state_it_cannot_save(tmp_path):
    """An env whose state is not plain data (here a wrapper's deque of frames) is refused before
    the run starts, in one sentence naming the attribute; constants (spaces, functions, text maps,
    transition tables) do not count."""
    from collections import deque

    import gymnasium as gym

    from rlhf.config import load_recipe
    from rlhf.errors import UserError
    from rlhf.gym.resume import check_saveable, unsaved

    class Frames(gym.Wrapper):
        def __init__(self, env):
            super().__init__(env)
            self.frames = deque(maxlen=4)

    cfg = load_recipe(str(RECIPES / "ppo_cartpole.yaml"), ["save_every=256"])
    assert unsaved(gym.make("CartPole-v1")) == [] and unsaved(gym.make("FrozenLake-v1")) == []
    check_saveable(cfg)
    with pytest.raises(UserError, match=r"cannot save the state of CartPole-v1 \(Frames.frames is not plain data\).*save_every=0"):
        check_saveable(cfg, Frames(gym.make("CartPole-v1")))
    check_saveable(load_recipe(str(RECIPES / "ppo_cartpole.yaml")), Frames(gym.make("CartPole-v1")))  # save_every 0
    with pytest.raises(UserError, match="save_every needs env_processes: false"):  # envs in worker processes
        check_saveable(load_recipe(str(RECIPES / "ppo_cartpole.yaml"), ["save_every=256", "env_processes=true"]))
    # preflight runs it: one sentence and exit status 2 before a run directory is written
    assert main(["train", str(RECIPES / "ppo_cartpole.yaml"), "--set", "save_every=256",
                 "--set", "env_processes=true", "--run-dir", str(tmp_path / "r")]) == 2
    assert not (tmp_path / "r").exists()


def test_env_constants_round_trip_through_a_checkpoint(tmp_path):
    """FrozenLake's byte map and transition table come back equal from a weights_only load."""
    import gymnasium as gym
    import numpy as np
    import torch

    from rlhf.gym.resume import _decode, _encode

    env = gym.make("FrozenLake-v1").unwrapped
    torch.save({"desc": _encode(env.desc), "P": _encode(env.P)}, tmp_path / "s.pt")
    back = torch.load(tmp_path / "s.pt", weights_only=True)
    desc, table = _decode(back["desc"]), _decode(back["P"])
    assert desc.dtype == env.desc.dtype and np.array_equal(desc, env.desc)
    assert table == env.P
