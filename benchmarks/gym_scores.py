"""Train gym recipes on several seeds through the CLI and print the results table.

    nice -n 15 .venv/bin/python benchmarks/gym_scores.py --seeds 0 1 2 [--recipes ppo_cartpole dqn_cartpole]

Each run is ``rlhf train recipes/<name>.yaml --set seed=S`` (one torch thread, 20 deterministic
evaluation episodes on fresh seeds at the end); its final JSON line (with the training loop's
wall-clock and CPU seconds) is appended to ``--out`` (JSONL) and a markdown table of all rows
there is printed at the end.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ["ppo_cartpole", "dqn_cartpole", "double_dqn_cartpole", "dueling_dqn_cartpole",
           "double_dueling_dqn_cartpole", "sac_pendulum", "trpo_cartpole", "q_learning_frozenlake",
           "a2c_cartpole", "reinforce_cartpole", "ppo_acrobot", "dqn_acrobot", "ppo_pendulum",
           "ppo_lunarlander"]  # the last needs pip install "gymnasium[box2d]"


def run(recipe: str, seed: int, out_dir: str) -> dict:
    cmd = [sys.executable, "-m", "rlhf.cli", "train", str(ROOT / "recipes" / f"{recipe}.yaml"), "--no-progress",
           "--set", f"seed={seed}", "--set", f"out_dir={out_dir}", "--set", f"run_name={recipe}-s{seed}-{int(time.time())}"]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if proc.returncode != 0:
        return {"recipe": recipe, "seed": seed, "error": proc.stderr.strip().splitlines()[-1:]}
    return {"recipe": recipe, **json.loads(proc.stdout.strip().splitlines()[-1])}


def table(rows: list[dict]) -> str:
    by = defaultdict(list)
    for r in rows:
        by[r["recipe"]].append(r)
    lines = ["| recipe | env | steps | eval mean return per seed (20 episodes) | train wall-clock s per seed "
             "| train CPU s per seed |",
             "| --- | --- | --- | --- | --- | --- |"]
    for name, rs in by.items():
        ok = [r for r in rs if "error" not in r]
        if not ok:
            lines.append(f"| {name} | - | - | error: {rs[0]['error']} | - | - |")
            continue
        rets = ", ".join(f"{r['eval_mean_return']:.1f} (s{r['seed']})" for r in ok)
        walls = ", ".join(f"{r['wall_s']:.0f}" for r in ok)
        cpus = ", ".join(f"{r['cpu_s']:.0f}" if "cpu_s" in r else "-" for r in ok)  # older rows lack it
        lines.append(f"| {name} | {ok[0]['env']} | {ok[0]['steps']} | {rets} | {walls} | {cpus} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--recipes", nargs="*", default=RECIPES)
    ap.add_argument("--seeds", nargs="*", type=int, default=[0, 1, 2])
    ap.add_argument("--out", default="runs/gym_scores.jsonl")
    ap.add_argument("--runs-dir", default="runs/gym")
    args = ap.parse_args()
    out = ROOT / args.out
    out.parent.mkdir(parents=True, exist_ok=True)
    for recipe in args.recipes:
        for seed in args.seeds:
            row = run(recipe, seed, args.runs_dir)
            print(json.dumps(row), file=sys.stderr, flush=True)
            with out.open("a") as f:
                f.write(json.dumps(row) + "\n")
    rows = [json.loads(x) for x in out.read_text().splitlines() if x.strip()]
    print(table(rows))


if __name__ == "__main__":
    main()
