"""Progress of a gym run: a bar over env steps, a metric row every ``log_every`` steps, and
model selection on held-out episodes (``select_every``)."""
from __future__ import annotations

import time
from dataclasses import replace

import numpy as np
from torch import nn
from tqdm import tqdm

from rlhf.gym.config import GymConfig
from rlhf.gym.evaluate import evaluate_agent


class Progress:
    """tqdm bar over env steps (stderr) plus a metric row every ``log_every`` steps."""

    def __init__(self, cfg: GymConfig, run, enabled: bool, agent: nn.Module | None = None):
        self.cfg, self.run = cfg, run
        self.bar = tqdm(total=cfg.total_steps, desc=f"{cfg.algo} {cfg.env}", disable=not enabled,
                        unit="step", dynamic_ncols=True, mininterval=0.5)
        self.start, self.cpu_start = time.perf_counter(), time.process_time()
        self.steps, self.next_log = 0, cfg.log_every
        self.returns: list[float] = []
        self.lengths: list[int] = []
        self.last_return: float | None = None
        self.selector = BestKeeper(cfg, agent) if cfg.select_every > 0 and agent is not None else None

    def advance(self, steps: int, episodes: list[tuple[float, int]], stats_fn=None) -> None:
        self.steps += steps
        self.bar.update(steps)
        for ret, length in episodes:
            self.returns.append(ret)
            self.lengths.append(length)
        stats = None
        if self.selector is not None and self.selector.due(self.steps):
            stats = dict(stats_fn() if stats_fn else {}, **self.selector.check(self.steps))
        if self.steps >= self.next_log:
            self.next_log += self.cfg.log_every
            self.log(stats if stats is not None else (stats_fn() if stats_fn else {}))

    def log(self, stats: dict) -> None:
        row = {"step": self.steps, "time_s": round(time.perf_counter() - self.start, 2)}
        if self.returns:
            window = self.returns[-100:]
            self.last_return = float(np.mean(window))
            row.update(**{"return": self.last_return, "episodes": len(self.returns),
                          "ep_length": float(np.mean(self.lengths[-100:]))})
        row.update({k: float(v) for k, v in stats.items()})
        self.run.log(row)
        if self.last_return is not None:
            self.bar.set_postfix({"return": f"{self.last_return:.1f}"}, refresh=False)

    def close(self) -> float:
        """Stop the clock; with selection on, put the best weights seen back into the agent."""
        if self.selector is not None:
            if self.selector.last != self.steps:
                self.selector.check(self.steps)
            self.selector.restore()
        self.bar.close()
        self.wall = time.perf_counter() - self.start
        self.cpu = time.process_time() - self.cpu_start  # this process's CPU time: robust to other load
        return self.wall

    def summary(self) -> dict:
        train_return = float(np.mean(self.returns[-100:])) if self.returns else None
        out = {"steps": self.steps, "train_return": train_return, "wall_s": round(self.wall, 2),
               "cpu_s": round(self.cpu, 2)}
        if self.selector is not None:
            out.update(selected_step=self.selector.best_step, selected_return=self.selector.best)
        return out


class BestKeeper:
    """Model selection during training: every ``select_every`` steps, score the deterministic
    policy on ``select_episodes`` episodes seeded apart from the final evaluation's, and keep a
    copy of the best weights (ties: the later one)."""

    def __init__(self, cfg: GymConfig, agent: nn.Module):
        self.cfg, self.agent = cfg, agent
        self.next, self.best, self.best_step, self.state = cfg.select_every, -float("inf"), 0, None
        self.last = -1

    def due(self, steps: int) -> bool:
        return steps >= self.next

    def check(self, steps: int) -> dict:
        while self.next <= steps:
            self.next += self.cfg.select_every
        self.last = steps
        # selection seeds: eval_seed + 500_000 + i, never the final evaluation's eval_seed + i
        sel_cfg = replace(self.cfg, eval_seed=self.cfg.eval_seed + 500_000 + steps)
        score = evaluate_agent(self.agent, sel_cfg, self.cfg.select_episodes)["mean_return"]
        if score >= self.best:
            self.best, self.best_step = score, steps
            self.state = {k: v.detach().clone() for k, v in self.agent.state_dict().items()}
        return {"charts/select_return": score, "charts/best_select_return": self.best,
                "charts/best_step": self.best_step}

    def restore(self) -> None:
        if self.state is not None:
            self.agent.load_state_dict(self.state)
