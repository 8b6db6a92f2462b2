"""Fingerprints of short, seeded runs: proof that a refactor changed no number.

    python benchmarks/fingerprint.py OUT_DIR        # runs, then prints OUT_DIR/fingerprints.json
    diff <(jq -S . before/fingerprints.json) <(jq -S . after/fingerprints.json)

Each run goes through the real CLI (``rlhf.cli train``) in a subprocess, one thread, fixed
seed, a small budget: gym recipes (on-policy, DQN family, SAC, tabular) and, on the tiny
test LM of ``tests/conftest.py``, GRPO, PPO and a reward model. A fingerprint is the sha256
of ``metrics.jsonl`` without its timing fields, of the final JSON without timings and paths,
and of every ``.safetensors`` file the run wrote (weights, adapters, value heads).
Two checkouts give equal fingerprints only if every logged number and every weight is equal.
"""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
GYM = {  # recipe -> overrides (budgets of a few seconds each)
    "ppo_cartpole": ["total_steps=2048", "log_every=256"],
    "trpo_cartpole": ["total_steps=2048", "log_every=512"],
    "a2c_cartpole": ["total_steps=2048", "log_every=256"],
    "reinforce_cartpole": ["total_steps=2048", "log_every=512"],
    "dqn_cartpole": ["total_steps=3000", "learning_starts=500", "log_every=500"],
    "double_dueling_dqn_cartpole": ["total_steps=3000", "learning_starts=500", "log_every=500"],
    "sac_pendulum": ["total_steps=600", "learning_starts=100", "log_every=100", "hidden=32"],
    "q_learning_frozenlake": ["total_steps=20000", "log_every=5000", "eval_episodes=50"],
}
GYM_COMMON = ["seed=3", "threads=1", "eval_episodes=3"]
LM_TINY = ["seed=3", "threads=1", "prompts_per_step=2", "group_size=4", "max_new_tokens=6",
           "lora_r=2", "lora_alpha=4", "save_every=2"]
LM = {  # name -> (recipe, overrides)
    "grpo": ("grpo_arith", ["steps=3", "rewards=[arith_correct, length_penalty]"]),
    "grpo_epochs": ("grpo_arith", ["steps=2", "epochs=2", "minibatches=2", "lr=0.05"]),
    "ppo": ("ppo_arith", ["steps=3"]),
    "reward_model": ("rm_arith", ["steps=3", "prompts_per_step=4", "eval_problems=8"]),
}

def _timing(key: str) -> bool:
    """Keys whose values vary run to run: wall and CPU times."""
    return "time" in key or key.endswith(("wall_s", "cpu_s", "_time_s"))


def _strip(row: dict) -> dict:
    return {k: v for k, v in row.items() if not _timing(k) and k not in ("run_dir", "reward_model", "report")}


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def fingerprint(run_dir: Path, result: dict) -> dict:
    rows = [_strip(json.loads(x)) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]
    out = {"metrics": _sha("".join(json.dumps(r, sort_keys=True) + "\n" for r in rows).encode()),
           "result": _sha(json.dumps(_strip(result), sort_keys=True).encode()),
           "rows": len(rows)}
    for f in sorted(run_dir.rglob("*.safetensors")):
        if "debug" not in f.parts:
            out[str(f.relative_to(run_dir))] = _sha(f.read_bytes())
    return out


def train(recipe: Path, run_dir: Path, overrides: list[str]) -> dict:
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false")
    cmd = [sys.executable, "-m", "rlhf.cli", "train", str(recipe), "--no-progress", "--run-dir", str(run_dir)]
    for item in overrides:
        cmd += ["--set", item]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=ROOT)
    if proc.returncode != 0:
        raise SystemExit(f"{recipe.name} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(out: Path) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    prints = {}
    for name, overrides in GYM.items():
        run_dir = out / name
        prints[name] = fingerprint(run_dir, train(ROOT / "recipes" / f"{name}.yaml", run_dir, GYM_COMMON + overrides))
        print(name, prints[name]["metrics"][:16], file=sys.stderr)
    sys.path.insert(0, str(ROOT / "tests"))
    from conftest import make_tiny_checkpoint

    model = out / "tiny-llama"
    if not (model / "config.json").is_file():
        make_tiny_checkpoint(model)
    prints["tiny-llama"] = {f.name: _sha(f.read_bytes()) for f in sorted(model.iterdir()) if f.is_file()}
    for name, (recipe, overrides) in LM.items():
        run_dir = out / name
        result = train(ROOT / "recipes" / f"{recipe}.yaml", run_dir, [f"model={model}", *LM_TINY, *overrides])
        prints[name] = fingerprint(run_dir, result)
        print(name, prints[name]["metrics"][:16], file=sys.stderr)
    (out / "fingerprints.json").write_text(json.dumps(prints, indent=1, sort_keys=True))
    return prints


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit("usage: python benchmarks/fingerprint.py OUT_DIR")
    print(json.dumps(main(Path(sys.argv[1]).resolve()), indent=1, sort_keys=True))
