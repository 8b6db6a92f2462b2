"""Deterministic evaluation on fresh seeds: greedy / mean actions, one env, N episodes."""
from __future__ import annotations

import numpy as np
import torch
from tqdm import tqdm

from rlhf.gym.common import load_agent
from rlhf.gym.config import GymConfig
from rlhf.gym.envs import make_env, obs_batch


@torch.no_grad()
def evaluate_agent(agent, cfg: GymConfig, episodes: int, progress: bool = False) -> dict:
    """Run ``episodes`` episodes seeded ``cfg.eval_seed + i`` (seeds never used in training)."""
    torch.set_num_threads(cfg.threads)
    env = make_env(cfg.env)
    # dqn with device: cuda selects checkpoints (select_every) while its network is on the GPU
    device = next((t.device for t in agent.state_dict().values()), torch.device("cpu"))
    returns, lengths = [], []
    for i in tqdm(range(episodes), desc="eval", disable=not progress):
        obs, _ = env.reset(seed=cfg.eval_seed + i)
        done, total, n = False, 0.0, 0
        while not done:
            action = agent.act_deterministic(obs_batch(obs, env.observation_space).to(device))[0].cpu().numpy()
            obs, reward, terminated, truncated, _ = env.step(action.item() if action.ndim == 0 else action)
            total, n, done = total + float(reward), n + 1, terminated or truncated
        returns.append(total)
        lengths.append(n)
    env.close()
    return {"mean_return": round(float(np.mean(returns)), 3), "std_return": round(float(np.std(returns)), 3),
            "episodes": episodes, "mean_length": float(np.mean(lengths))}


def evaluate_cli(run_dir: str, cfg: GymConfig, args) -> dict:
    agent = load_agent(run_dir, cfg)
    out = {"run_dir": str(run_dir), "env": cfg.env, "algo": cfg.algo}
    out.update(evaluate_agent(agent, cfg, args.episodes or cfg.eval_episodes, not args.no_progress))
    return out
