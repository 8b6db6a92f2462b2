"""The LM algorithm family side by side on the addition task: GRPO, PPO, RLOO, REINFORCE.

    .venv/bin/python benchmarks/lm_family.py [--algos grpo ppo rloo reinforce] [--reuse grpo=runs/demo-...]
                                             [--set threads=1]

Runs each ``recipes/<algo>_arith.yaml`` with ``rlhf train`` (one after the other, never at the
same time), then ``rlhf eval`` on 200 held-out problems, and writes ``benchmarks/lm_family.png``
(reward per step, 5-step moving average, all algorithms in one plot) and prints a markdown table:
algorithm, steps, training seconds, base and trained greedy accuracy. ``--reuse ALGO=RUN_DIR``
takes an existing run (e.g. the demo's GRPO run) instead of training it again.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def last_json(cmd: list[str]) -> dict:
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def moving_average(xs: list[float], k: int = 5) -> list[float]:
    return [sum(xs[max(0, i - k + 1):i + 1]) / len(xs[max(0, i - k + 1):i + 1]) for i in range(len(xs))]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--algos", nargs="+", default=["grpo", "ppo", "rloo", "reinforce"])
    ap.add_argument("--reuse", nargs="*", default=[], metavar="ALGO=RUN_DIR")
    ap.add_argument("--out", default="runs/family")
    ap.add_argument("--plot", default="benchmarks/lm_family.png")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="recipe override passed to every `rlhf train` (e.g. threads=1 beside another job)")
    args = ap.parse_args()
    reuse = dict(item.split("=", 1) for item in args.reuse)
    rlhf = str(Path(sys.executable).with_name("rlhf"))
    rows, curves = [], {}
    for algo in args.algos:
        run_dir = reuse.get(algo)
        if run_dir is None:
            run_dir = f"{args.out}/{algo}-{time.strftime('%Y%m%d-%H%M%S')}"
            sets = [x for kv in args.set for x in ("--set", kv)]
            trained = last_json([rlhf, "train", f"recipes/{algo}_arith.yaml", *sets, "--run-dir", run_dir,
                                 "--no-progress"])
            seconds = trained["train_time_s"]
        else:
            seconds = None
        ev = last_json([rlhf, "eval", run_dir, "--no-progress"])
        hist = [json.loads(x) for x in (ROOT / run_dir / "metrics.jsonl").read_text().splitlines()]
        if seconds is None:
            seconds = round(sum(r["time/step_s"] for r in hist), 1)
        curves[algo] = list(zip([r["step"] for r in hist], moving_average([r["reward"] for r in hist])))
        rows.append((algo, len(hist), seconds, ev["base_accuracy"], ev["trained_accuracy"], run_dir))
        print(f"{algo}: {rows[-1]}", file=sys.stderr, flush=True)
    from rlhf.run import plot_curves

    plot_curves(curves, "reward (5-step moving average)", ROOT / args.plot)
    print("| algorithm | steps | training time | base accuracy | trained accuracy | run |")
    print("| --- | --- | --- | --- | --- | --- |")
    for algo, steps, secs, base, trained, run_dir in rows:
        print(f"| {algo} | {steps} | {secs / 60:.1f} min | {base:.1%} | {trained:.1%} | `{run_dir}` |")
    print(json.dumps({r[0]: {"steps": r[1], "train_s": r[2], "base_accuracy": r[3], "trained_accuracy": r[4]}
                      for r in rows}))


if __name__ == "__main__":
    main()
