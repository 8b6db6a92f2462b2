"""Double DQN reduces overestimation (van Hasselt, Guez & Silver 2016; seed 003's slides).

    nice -n 10 python benchmarks/seeds/overestimation.py               # recipes' budgets: 2 envs x 2 algos x 3 seeds
    nice -n 10 python benchmarks/seeds/overestimation.py --steps CartPole-v1=20000 Acrobot-v1=10000 \
        --n-states 32 --probes 15    # what docs/seeds_overestimation.md reports (~10 CPU min)
    python benchmarks/seeds/overestimation.py --quick --out /tmp/o     # smoke test, seconds

During DQN and Double DQN training (recipes ``dqn_cartpole``/``double_dqn_cartpole`` and
``dqn_acrobot`` with ``double`` off/on), every ``probe_every`` env steps a probe given to the
trainer (``train_dqn(..., probe=...)``) takes ``n_states`` states the agent visited recently
(the newest ``window`` transitions of the replay buffer) and measures, on those same states,

* ``q``:  mean over states of ``max_a Q(s, a)`` of the online network (what it believes), and
* ``mc``: mean over states of the discounted return of the *greedy* policy of that network,
  rolled out from exactly that state (``env.unwrapped.state = ...``): the true value of the
  policy the Q-function claims to value.

Both envs and the greedy policy are deterministic (Acrobot's torque noise is 0), so one rollout
per state is the exact return, with no Monte-Carlo variance.

Truncation. The trainer's targets bootstrap through time-limit truncation (the buffer's
``terminated`` excludes it), so Q estimates the *infinite-horizon* discounted value; the
observation holds no clock, so Q cannot know how much of the episode's 500 steps are left.
The like-for-like true value is therefore the return of an untruncated rollout. We roll out
``H`` = the env's time limit (500 steps for both) from the sampled state, whatever its time in
its own episode, and stop there: the part cut off is at most ``gamma^H * r_max / (1 - gamma)``
= 0.99^500 * 1 / 0.01 = 0.66 in absolute value (|reward| <= 1 on both envs), i.e. under 1% of
CartPole's 100 and of Acrobot's -100 ceilings; the JSON carries this bound as ``tail_bound``.

Writes ``<out>/overestimation.json`` (every probe of every run), ``<out>/overestimation.png``
and prints a markdown table (final and peak overestimation ``q - mc`` per env/algo/seed).
"""
from __future__ import annotations

import argparse
import json
import math
import multiprocessing as mp
import os
import signal
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(ROOT))

from rlhf.config import load_recipe  # noqa: E402
from rlhf.core.advantages import discounted_returns  # noqa: E402
from rlhf.errors import UserError  # noqa: E402
from rlhf.gym.envs import make_env  # noqa: E402

# env -> (DQN recipe, Double DQN recipe); Acrobot has no double recipe: dqn_acrobot + double=true
RECIPES = {"CartPole-v1": ("dqn_cartpole", "double_dqn_cartpole"),
           "Acrobot-v1": ("dqn_acrobot", "dqn_acrobot")}


# --- putting an observed state back into an env -------------------------------------------

def _cartpole_state(obs: np.ndarray) -> np.ndarray:
    return obs.astype(np.float64)  # the observation is the state (x, x_dot, theta, theta_dot)


def _acrobot_state(obs: np.ndarray) -> np.ndarray:
    # obs = (cos t1, sin t1, cos t2, sin t2, dt1, dt2); state = (t1, t2, dt1, dt2), angles in (-pi, pi]
    o = obs.astype(np.float64)
    return np.array([math.atan2(o[1], o[0]), math.atan2(o[3], o[2]), o[4], o[5]])


STATE_FROM_OBS = {"CartPole-v1": _cartpole_state, "Acrobot-v1": _acrobot_state}


def set_state(env, env_id: str, obs: np.ndarray) -> None:
    """Put the unwrapped ``env`` (already reset once) into the state that produced ``obs``.
    The observation is float32, so the state is the float32-rounded one: the same state the
    Q-network was evaluated on."""
    u = env.unwrapped
    u.state = STATE_FROM_OBS[env_id](obs)
    if hasattr(u, "steps_beyond_terminated"):
        u.steps_beyond_terminated = None


# --- the true value of the greedy policy -------------------------------------------------

@torch.no_grad()
def greedy_returns(qnet, envs: list, env_id: str, obs: np.ndarray, gamma: float, horizon: int,
                   act=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Discounted return of the greedy policy ``argmax_a qnet(s)`` from each row of ``obs``
    [K, obs_dim], each rolled out for at most ``horizon`` steps on its own unwrapped env
    (``envs[k]``, unwrapped, reset once before). Returns (returns [K], episode lengths [K]).
    ``act(obs [k, d]) -> actions [k]`` replaces the greedy policy (tests)."""
    act = act or (lambda o: qnet(torch.from_numpy(o)).argmax(-1).numpy())
    k = len(obs)
    for env, o in zip(envs, obs):
        set_state(env, env_id, o)
    rewards, dones = torch.zeros(k, horizon), torch.zeros(k, horizon)
    lengths = torch.full((k,), horizon)
    cur, alive = obs.astype(np.float32).copy(), np.ones(k, dtype=bool)
    for t in range(horizon):
        idx = np.flatnonzero(alive)
        if len(idx) == 0:
            break
        actions = act(cur[idx])
        for j, a in zip(idx, actions):
            o, r, term, _, _ = envs[j].step(int(a))  # unwrapped: no time limit, we cut at horizon
            rewards[j, t], cur[j] = r, o
            if term:
                dones[j, t], alive[j], lengths[j] = 1.0, False, t + 1
    # G_0 = sum_t gamma^t r_t, cut after a termination; rewards after it are 0 (never stepped)
    return discounted_returns(rewards, gamma, dones)[:, 0], lengths


class OverestimationProbe:
    """The trainer's probe: every ``every`` env steps, ``n_states`` recent states of the replay
    buffer -> mean max-Q of the online net and mean true greedy return from them. Draws from
    its own generator and its own envs, so the training run is the same with or without it."""

    def __init__(self, env_id: str, gamma: float, every: int, n_states: int, window: int, seed: int,
                 horizon: int | None = None):
        self.env_id, self.gamma, self.every = env_id, gamma, every
        self.n_states, self.window = n_states, window
        self.rng = np.random.default_rng(seed + 12345)
        wrapped = [make_env(env_id) for _ in range(n_states)]
        self.horizon = horizon or wrapped[0].spec.max_episode_steps  # the env's time limit
        self.envs = [e.unwrapped for e in wrapped]  # stepped without the TimeLimit wrapper
        for i, e in enumerate(self.envs):
            e.reset(seed=10_000 + i)
        self.next = every
        self.rows: list[dict] = []

    def states(self, buffer) -> np.ndarray:
        """``n_states`` observations drawn uniformly from the newest ``window`` in the buffer."""
        recent = min(self.window, buffer.size)
        back = self.rng.integers(1, recent + 1, self.n_states)  # 1 = the newest transition
        idx = (buffer.pos - back) % buffer.capacity
        return buffer.obs[idx].numpy()

    def __call__(self, steps: int, qnet, buffer) -> None:
        if steps < self.next or buffer.size == 0:
            return
        self.next += self.every
        obs = self.states(buffer)
        with torch.no_grad():
            q = qnet(torch.from_numpy(obs)).max(-1).values
        ret, lengths = greedy_returns(qnet, self.envs, self.env_id, obs, self.gamma, self.horizon)
        self.rows.append({"step": steps, "q": float(q.mean()), "mc": float(ret.mean()),
                          "q_minus_mc": float((q - ret).mean()), "mc_length": float(lengths.float().mean())})


# --- one training run, and the driver ------------------------------------------------------

def train_one(job: dict) -> dict:
    """Train one recipe with the probe; returns its probe rows and training summary."""
    from rlhf.gym.common import env_spec
    from rlhf.run import Run
    from rlhf.seeding import seed_everything
    from rlhf.trainers.dqn import train_dqn

    overrides = [f"seed={job['seed']}", "threads=1", "select_every=0", f"double={job['double']}",
                 f"out_dir={job['runs_dir']}", f"run_name={job['env']}-{job['algo']}-s{job['seed']}",
                 f"log_every={job['probe_every']}"] + job["overrides"]
    cfg = load_recipe(str(ROOT / "recipes" / f"{job['recipe']}.yaml"), overrides)
    if cfg.norm_obs:  # the probe reads raw observations back out of the buffer
        raise UserError(f"{job['recipe']}: the overestimation probe needs norm_obs=false")
    seed_everything(cfg.seed, cfg.threads)
    probe = OverestimationProbe(cfg.env, cfg.gamma, job["probe_every"], job["n_states"], job["window"],
                                cfg.seed)
    run = Run(cfg, run_dir=str(Path(job["runs_dir"]) / f"{cfg.env}-{job['algo']}-s{cfg.seed}-{os.getpid()}"
                                                     f"-{time.time_ns()}"))
    _, summary = train_dqn(cfg, env_spec(cfg), run, False, probe=probe)
    return {"env": cfg.env, "algo": job["algo"], "seed": cfg.seed, "total_steps": cfg.total_steps,
            "gamma": cfg.gamma, "horizon": probe.horizon, "n_states": job["n_states"],
            "tail_bound": cfg.gamma ** probe.horizon / (1 - cfg.gamma),
            "train_return": summary["train_return"], "cpu_s": summary["cpu_s"], "probes": probe.rows}


def jobs(args, runs_dir: str) -> list[dict]:
    out = []  # seed-major, so a sweep cut short still holds whole seeds of every env and algo
    for seed in args.seeds:
        for env in args.envs:
            if env not in RECIPES:
                raise UserError(f"--envs {env!r} has no state setter; valid: {', '.join(RECIPES)}")
            steps = args.steps.get(env)
            for algo, recipe in zip(("dqn", "double_dqn"), RECIPES[env]):
                over = [f"total_steps={steps}"] if steps else []
                if args.quick:
                    over += ["learning_starts=100", "buffer_size=5000"]
                every = args.probe_every or max(1, (steps or load_recipe(
                    str(ROOT / "recipes" / f"{recipe}.yaml")).total_steps) // args.probes)
                out.append({"env": env, "algo": algo, "recipe": recipe, "seed": seed,
                            "double": algo == "double_dqn", "overrides": over, "probe_every": every,
                            "n_states": args.n_states, "window": args.window, "runs_dir": runs_dir})
    return out


def summarise(runs: list[dict]) -> list[dict]:
    """Per run: final (last probe), peak (max over probes) and late (mean over the second half of
    the probes) of q - mc, with final q and mc. The peak of a task with negative rewards is the
    first probe's (Q starts near 0, above every true value): read the late mean beside it."""
    rows = []
    for r in runs:
        p = r["probes"]
        over = [x["q_minus_mc"] for x in p]
        rows.append({"env": r["env"], "algo": r["algo"], "seed": r["seed"], "final_q": p[-1]["q"],
                     "final_mc": p[-1]["mc"], "final_over": over[-1], "peak_over": max(over),
                     "late_over": float(np.mean(over[len(over) // 2:])),
                     "train_return": r["train_return"], "cpu_s": r["cpu_s"]})
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| env | algo | seed | final max-Q | final true return | final Q - true | peak Q - true "
             "| 2nd-half mean Q - true | train return (last 100 ep) | CPU s |", "|" + " --- |" * 10]
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["env"], r["algo"]), []).append(r)
        ret = "-" if r["train_return"] is None else f"{r['train_return']:.1f}"
        lines.append(f"| {r['env']} | {r['algo']} | {r['seed']} | {r['final_q']:.2f} | {r['final_mc']:.2f} "
                     f"| {r['final_over']:+.2f} | {r['peak_over']:+.2f} | {r['late_over']:+.2f} | {ret} | {r['cpu_s']:.0f} |")
    for (env, algo), g in groups.items():
        m = {k: float(np.mean([r[k] for r in g])) for k in ("final_q", "final_mc", "final_over", "peak_over", "late_over")}
        lines.append(f"| {env} | {algo} | **mean** | {m['final_q']:.2f} | {m['final_mc']:.2f} "
                     f"| **{m['final_over']:+.2f}** | **{m['peak_over']:+.2f}** | **{m['late_over']:+.2f}** | | |")
    return "\n".join(lines)


def plot(runs: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    envs = list(dict.fromkeys(r["env"] for r in runs))
    fig, axes = plt.subplots(2, len(envs), figsize=(6 * len(envs), 7), squeeze=False)
    colors = {"dqn": "tab:red", "double_dqn": "tab:blue"}
    for c, env in enumerate(envs):
        top, bottom = axes[0][c], axes[1][c]
        for r in (r for r in runs if r["env"] == env):
            steps = [p["step"] for p in r["probes"]]
            col, first = colors[r["algo"]], r["seed"] == min(x["seed"] for x in runs)
            top.plot(steps, [p["q"] for p in r["probes"]], color=col, lw=1.2,
                     label=f"{r['algo']}: mean max-Q" if first else None)
            top.plot(steps, [p["mc"] for p in r["probes"]], color=col, lw=1.2, ls="--",
                     label=f"{r['algo']}: true return of greedy policy" if first else None)
            bottom.plot(steps, [p["q_minus_mc"] for p in r["probes"]], color=col, lw=1.2,
                        label=r["algo"] if first else None)
        top.set_title(f"{env}: max-Q (solid) vs true return (dashed), per seed")
        bottom.axhline(0.0, color="k", lw=0.8)
        bottom.set_title(f"{env}: overestimation = max-Q - true return")
        bottom.set_xlabel("env steps")
        for ax in (top, bottom):
            ax.legend(fontsize=8)
            ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def parse(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny budgets: a smoke test in seconds")
    ap.add_argument("--envs", nargs="*", default=list(RECIPES))
    ap.add_argument("--seeds", nargs="*", type=int, default=None)
    ap.add_argument("--steps", nargs="*", default=[], metavar="ENV=N",
                    help="total_steps per env (default: the recipe's), e.g. Acrobot-v1=50000")
    ap.add_argument("--probe-every", type=int, default=0, help="env steps between probes (0: total/--probes)")
    ap.add_argument("--probes", type=int, default=20, help="probes per run when --probe-every is 0")
    ap.add_argument("--n-states", type=int, default=None, help="states per probe (default 64, quick 4)")
    ap.add_argument("--window", type=int, default=5000, help="probe states come from the newest N transitions")
    ap.add_argument("--procs", type=int, default=2, help="training runs at once (one torch thread each)")
    ap.add_argument("--out", default="runs/overestimation")
    ap.add_argument("--report", action="store_true", help="no training: table and plot from <out>/runs.jsonl "
                    "(append several sweeps' runs.jsonl into one first)")
    args = ap.parse_args(argv)
    try:
        args.steps = {k: int(v) for k, v in (s.split("=") for s in args.steps)}
    except ValueError:
        raise UserError(f"--steps {args.steps} must look like ENV=N, e.g. Acrobot-v1=50000") from None
    if args.quick:
        args.seeds = args.seeds or [0]
        args.steps = {env: 400 for env in args.envs} | args.steps
        args.probe_every = args.probe_every or 200
        args.n_states = args.n_states or 4
        args.procs = 1
    args.seeds = args.seeds if args.seeds is not None else [0, 1, 2]
    args.n_states = args.n_states or 64
    return args


def main(argv=None) -> dict:
    args = parse(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    log = out / "runs.jsonl"  # one line per finished run: a cut-short sweep keeps what it did
    start = time.time()
    if not args.report:
        log.write_text("")
        with tempfile.TemporaryDirectory(prefix="overest-runs-") as runs_dir:
            todo = jobs(args, runs_dir)
            if args.procs > 1:
                # a SIGTERM to this process unwinds the pool (terminating its workers) instead of
                # leaving them orphaned and training on
                signal.signal(signal.SIGTERM, lambda *_: sys.exit("overestimation: terminated"))
                with mp.get_context("spawn").Pool(args.procs) as pool:
                    done = pool.imap_unordered(train_one, todo, chunksize=1)
                    for r in done:
                        with log.open("a") as f:
                            f.write(json.dumps(r) + "\n")
            else:
                for j in todo:
                    with log.open("a") as f:
                        f.write(json.dumps(train_one(j)) + "\n")
    runs = [json.loads(x) for x in log.read_text().splitlines() if x.strip()]
    runs.sort(key=lambda r: (list(RECIPES).index(r["env"]), r["algo"] != "dqn", r["seed"]))
    result = {"command": " ".join(["benchmarks/seeds/overestimation.py"] + (argv or sys.argv[1:])),
              "wall_s": round(time.time() - start, 1), "runs": runs, "summary": summarise(runs)}
    (out / "overestimation.json").write_text(json.dumps(result, indent=1))
    plot(runs, out / "overestimation.png")
    print(table(result["summary"]))
    print(f"wall {result['wall_s']} s, training CPU {sum(r['cpu_s'] for r in runs):.0f} s; "
          f"wrote {out / 'overestimation.json'} and {out / 'overestimation.png'}")
    return result


if __name__ == "__main__":
    try:
        main()
    except UserError as exc:
        sys.exit(f"error: {exc}")
