"""DQN from pixels (seed 002's Atari network; Mnih et al. 2015), on a task this CPU can learn.

    nice -n 19 python benchmarks/seeds/dqn_pixels.py --out runs/dqn_pixels        # full (docs/seeds.md, 4)
    python benchmarks/seeds/dqn_pixels.py --quick --out /tmp/px                    # CI smoke test, seconds
    python benchmarks/seeds/dqn_pixels.py --report --out runs/dqn_pixels           # table + plot again

Full mode trains ``recipes/dqn_minatar_breakout.yaml`` (MinAtar Breakout: [4, 10, 10] uint8
images, the ``minatar_cnn`` Q-network, uint8 replay) through the library's ``train_dqn`` with a
probe that copies the online network's weights every ``--snap-every`` env steps. After
training, each copy plays ``--episodes`` greedy episodes on evaluation seeds never used in
training (``eval_seed + i``), and a uniformly random policy plays the same seeds: the learning
curve is greedy return against env steps, with random play as the floor.

Writes ``<out>/snapshots/step-N.safetensors`` (the weights, so ``--report`` can re-evaluate),
``<out>/dqn_pixels.json`` (curve, random baseline, training summary, times),
``<out>/dqn_pixels.png``, and prints a markdown table.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(ROOT))

from rlhf.config import load_recipe  # noqa: E402
from rlhf.errors import UserError  # noqa: E402
from rlhf.gym.envs import make_env  # noqa: E402

RECIPE = "dqn_minatar_breakout"
QUICK = ["total_steps=600", "learning_starts=200", "buffer_size=1000", "target_update=100", "log_every=200"]


class Snapshots:
    """A ``train_dqn`` probe: every ``every`` env steps (and at step 0), save the online
    network's weights. Reads only; draws no random number, so training is unchanged."""

    def __init__(self, folder: Path, every: int):
        self.folder, self.every, self.next = folder, every, 0
        folder.mkdir(parents=True, exist_ok=True)

    def __call__(self, steps: int, qnet, buffer) -> None:
        if steps >= self.next:
            self.save(steps, qnet)
            self.next = (steps // self.every + 1) * self.every

    def save(self, steps: int, qnet) -> None:
        from safetensors.torch import save_file

        save_file({k: v.detach().cpu().clone().contiguous() for k, v in qnet.state_dict().items()},
                  str(self.folder / f"step-{steps}.safetensors"))


def train(cfg, out: Path, snap_every: int) -> dict:
    from rlhf.gym.common import env_spec
    from rlhf.run import Run
    from rlhf.seeding import seed_everything
    from rlhf.trainers.dqn import train_dqn

    seed_everything(cfg.seed, cfg.threads)
    snaps = Snapshots(out / "snapshots", snap_every)
    run = Run(cfg, run_dir=str(out / f"run-{time.strftime('%Y%m%d-%H%M%S')}"))
    qnet, summary = train_dqn(cfg, env_spec(cfg), run, progress=False, probe=snaps)
    snaps.save(summary["steps"], qnet)  # the final weights (the probe's last copy may be older)
    return {**summary, "run_dir": str(run.dir), "train_curve": [
        {"step": r["step"], "return": r["return"]} for r in run.history if "return" in r]}


@torch.no_grad()
def greedy_curve(cfg, folder: Path, episodes: int) -> list[dict]:
    """Every snapshot's greedy return on ``episodes`` evaluation episodes."""
    from safetensors.torch import load_file

    from rlhf.gym.common import build_agent, env_spec
    from rlhf.gym.evaluate import evaluate_agent

    spec, rows = env_spec(cfg), []
    for path in sorted(folder.glob("step-*.safetensors"), key=lambda p: int(p.stem.split("-")[1])):
        agent = build_agent(cfg, spec)
        agent.load_state_dict(load_file(str(path)))
        ev = evaluate_agent(agent.eval(), cfg, episodes)
        rows.append({"step": int(path.stem.split("-")[1]), "mean": ev["mean_return"], "std": ev["std_return"],
                     "mean_length": ev["mean_length"]})
    return rows


def random_policy(cfg, episodes: int) -> dict:
    """Uniform random actions on the evaluation seeds ``eval_seed + i`` (actions seeded apart)."""
    env, rng, returns = make_env(cfg.env), np.random.default_rng(12345), []
    for i in range(episodes):
        env.reset(seed=cfg.eval_seed + i)
        done, total = False, 0.0
        while not done:
            _, r, term, trunc, _ = env.step(int(rng.integers(env.action_space.n)))
            total, done = total + float(r), term or trunc
        returns.append(total)
    env.close()
    return {"mean": float(np.mean(returns)), "std": float(np.std(returns)), "episodes": episodes}


def table(res: dict) -> str:
    rnd = res["random"]
    lines = ["| env steps | greedy return, mean +- std | vs random |", "| --- | --- | --- |"]
    for r in res["curve"]:
        lines.append(f"| {r['step']:,} | {r['mean']:.2f} +- {r['std']:.2f} | {r['mean'] - rnd['mean']:+.2f} |")
    lines.append(f"| random policy | {rnd['mean']:.2f} +- {rnd['std']:.2f} | |")
    return "\n".join(lines)


def plot(res: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    c = res["curve"]
    steps, mean, std = (np.array([r[k] for r in c], dtype=float) for k in ("step", "mean", "std"))
    ax.plot(steps, mean, "o-", color="tab:blue", label=f"greedy policy ({res['episodes']} episodes each)")
    ax.fill_between(steps, mean - std, mean + std, color="tab:blue", alpha=0.15)
    t = [r for r in res["train"]["train_curve"] if r["return"] is not None]
    ax.plot([r["step"] for r in t], [r["return"] for r in t], color="tab:orange", lw=1,
            label="training episodes (epsilon-greedy, last 100)")
    ax.axhline(res["random"]["mean"], color="k", ls="--", lw=1, label="random policy")
    ax.set_xlabel("env steps")
    ax.set_ylabel("episode return")
    ax.set_title(f"DQN from pixels: {res['env']} ({res['network']}, seed {res['seed']})")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def parse(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="600 steps, 3 episodes per point: a smoke test")
    ap.add_argument("--recipe", default=RECIPE)
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="recipe overrides")
    ap.add_argument("--snap-every", type=int, default=None, help="env steps between weight copies (default 25000)")
    ap.add_argument("--episodes", type=int, default=None, help="greedy episodes per copy (default 50)")
    ap.add_argument("--out", default="runs/dqn_pixels")
    ap.add_argument("--plot", default=None, help="also write the plot here (e.g. docs/seeds_dqn_pixels.png)")
    ap.add_argument("--report", action="store_true", help="no training: evaluate <out>/snapshots again")
    args = ap.parse_args(argv)
    if args.quick:
        args.set = QUICK + args.set
    args.snap_every = args.snap_every or (200 if args.quick else 25_000)
    args.episodes = args.episodes or (3 if args.quick else 50)
    return args


def main(argv=None) -> dict:
    args = parse(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = ROOT / "recipes" / f"{args.recipe}.yaml"
    cfg = load_recipe(str(path), ["threads=1", "select_every=0", f"out_dir={out}"] + list(args.set))
    if cfg.algo != "dqn":
        raise UserError(f"--recipe {args.recipe} trains {cfg.algo}; this benchmark needs a dqn recipe")
    start, cpu = time.time(), time.process_time()
    if args.report:
        res = json.loads((out / "dqn_pixels.json").read_text())
    else:
        (out / "dqn_pixels.json").unlink(missing_ok=True)  # (no stale result beside the new snapshots)
        for old in (out / "snapshots").glob("step-*.safetensors"):
            old.unlink()
        res = {"command": " ".join(["benchmarks/seeds/dqn_pixels.py"] + (argv if argv is not None else sys.argv[1:])),
               "env": cfg.env, "network": cfg.network, "seed": cfg.seed, "recipe": args.recipe,
               "overrides": list(args.set), "machine": f"{platform.processor() or platform.machine()}, "
               f"{os.cpu_count()} CPUs, torch {torch.__version__}", "train": train(cfg, out, args.snap_every)}
    res["episodes"] = args.episodes
    res["curve"] = greedy_curve(cfg, out / "snapshots", args.episodes)
    res["random"] = random_policy(cfg, args.episodes)
    res["final"] = res["curve"][-1]
    res["call_wall_s"], res["call_cpu_s"] = round(time.time() - start, 1), round(time.process_time() - cpu, 1)
    (out / "dqn_pixels.json").write_text(json.dumps(res, indent=1))
    plot(res, out / "dqn_pixels.png")
    if args.plot:
        plot(res, Path(args.plot))
    print(table(res))
    t = res["train"]
    print(f"training: {t['steps']} steps, wall {t['wall_s']} s, CPU {t['cpu_s']} s, replay {t['replay_mb']} MB; "
          f"this call: wall {res['call_wall_s']} s; wrote {out / 'dqn_pixels.json'}")
    return res


if __name__ == "__main__":
    try:
        main()
    except UserError as exc:
        sys.exit(f"error: {exc}")
