"""The language-model agent against the classic PPO agent on random FrozenLake 4x4 maps (not
slippery), success rates on held-out maps that neither ever trains on (CPU).

    python benchmarks/agents_frozenlake.py lm --seed 0    # train the LM agent (grpo_frozenlake_choose), then
                                                          # play the held-out maps with the trained adapter
    python benchmarks/agents_frozenlake.py base           # the base model on the same held-out maps
    python benchmarks/agents_frozenlake.py mlp --seed 0   # the MLP agent (ppo_frozenlake_random) trained for
                                                          # a ladder of environment steps, each played there
    python benchmarks/agents_frozenlake.py report         # the table (markdown) and the plot

Each command appends JSON lines to ``--data`` (default docs/data/agents_frozenlake_cpu.jsonl):
the machine, the command's settings, the figures. Held-out maps: the LM plays seeds
``rlhf.agents.task_seeds.held_out_rows`` on the text environment's eval split, the MLP agent
``eval_seed + i`` on ``rlhf/FrozenLakeRandomHeldOut-v0``: both draw from the held-out maps (one
layout in five, by a hash of the layout), never trained on. Both play 8 moves an episode under
the same shaping; success is reaching G. "greedy": the most likely action each move;
"sampled": the policy as it trained.
"""
from __future__ import annotations

import argparse
import json
import math
import platform
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "docs" / "data" / "agents_frozenlake_cpu.jsonl"
LM_RECIPE = "grpo_frozenlake_choose"
MLP_RECIPE = "ppo_frozenlake_random"
MLP_LADDER = (2_000, 5_000, 10_000, 20_000, 50_000, 100_000, 200_000)


def machine() -> dict:
    import torch

    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    peaks = {}
    for dtype in (torch.float32, torch.bfloat16):  # the matmul peak at this process's threads
        a, b = torch.randn(1024, 1024, dtype=dtype), torch.randn(1024, 1024, dtype=dtype)
        a @ b
        t, n = time.perf_counter(), 10
        for _ in range(n):
            a @ b
        peaks[f"matmul_{str(dtype)[6:]}_gflops"] = round(2 * 1024**3 * n / (time.perf_counter() - t) / 1e9)
    return {"cpu": cpu, "threads": torch.get_num_threads(), "torch": torch.__version__, **peaks}


def append(path: Path, row: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        f.write(json.dumps(row) + "\n")
    print(json.dumps(row))


def rate(wins: list[float]) -> dict:
    n = max(len(wins), 1)
    p = sum(wins) / n
    return {"success": round(p, 4), "success_se": round(math.sqrt(p * (1 - p) / n), 4), "n": len(wins)}


# ---------------------------------------------------------------------- the language-model agent
def lm_play(run_dir: str | None, maps: int, adapter: bool, sampled: bool, cfg=None) -> dict:
    """One episode on each of ``maps`` held-out maps: the run's adapter (or the base model)."""
    import torch

    from rlhf.agents.choose import ChoicePolicy
    from rlhf.agents.episodes import episode_source
    from rlhf.agents.evaluate import play
    from rlhf.agents.task_seeds import held_out_rows
    from rlhf.lm.models import resolve_model

    torch.manual_seed(cfg.seed)
    path = str(Path(run_dir) / "adapter") if adapter else None
    policy = ChoicePolicy(resolve_model(cfg.model), dtype=cfg.dtype, adapter_path=path, temperature=cfg.temperature)
    policy.set_options(top_k=cfg.top_k, top_p=cfg.top_p, min_p=cfg.min_p, stop=cfg.stop,
                       chat_template_kwargs=cfg.chat_template_kwargs)
    source = episode_source(policy, cfg, held_out=True)
    out = {}
    for mode, greedy in (("greedy", True), ("sampled", False)):
        if mode == "sampled" and not sampled:
            continue
        t = time.perf_counter()
        scores = play(source, held_out_rows(maps, cfg.eval_seed), cfg.eval_batch, adapter, greedy=greedy)
        out[mode] = {"success": scores["success"], "success_se": scores["success_se"], "n": maps,
                     "return": scores["return"], "seconds": round(time.perf_counter() - t, 1)}
    return out


def lm_config(overrides: list[str], recipe: str = LM_RECIPE):
    from rlhf.catalog import find_recipe
    from rlhf.config import load_recipe

    return load_recipe(find_recipe(recipe), overrides)


def cmd_lm(args) -> None:
    from rlhf.cli import main

    run_dir = Path(args.runs) / (f"lm-seed{args.seed}" if args.recipe == LM_RECIPE else f"{args.recipe}-seed{args.seed}")
    sets = [f"seed={args.seed}", f"threads={args.threads}", *args.set]
    t = time.perf_counter()
    argv = ["train", args.recipe, "--run-dir", str(run_dir), "--no-progress"]
    if main(argv + [x for s in sets for x in ("--set", s)]) != 0:
        raise SystemExit("the LM run failed")
    train_s = time.perf_counter() - t
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    cfg = lm_config(sets, args.recipe)
    held = lm_play(str(run_dir), args.maps, True, True, cfg)
    append(Path(args.data), {
        "what": "lm", "recipe": args.recipe, "seed": args.seed, "overrides": sets, "machine": machine(),
        "train_s": round(train_s, 1), "env_steps": sum(r.get("env_steps", 0) for r in rows),
        "curve": [{"step": r["step"], "env_steps": r.get("env_steps"), "reward": r["reward"],
                   "success": r.get("rewards/env_success"), "step_s": round(r["time/step_s"], 1)} for r in rows],
        "held_out": held, "date": time.strftime("%Y-%m-%d %H:%M")})


def cmd_base(args) -> None:
    cfg = lm_config([f"threads={args.threads}", *args.set], args.recipe)
    import torch

    torch.set_num_threads(args.threads)
    append(Path(args.data), {"what": "base", "recipe": args.recipe, "overrides": args.set, "machine": machine(),
                             "held_out": lm_play(None, args.maps, False, True, cfg),
                             "date": time.strftime("%Y-%m-%d %H:%M")})


# ---------------------------------------------------------------------- the MLP agent
def mlp_play(agent, maps: int, eval_seed: int, sampled: bool, seed: int) -> dict:
    import numpy as np
    import torch

    from rlhf.gym.envs import make_env

    env = make_env("rlhf/FrozenLakeRandomHeldOut-v0")
    rng = np.random.default_rng(seed)
    wins = []
    for i in range(maps):
        obs, _ = env.reset(seed=eval_seed + i)
        done, info = False, {}
        while not done:
            x = torch.as_tensor(obs, dtype=torch.float32)[None]
            with torch.no_grad():
                logits = agent.dist_params(x)[0].double()
            a = int(torch.multinomial(torch.softmax(logits, -1), 1, generator=torch.Generator().manual_seed(
                int(rng.integers(2**31))))[0]) if sampled else int(logits.argmax())
            obs, _, terminated, truncated, info = env.step(a)
            done = terminated or truncated
        wins.append(float(info.get("success", False)))
    return rate(wins)


def cmd_mlp(args) -> None:
    import rlhf
    from rlhf.config import load_run_config
    from rlhf.gym.common import load_agent

    # a first short run outside the clock: the trainer's imports are not the first rung's training time
    rlhf.train(MLP_RECIPE, run_dir=str(Path(args.runs) / f"mlp-seed{args.seed}-warmup"), progress=False,
               seed=args.seed, total_steps=512, threads=1, eval_episodes=1)
    for steps in args.ladder:
        run_dir = Path(args.runs) / f"mlp-seed{args.seed}-{steps}"
        t = time.perf_counter()
        rlhf.train(MLP_RECIPE, run_dir=str(run_dir), progress=False, seed=args.seed, total_steps=steps,
                   threads=1, eval_episodes=1)
        train_s = time.perf_counter() - t
        cfg = load_run_config(str(run_dir))
        agent = load_agent(str(run_dir), cfg)
        append(Path(args.data), {
            "what": "mlp", "recipe": MLP_RECIPE, "seed": args.seed, "env_steps": steps, "train_s": round(train_s, 1),
            "machine": machine(), "held_out": {"greedy": mlp_play(agent, args.maps, cfg.eval_seed, False, args.seed),
                                               "sampled": mlp_play(agent, args.maps, cfg.eval_seed, True, args.seed)},
            "date": time.strftime("%Y-%m-%d %H:%M")})


# ---------------------------------------------------------------------- the report
def cmd_report(args) -> None:
    rows = [json.loads(x) for x in Path(args.data).read_text().splitlines() if x.strip()]
    base = [r for r in rows if r["what"] == "base"][-1:]
    lm = {r["seed"]: r for r in rows if r["what"] == "lm"}
    mlp = {(r["seed"], r["env_steps"]): r for r in rows if r["what"] == "mlp"}

    def cell(rs, mode):
        return " / ".join(f"{r['held_out'][mode]['success']:.2f}±{r['held_out'][mode]['success_se']:.2f}" for r in rs)

    print("| agent | env steps | train time (s) | held-out success, greedy | sampled |")
    print("| --- | --- | --- | --- | --- |")
    for r in base:
        print(f"| SmolLM2-135M-Instruct, base | 0 | 0 | {cell([r], 'greedy')} | {cell([r], 'sampled')} |")
    if lm:
        rs = [lm[s] for s in sorted(lm)]
        steps = " / ".join("%.0f" % r["env_steps"] for r in rs)
        secs = " / ".join("%.0f" % r["train_s"] for r in rs)
        print(f"| SmolLM2-135M + LoRA r16, {rs[0]['recipe']}, seeds {', '.join(map(str, sorted(lm)))} | "
              f"{steps} | {secs} | {cell(rs, 'greedy')} | {cell(rs, 'sampled')} |")
    seeds = sorted({s for s, _ in mlp})
    for steps in sorted({k for _, k in mlp}):
        rs = [mlp[(s, steps)] for s in seeds if (s, steps) in mlp]
        secs = " / ".join("%.1f" % r["train_s"] for r in rs)
        print(f"| MLP PPO, {rs[0]['recipe']}, seeds {', '.join(map(str, seeds))} | {steps} | "
              f"{secs} | {cell(rs, 'greedy')} | {cell(rs, 'sampled')} |")
    if lm and mlp:  # the MLP agent's first rung at or above the LM's mean held-out success
        for mode in ("greedy", "sampled"):
            target = sum(r["held_out"][mode]["success"] for r in lm.values()) / len(lm)
            reach = []
            for s in seeds:
                hit = [(k, r) for (t, k), r in sorted(mlp.items()) if t == s and r["held_out"][mode]["success"] >= target]
                reach.append(f"seed {s}: {hit[0][0]} steps, {hit[0][1]['train_s']:.1f} s" if hit else f"seed {s}: not reached")
            lm_steps = sum(r["env_steps"] for r in lm.values()) / len(lm)
            lm_s = sum(r["train_s"] for r in lm.values()) / len(lm)
            print(f"\n{mode}: the LM's mean held-out success {target:.3f} after {lm_steps:.0f} env steps, {lm_s:.0f} s; "
                  f"the MLP agent's first rung at or above it: {'; '.join(reach)}")
    if args.plot:
        plot(base, lm, mlp, Path(args.plot))


def plot(base, lm, mlp, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 4.2))
    for mode, style in (("greedy", "-"), ("sampled", "--")):
        seeds = sorted({s for s, _ in mlp})
        for seed in seeds:
            pts = sorted((k, r["held_out"][mode]) for (s, k), r in mlp.items() if s == seed)
            ax.errorbar([k for k, _ in pts], [p["success"] for _, p in pts], [p["success_se"] for _, p in pts],
                        fmt="o" + style, color="tab:blue", alpha=0.6, ms=3,
                        label=f"MLP PPO ({mode})" if seed == seeds[0] else None)
        for seed, r in sorted(lm.items()):
            p = r["held_out"][mode]
            ax.errorbar([r["env_steps"]], [p["success"]], [p["success_se"]], fmt="s", color="tab:red",
                        alpha=1.0 if mode == "greedy" else 0.5, ms=6,
                        label=f"SmolLM2-135M, trained ({mode})" if seed == min(lm) else None)
        for r in base:
            p = r["held_out"][mode]
            ax.axhline(p["success"], color="grey", ls=style, lw=1, label=f"SmolLM2-135M, base ({mode})")
    ax.set_xscale("log")
    ax.set_xlabel("environment steps of training (log)")
    ax.set_ylabel("success on held-out maps")
    ax.set_title("FrozenLake 4x4, random maps, 8 moves: LM agent vs MLP agent (CPU)")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"plot: {path}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    for name in ("lm", "base", "mlp", "report"):
        p = sub.add_parser(name)
        p.add_argument("--data", default=str(DATA))
        if name != "report":
            p.add_argument("--seed", type=int, default=0)
            p.add_argument("--maps", type=int, default=200, help="held-out maps played (one episode each)")
            p.add_argument("--threads", type=int, default=2)
            p.add_argument("--runs", default="runs/agents_frozenlake")
            p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="recipe override")
        if name == "mlp":
            p.add_argument("--ladder", type=int, nargs="+", default=list(MLP_LADDER))
        if name in ("lm", "base"):
            p.add_argument("--recipe", default=LM_RECIPE, help="an agent recipe in choose mode (default: %(default)s)")
        if name == "report":
            p.add_argument("--plot", default=str(ROOT / "docs" / "agents_frozenlake.png"))
    args = parser.parse_args()
    {"lm": cmd_lm, "base": cmd_base, "mlp": cmd_mlp, "report": cmd_report}[args.cmd](args)


if __name__ == "__main__":
    main()
