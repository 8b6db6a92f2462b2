"""The gym family's ``rlhf train``: pick the algorithm's loop, train, save, evaluate."""
from __future__ import annotations

from rlhf.core import Registry
from rlhf.gym.common import env_spec, save_agent
from rlhf.gym.config import ON_POLICY, GymConfig
from rlhf.gym.evaluate import evaluate_agent
from rlhf.seeding import seed_everything
from rlhf.tracking import Tracking
from rlhf.trainers.dqn import train_dqn
from rlhf.trainers.on_policy import train_on_policy
from rlhf.trainers.sac import train_sac
from rlhf.trainers.tabular import train_q_learning


LOOPS = Registry("algo")  # each algo's training loop, ``loop(cfg, spec, run, progress, resume) -> (agent, summary)``
LOOPS.register(*ON_POLICY)(train_on_policy)
LOOPS.register("dqn")(train_dqn)
LOOPS.register("sac")(train_sac)
LOOPS.register("q_learning")(train_q_learning)


def train(cfg: GymConfig, run, progress: bool = True, resume: bool = False) -> dict:
    """``rlhf train`` for gym recipes. Returns the final JSON: run_dir, training and eval figures."""
    seed_everything(cfg.seed, cfg.threads)
    spec = env_spec(cfg)
    track = Tracking(cfg, run, progress=progress)  # trackers, report.html
    agent, summary = LOOPS.get(cfg.algo)(cfg, spec, run, progress, resume=resume)
    save_agent(run, agent)
    run.plot("return", "return.png")
    result = {"run_dir": str(run.dir), "algo": cfg.algo, "env": cfg.env, "seed": cfg.seed, **summary}
    ev = evaluate_agent(agent, cfg, cfg.eval_episodes)
    result.update(eval_mean_return=ev["mean_return"], eval_std_return=ev["std_return"])
    return track.finish(result)
