"""Ours vs Stable-Baselines3 with rl-baselines3-zoo's tuned hyperparameters, side by side.

    nice -n 15 .venv/bin/python benchmarks/gym_vs_sb3.py --algos ppo dqn sac --seeds 0 1 2

Needs ``pip install stable-baselines3`` (the ``bench`` extra). Every run is its own process
with one torch thread; ours and SB3's alternate per (algo, seed) so both see the same machine
load.

"Reaches its score" means the same for both sides: train the full budget (ours: the recipe's
``total_steps``, SB3: rl-zoo's ``n_timesteps``; both 100k for PPO, 50k for DQN, 20k for SAC),
then score the final weights (DQN recipes: the best checkpoint, selected inside the timed loop)
on 20 deterministic episodes on seeds 1_000_000 + i, never used in training. The time is that
of the training loop only (``model.learn`` for SB3, the trainer loop for ours: env steps plus
updates, no start-up, no evaluation). Both wall-clock and the process's CPU time are recorded:
CPU time is what other jobs on a shared machine disturb least. Compare ratios, not absolute
seconds: they depend on the machine and its load.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
EVAL_SEED, EVAL_EPISODES = 1_000_000, 20

# rl-baselines3-zoo hyperparams (ppo.yml, dqn.yml, sac.yml), written in from the zoo's files;
# "lin_X" means a learning rate / clip range decaying linearly from X to 0.
ZOO = {
    "ppo": ("CartPole-v1", 100_000, dict(n_envs=8, n_steps=32, batch_size=256, gae_lambda=0.8, gamma=0.98,
                                           n_epochs=20, ent_coef=0.0, learning_rate="lin_1e-3", clip_range="lin_0.2")),
    "dqn": ("CartPole-v1", 50_000, dict(learning_rate=2.3e-3, batch_size=64, buffer_size=100_000,
                                          learning_starts=1000, gamma=0.99, target_update_interval=10,
                                          train_freq=256, gradient_steps=128, exploration_fraction=0.16,
                                          exploration_final_eps=0.04, policy_kwargs=dict(net_arch=[256, 256]))),
    "sac": ("Pendulum-v1", 20_000, dict(learning_rate=1e-3)),
}
OURS = {"ppo": "ppo_cartpole", "dqn": "dqn_cartpole", "sac": "sac_pendulum"}


def sb3_worker(algo: str, seed: int) -> dict:
    import time

    import gymnasium as gym
    import numpy as np
    import torch
    from stable_baselines3 import DQN, PPO, SAC
    from stable_baselines3.common.env_util import make_vec_env

    torch.set_num_threads(1)
    env_id, steps, hp = ZOO[algo]
    hp = dict(hp)
    for key in ("learning_rate", "clip_range"):
        if isinstance(hp.get(key), str):
            start = float(hp[key][4:])
            hp[key] = lambda remaining, s=start: remaining * s
    n_envs = hp.pop("n_envs", 1)
    env = make_vec_env(env_id, n_envs=n_envs, seed=seed)
    cls = {"ppo": PPO, "dqn": DQN, "sac": SAC}[algo]
    model = cls("MlpPolicy", env, seed=seed, device="cpu", verbose=0, **hp)
    t0, c0 = time.perf_counter(), time.process_time()
    model.learn(total_timesteps=steps)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    ev, returns = gym.make(env_id), []
    for i in range(EVAL_EPISODES):
        obs, _ = ev.reset(seed=EVAL_SEED + i)
        done, total = False, 0.0
        while not done:
            action, _ = model.predict(obs, deterministic=True)
            obs, r, term, trunc, _ = ev.step(action)
            total, done = total + float(r), term or trunc
        returns.append(total)
    return {"wall_s": round(wall, 2), "cpu_s": round(cpu, 2), "eval_mean_return": float(np.mean(returns)),
            "eval_std_return": float(np.std(returns)), "steps": steps}


def ours(algo: str, seed: int, runs_dir: str) -> dict:
    recipe = ROOT / "recipes" / f"{OURS[algo]}.yaml"
    cmd = [sys.executable, "-m", "rlhf.cli", "train", str(recipe), "--no-progress", "--set", f"seed={seed}",
           "--set", "threads=1", "--set", f"out_dir={runs_dir}", "--set", f"eval_seed={EVAL_SEED}",
           "--set", f"eval_episodes={EVAL_EPISODES}"]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, check=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def sb3(algo: str, seed: int) -> dict:
    cmd = [sys.executable, __file__, "--sb3-worker", algo, str(seed)]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, check=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--algos", nargs="*", default=["ppo", "dqn", "sac"])
    ap.add_argument("--seeds", nargs="*", type=int, default=[0, 1, 2])
    ap.add_argument("--runs-dir", default="runs/bench")
    ap.add_argument("--out", default="runs/gym_vs_sb3.jsonl")
    ap.add_argument("--sb3-worker", nargs=2, metavar=("ALGO", "SEED"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.sb3_worker:
        print(json.dumps(sb3_worker(args.sb3_worker[0], int(args.sb3_worker[1]))))
        return
    rows = []
    out = ROOT / args.out
    out.parent.mkdir(parents=True, exist_ok=True)
    for algo in args.algos:
        for seed in args.seeds:
            for side, fn in (("rlhf", lambda: ours(algo, seed, args.runs_dir)), ("sb3", lambda: sb3(algo, seed))):
                r = fn()
                row = {"algo": algo, "env": ZOO[algo][0], "seed": seed, "side": side, "steps": r["steps"],
                       "wall_s": r["wall_s"], "cpu_s": r["cpu_s"], "eval_mean_return": r["eval_mean_return"],
                       "load1": round(os.getloadavg()[0], 2)}
                rows.append(row)
                print(json.dumps(row), file=sys.stderr, flush=True)
                with out.open("a") as f:
                    f.write(json.dumps(row) + "\n")
    print("| algo | env | seed | steps | rlhf s | SB3 s | SB3 / rlhf | rlhf CPU s | SB3 CPU s | SB3 / rlhf (CPU) "
          "| rlhf eval return | SB3 eval return | load (1 min) |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for algo in args.algos:
        for seed in args.seeds:
            a, b = (next(r for r in rows if r["algo"] == algo and r["seed"] == seed and r["side"] == s)
                    for s in ("rlhf", "sb3"))
            print(f"| {algo} | {a['env']} | {seed} | {a['steps']} | {a['wall_s']:.1f} | {b['wall_s']:.1f} | "
                  f"{b['wall_s'] / a['wall_s']:.2f}x | {a['cpu_s']:.1f} | {b['cpu_s']:.1f} | {b['cpu_s'] / a['cpu_s']:.2f}x | "
                  f"{a['eval_mean_return']:.1f} | {b['eval_mean_return']:.1f} | {a['load1']:.1f} / {b['load1']:.1f} |")


if __name__ == "__main__":
    main()
