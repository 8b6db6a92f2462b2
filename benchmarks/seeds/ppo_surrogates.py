"""The PPO paper's comparison of surrogate objectives (Schulman et al. 2017, Table 1), re-run.

    PYTHONPATH=$PWD nice -n 10 python benchmarks/seeds/ppo_surrogates.py            # full
    PYTHONPATH=$PWD python benchmarks/seeds/ppo_surrogates.py --quick --out /tmp/q.json

Eleven settings of PPO's policy objective (no clipping or penalty; clipping eps = 0.1 / 0.2 /
0.3; adaptive KL with d_targ = 0.003 / 0.01 / 0.03; fixed KL beta = 0.3 / 1 / 3 / 10) run
through our gym PPO, whose every policy loss is ``rlhf.core.policy_loss``. Runs go through the
public entry points only: a recipe plus ``--set``-style overrides, loaded by
``rlhf.config.load_recipe`` and trained by ``rlhf.trainers.get_trainer(cfg)``.

Score of a run, as in the paper: the mean total reward of its last 100 training episodes.
Normalised per environment so that a uniformly random policy scores 0 and the best setting
(highest mean over seeds) scores 1; averaged over environments and seeds.

Results are appended to ``--out`` (JSON, rewritten after every run, so a stopped run resumes
where it was: finished (env, setting, seed) triples are skipped).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from multiprocessing import get_context
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]

# (label, the paper's average normalised score, overrides of the gym PPO config)
SETTINGS = [
    ("no clipping or penalty", -0.39, {"objective": "kl_penalty", "penalty_coef": 0.0}),
    ("clip eps=0.1", 0.76, {"objective": "clip", "clip_range": 0.1}),
    ("clip eps=0.2", 0.82, {"objective": "clip", "clip_range": 0.2}),
    ("clip eps=0.3", 0.70, {"objective": "clip", "clip_range": 0.3}),
    ("adaptive KL d_targ=0.003", 0.68, {"objective": "adaptive_kl", "target_kl": 0.003, "penalty_coef": 1.0}),
    ("adaptive KL d_targ=0.01", 0.74, {"objective": "adaptive_kl", "target_kl": 0.01, "penalty_coef": 1.0}),
    ("adaptive KL d_targ=0.03", 0.71, {"objective": "adaptive_kl", "target_kl": 0.03, "penalty_coef": 1.0}),
    ("fixed KL beta=0.3", 0.62, {"objective": "kl_penalty", "penalty_coef": 0.3}),
    ("fixed KL beta=1", 0.71, {"objective": "kl_penalty", "penalty_coef": 1.0}),
    ("fixed KL beta=3", 0.72, {"objective": "kl_penalty", "penalty_coef": 3.0}),
    ("fixed KL beta=10", 0.69, {"objective": "kl_penalty", "penalty_coef": 10.0}),
]

# env -> (recipe, overrides, env steps per run in the full mode). The budgets are what a 2-core
# CPU shared with six other jobs allowed (~10-25% of a core per process, ~1.3 ms of CPU per env
# step at the paper's 10 epochs of minibatch 64): 3 updates of Hopper's 2048-step rollouts,
# 8 of Pendulum's 4 x 256 (its recipe's 4 x 1024 cut to give it more updates).
ENVS = {
    "Pendulum-v1": ("recipes/ppo_pendulum.yaml", {"n_steps": 256}, 8192),
    "Hopper-v5": ("recipes/ppo_mujoco.yaml", {"env": "Hopper-v5"}, 6144),
    "InvertedPendulum-v5": ("recipes/ppo_mujoco.yaml", {"env": "InvertedPendulum-v5"}, 20480),
}
FULL = {"envs": ["Pendulum-v1", "Hopper-v5"], "seeds": [0, 1, 2], "steps": None}  # None: ENVS' budget
QUICK = {"envs": ["Pendulum-v1"], "seeds": [0], "steps": 1024}


def one_run(job: dict) -> dict:
    """Train one (env, setting, seed) through the recipe loader and the trainer registry."""
    from rlhf.config import load_recipe
    from rlhf.run import Run
    from rlhf.trainers import get_trainer

    recipe, env_over, _ = ENVS[job["env"]]
    label, _, over = SETTINGS[job["setting"]]
    values = {**env_over, **over, "seed": job["seed"], "total_steps": job["steps"], "threads": 1,
              "eval_episodes": job["eval_episodes"], "out_dir": job["runs_dir"]}
    if job["quick"]:  # two short rollouts of 4 x 128 steps: seconds, but every code path
        values.update(n_envs=4, n_steps=128)
    overrides = [f"{k}={v}" for k, v in values.items()]
    cfg = load_recipe(str(ROOT / recipe), overrides)
    per_rollout = cfg.n_envs * cfg.n_steps
    cfg.log_every = per_rollout  # one curve point per rollout
    name = f"{job['env']}-s{job['setting']}-seed{job['seed']}-{int(time.time() * 1000) % 10**9}"
    run = Run(cfg, recipe, str(Path(job["runs_dir"]) / name))
    result = get_trainer(cfg)(cfg, run, progress=False)
    curve = [[r["step"], r["return"]] for r in run.history if "return" in r]
    betas = [r["penalty_coef"] for r in run.history if "penalty_coef" in r]
    kls = [r["approx_kl"] for r in run.history if "approx_kl" in r]
    return {"env": job["env"], "setting": label, "seed": job["seed"], "steps": result["steps"],
            "score": result["train_return"], "eval_return": result["eval_mean_return"],
            "cpu_s": result["cpu_s"], "wall_s": result["wall_s"], "curve": curve,
            "mean_approx_kl": float(np.mean(kls)) if kls else None,
            "final_kl_beta": betas[-1] if betas else None, "run_dir": result["run_dir"]}


def random_score(env_id: str, episodes: int = 20) -> float:
    """Mean episode return of uniformly random actions (the paper's 0 of the normalised score)."""
    import gymnasium as gym

    env = gym.make(env_id)
    env.action_space.seed(123)
    totals = []
    for i in range(episodes):
        env.reset(seed=10_000 + i)
        done, total = False, 0.0
        while not done:
            _, r, term, trunc, _ = env.step(env.action_space.sample())
            total, done = total + float(r), term or trunc
        totals.append(total)
    env.close()
    return float(np.mean(totals))


def normalise(rows: list[dict], randoms: dict[str, float]) -> dict[str, dict]:
    """Per env: (score - random) / (best setting's seed-mean - random); then the mean over
    envs and seeds of each setting. An env where no setting beats random has no such scale:
    it is left out of the means (its ``per_env`` entry is None) and listed under "excluded".
    Returns {setting: {"mean", "n", "per_env": {env: normalised mean}, "raw": {env: mean}}}."""
    envs = sorted({r["env"] for r in rows})
    out: dict[str, dict] = {label: {"per_env": {}, "raw": {}, "values": []} for label, _, _ in SETTINGS}
    excluded = []
    for env in envs:
        env_rows = [r for r in rows if r["env"] == env]
        means = {}
        for label, _, _ in SETTINGS:
            scores = [r["score"] for r in env_rows if r["setting"] == label]
            if scores:
                means[label] = out[label]["raw"][env] = float(np.mean(scores))
        best, rnd = max(means.values()), randoms[env]
        if best <= rnd:
            excluded.append(env)
            for label in means:
                out[label]["per_env"][env] = None
            continue
        for r in env_rows:
            out[r["setting"]]["values"].append((r["score"] - rnd) / (best - rnd))
        for label, m in means.items():
            out[label]["per_env"][env] = (m - rnd) / (best - rnd)
    for label in out:
        vals = out[label].pop("values")
        out[label]["mean"] = float(np.mean(vals)) if vals else None
        out[label]["n"] = len(vals)
    out["excluded"] = excluded
    return out


def table(summary: dict[str, dict], envs: list[str], randoms: dict[str, float]) -> str:
    """Markdown: the paper's score, our mean normalised score, then per env the normalised
    score and (in brackets) the raw mean return of the last 100 training episodes."""
    cols = [f"{e} (random {randoms[e]:.0f})" for e in envs]
    lines = ["| setting | paper | ours | " + " | ".join(cols) + " |", "|" + " --- |" * (3 + len(envs))]
    fmt = lambda v: "-" if v is None else f"{v:.2f}"  # noqa: E731
    for label, paper, _ in SETTINGS:
        s = summary[label]
        per = " | ".join(f"{fmt(s['per_env'].get(e))} ({s['raw'][e]:.0f})" if e in s["raw"] else "-" for e in envs)
        lines.append(f"| {label} | {paper:.2f} | {fmt(s['mean'])} | {per} |")
    return "\n".join(lines)


def rank_agreement(summary: dict[str, dict]) -> float:
    """Spearman rank correlation between the paper's 11 scores and ours."""
    ours = np.array([summary[label]["mean"] for label, _, _ in SETTINGS], dtype=float)
    paper = np.array([p for _, p, _ in SETTINGS], dtype=float)
    return float(np.corrcoef(_ranks(ours), _ranks(paper))[0, 1])


def _ranks(x: np.ndarray) -> np.ndarray:
    """Ranks from 0, ties sharing their mean rank (the paper has two 0.71s and two 0.71-ish)."""
    order = np.argsort(x, kind="stable")
    ranks = np.empty(len(x))
    ranks[order] = np.arange(len(x), dtype=float)
    for v in np.unique(x):
        ranks[x == v] = ranks[x == v].mean()
    return ranks


def save(path: Path, data: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1))
    tmp.replace(path)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="Pendulum, 1 seed, 2 rollouts: a smoke test")
    ap.add_argument("--envs", nargs="*")
    ap.add_argument("--seeds", nargs="*", type=int)
    ap.add_argument("--steps", type=int, help="env steps per run")
    ap.add_argument("--workers", type=int, default=2, help="runs in parallel (one torch thread each)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks/seeds/results/ppo_surrogates.json"))
    ap.add_argument("--runs-dir", help="where run directories go (default: a temp dir)")
    ap.add_argument("--plot", help="write the bar chart here (PNG)")
    ap.add_argument("--inputs", nargs="*", default=[],
                    help="other result files (e.g. of runs made in parallel) merged in before planning")
    ap.add_argument("--settings", nargs="*", type=int, help="indices into SETTINGS to run (default: all 11)")
    ap.add_argument("--report-only", action="store_true", help="train nothing: tabulate the finished runs")
    args = ap.parse_args(argv)
    plan = dict(QUICK if args.quick else FULL)
    for key in ("envs", "seeds", "steps"):
        if getattr(args, key):
            plan[key] = getattr(args, key)
    unknown = [e for e in plan["envs"] if e not in ENVS]
    if unknown:
        print(f"error: unknown env {unknown[0]!r}; choose from {', '.join(ENVS)}", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    data = json.loads(out.read_text()) if out.is_file() else {"rows": [], "random": {}}
    for extra in args.inputs:
        more = json.loads(Path(extra).read_text())
        data["random"].update(more["random"])
        data["rows"] += more["rows"]
    key = lambda r: (r["env"], r["setting"], r["seed"], r["steps"])  # noqa: E731
    data["rows"] = list({key(r): r for r in data["rows"]}.values())  # a triple once, the latest run
    data["plan"] = plan
    runs_dir = args.runs_dir or tempfile.mkdtemp(prefix="ppo_surrogates_")
    for env in plan["envs"]:
        if env not in data["random"]:
            data["random"][env] = random_score(env, 3 if args.quick else 20)
    done = {key(r) for r in data["rows"]}
    steps = {env: plan["steps"] or ENVS[env][2] for env in plan["envs"]}
    jobs = [{"env": env, "setting": i, "seed": seed, "steps": steps[env], "quick": args.quick,
             "eval_episodes": 1 if args.quick else 5, "runs_dir": runs_dir}
            for seed in plan["seeds"] for env in plan["envs"] for i in (args.settings or range(len(SETTINGS)))]
    jobs = [j for j in jobs if (j["env"], SETTINGS[j["setting"]][0], j["seed"], j["steps"]) not in done
            and not args.report_only]
    run_jobs(jobs, 1 if args.quick else args.workers, data, out)
    rows = [r for r in data["rows"] if r["env"] in plan["envs"] and r["steps"] == steps[r["env"]]]
    summary = normalise(rows, data["random"])
    data["summary"] = summary
    data["spearman_vs_paper"] = rank_agreement(summary) if all(
        summary[label]["mean"] is not None for label, _, _ in SETTINGS) else None
    data["cpu_s_total"] = round(sum(r["cpu_s"] for r in rows), 1)
    save(out, data)
    print(table(summary, plan["envs"], data["random"]))
    if summary["excluded"]:
        print(f"left out of the means (no setting beat random): {', '.join(summary['excluded'])}")
    rho = data["spearman_vs_paper"]
    print(f"Spearman rank correlation with the paper: {'-' if rho is None else f'{rho:.2f}'}; "
          f"training CPU {data['cpu_s_total']:.0f} s over {len(rows)} runs")
    if args.plot:
        plot(summary, plan["envs"], args.plot, steps)
    return 0


def run_jobs(jobs: list[dict], workers: int, data: dict, out: Path) -> None:
    """Train ``jobs`` (``workers`` processes at a time), saving ``data`` after every run."""
    start = time.time()
    pool = get_context("spawn").Pool(workers) if workers > 1 else None
    results = pool.imap_unordered(one_run, jobs) if pool else map(one_run, jobs)
    try:
        for k, row in enumerate(results, 1):
            data["rows"].append(row)
            save(out, data)
            print(f"[{k}/{len(jobs)} {time.time() - start:.0f}s] {row['env']} {row['setting']} seed {row['seed']}: "
                  f"score {row['score']} (cpu {row['cpu_s']:.0f}s)", file=sys.stderr, flush=True)
    finally:
        if pool:
            pool.close()


def plot(summary: dict, envs: list[str], path: str, steps: dict[str, int]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [label for label, _, _ in SETTINGS]
    x = np.arange(len(labels))
    fig, ax = plt.subplots(figsize=(11, 4.5))
    ax.bar(x - 0.2, [p for _, p, _ in SETTINGS], 0.4, label="PPO paper (7 MuJoCo envs, 1M steps)", color="0.6")
    nan = lambda v: math.nan if v is None else v  # noqa: E731
    kept = [e for e in envs if e not in summary["excluded"]]
    ax.bar(x + 0.2, [nan(summary[label]["mean"]) for label in labels], 0.4,
           label=f"ours ({', '.join(f'{e}, {steps[e]:,} steps' for e in kept)})", color="tab:blue")
    for k, env in enumerate(kept):
        ax.scatter(x + 0.2, [nan(summary[label]["per_env"].get(env)) for label in labels], s=12,
                   marker="ox^"[k % 3], color="k", zorder=3, label=f"ours, {env} only")
    ax.axhline(0, color="k", lw=0.8)
    ax.set_xticks(x, labels, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("normalised score (random 0, best 1)")
    ax.set_title("PPO surrogate objectives: normalised score of the last 100 training episodes")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    sys.exit(main())
