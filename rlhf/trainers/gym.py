"""Entry point of the gym family: pick the algorithm's loop, train, save, evaluate."""
from __future__ import annotations

from rlhf.errors import UserError
from rlhf.gym.common import env_spec, save_agent, seed_everything
from rlhf.gym.config import ON_POLICY, GymConfig
from rlhf.gym.evaluate import evaluate_agent


def train(cfg: GymConfig, run, progress: bool = True, resume: bool = False) -> dict:
    """``rlhf train`` for gym recipes. Returns the final JSON: run_dir, training and eval figures."""
    if resume:
        raise UserError(f"--resume is not supported for gym runs ({cfg.algo} on {cfg.env}); "
                        "start a new run with `rlhf train RECIPE` (the saved policy is kept)")
    seed_everything(cfg)
    spec = env_spec(cfg)
    if cfg.algo in ON_POLICY:
        from rlhf.gym.on_policy import train_on_policy as loop
    elif cfg.algo == "dqn":
        from rlhf.gym.dqn import train_dqn as loop
    elif cfg.algo == "sac":
        from rlhf.gym.sac import train_sac as loop
    else:
        from rlhf.gym.tabular import train_q_learning as loop
    agent, summary = loop(cfg, spec, run, progress)
    save_agent(run, agent)
    run.plot("return", "return.png")
    result = {"run_dir": str(run.dir), "algo": cfg.algo, "env": cfg.env, "seed": cfg.seed, **summary}
    ev = evaluate_agent(agent, cfg, cfg.eval_episodes)
    result.update(eval_mean_return=ev["mean_return"], eval_std_return=ev["std_return"])
    return result
