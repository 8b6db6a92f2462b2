"""Train LM recipes on several seeds side by side on one machine, evaluate each run, and
write one summary: held-out accuracy per seed and its mean, KL and reward per step.

    python benchmarks/multi_seed.py --out runs/seeds --runs ppo_arith:0,1,2 grpo_arith:0,1,2 \
        [--model DIR_OR_GGUF] [--parallel 6] [--set key=value ...]

Each run is the plain CLI (``python -m rlhf.cli train RECIPE --set seed=S``) followed by
``python -m rlhf.cli eval RUN``, so the figures are what a user of those commands gets. A
``.gguf`` model is converted once (the same conversion ``rlhf model pull`` does offline) and the
runs point at the checkpoint. ``--parallel`` runs share the machine: on a GPU several small-model
runs overlap well; on a 2-core CPU use 1. Written under --out: ``summary.json`` (every figure),
``summary.txt`` (a table) and ``runs.tar.gz`` (each run's config, metrics.jsonl and logs).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tarfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def convert(gguf: Path, out: Path) -> str:
    sys.path.insert(0, str(ROOT))
    from rlhf.lm.models import convert_gguf

    target = out / "model"
    if not (target / "config.json").is_file():
        convert_gguf(gguf.parent, gguf.name, target)
    return str(target)


def run_one(recipe: str, seed: int, out: Path, sets: list[str]) -> dict:
    run_dir = out / "runs" / f"{recipe}-s{seed}"
    log = (out / "runs" / f"{recipe}-s{seed}.log").open("w")
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    cli = [sys.executable, "-m", "rlhf.cli"]
    args = [a for s in [f"seed={seed}", *sets] for a in ("--set", s)]
    t0 = time.time()
    train = subprocess.run([*cli, "train", recipe, "--run-dir", str(run_dir), "--no-progress", *args],
                           stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    t1 = time.time()
    result = {"recipe": recipe, "seed": seed, "train_rc": train.returncode, "train_s": round(t1 - t0, 1)}
    if train.returncode == 0:
        ev = subprocess.run([*cli, "eval", str(run_dir), "--no-progress"], capture_output=True, text=True,
                            env=env, cwd=ROOT)
        log.write(ev.stderr)
        result["eval_s"] = round(time.time() - t1, 1)
        lines = [ln for ln in ev.stdout.splitlines() if ln.startswith("{")]
        result["eval"] = json.loads(lines[-1]) if ev.returncode == 0 and lines else {"rc": ev.returncode}
    metrics = run_dir / "metrics.jsonl"
    if metrics.is_file():
        rows = [json.loads(ln) for ln in metrics.read_text().splitlines() if ln.strip()]
        steps = [r for r in rows if "step" in r]
        for key in ("kl", "reward", "kl_after_update"):
            result[key] = [round(r[key], 5) for r in steps if isinstance(r.get(key), (int, float))]
    log.close()
    print(json.dumps(result), flush=True)
    return result


def table(results: list[dict]) -> str:
    lines = [f"{'run':<18} {'base':>6} {'trained':>8} {'final KL':>9} {'mean reward':>12} {'train s':>8}"]
    by_recipe: dict[str, list[float]] = {}
    for r in results:
        ev = r.get("eval", {})
        acc, base = ev.get("trained_accuracy"), ev.get("base_accuracy")
        if acc is not None:
            by_recipe.setdefault(r["recipe"], []).append(acc)
        kl = r.get("kl") or [float("nan")]
        reward = r.get("reward") or [float("nan")]
        lines.append(f"{r['recipe'] + '-s' + str(r['seed']):<18} {_pct(base):>6} {_pct(acc):>8} "
                     f"{kl[-1]:>9.3f} {sum(reward) / len(reward):>12.3f} {r['train_s']:>8}")
    for recipe, accs in by_recipe.items():
        lines.append(f"{recipe}: mean held-out accuracy {100 * sum(accs) / len(accs):.1f}% over {len(accs)} seeds")
    return "\n".join(lines)


def _pct(x) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--runs", nargs="+", required=True, help="RECIPE:SEED,SEED,... (a recipe name or path)")
    ap.add_argument("--model", help="a checkpoint directory or a .gguf file (default: the recipe's)")
    ap.add_argument("--parallel", type=int, default=1)
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="passed to every run")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "runs").mkdir(exist_ok=True)
    sets = list(args.set)
    if args.model:
        model = convert(Path(args.model), args.out) if args.model.endswith(".gguf") else args.model
        sets.append(f"model={model}")
    jobs = [(spec.split(":")[0], int(s)) for spec in args.runs for s in spec.split(":")[1].split(",")]
    with ThreadPoolExecutor(max(1, args.parallel)) as pool:
        results = list(pool.map(lambda job: run_one(job[0], job[1], args.out, sets), jobs))
    (args.out / "summary.json").write_text(json.dumps(results, indent=1))
    text = table(results)
    (args.out / "summary.txt").write_text(text + "\n")
    print(text)
    with tarfile.open(args.out / "runs.tar.gz", "w:gz") as tar:
        for path in sorted((args.out / "runs").rglob("*")):
            if path.is_file() and (path.suffix in (".log", ".jsonl", ".yaml", ".json") or path.name == "config"):
                tar.add(path, arcname=str(path.relative_to(args.out)))
    return 0 if all(r["train_rc"] == 0 and "trained_accuracy" in r.get("eval", {}) for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
