"""DQN (Mnih et al. 2015) with optional Double-DQN targets and a Dueling head, combinable.

Loop: act epsilon-greedily -> store -> every ``train_freq`` steps, ``gradient_steps`` TD
updates on replayed minibatches -> hard target copy every ``target_update`` env steps.
The targets are the pure functions of ``rlhf.core.value_learning``.

Image observations (``network: nature_cnn | minatar_cnn``): uint8 frames end to end (env,
buffer, minibatch); the network scales them to [0, 1]. Memory: rlhf/gym/replay.py.

``norm_obs``: the buffer holds raw observations and the online network normalises them with
its current statistics, the ones it acts with (as SB3 does). The target network is a snapshot
of the whole online Q-function, normaliser included (``load_state_dict`` copies its buffers):
its statistics are those its weights were trained with, so ``target(s)`` is exactly the online
Q-value of ``s`` at the last copy. Feeding the frozen weights inputs scaled by newer statistics
would evaluate a function that never existed; storing normalised observations would train on
a mixture of past scalings that the acting network no longer uses.
"""
from __future__ import annotations

import copy

import numpy as np
import torch
import torch.nn.functional as F

from rlhf.core.value_learning import double_q_target, linear_schedule, td_target
from rlhf.errors import UserError
from rlhf.gym.common import build_agent, clip_grad_norm
from rlhf.gym.config import GymConfig
from rlhf.gym.envs import VecEnv
from rlhf.gym.progress import Progress
from rlhf.gym.replay import ReplayBuffer
from rlhf.gym.resume import GymSaver


def dqn_update(cfg: GymConfig, qnet, target, opt, batch) -> torch.Tensor:
    obs, actions, rewards, next_obs, terminated = batch  # on the networks' device
    with torch.no_grad():
        next_q_target = target(next_obs)
        if cfg.double:
            y = double_q_target(rewards, qnet(next_obs), next_q_target, terminated, cfg.gamma)
        else:
            y = td_target(rewards, next_q_target, terminated, cfg.gamma)
    q = qnet(obs).gather(-1, actions[:, None]).squeeze(-1)
    loss = F.smooth_l1_loss(q, y) if cfg.loss == "huber" else 0.5 * F.mse_loss(q, y)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    if cfg.max_grad_norm > 0:
        clip_grad_norm(list(qnet.parameters()), cfg.max_grad_norm)
    opt.step()
    return loss.detach()


def training_device(cfg: GymConfig) -> torch.device:
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise UserError("device cuda was asked for but torch sees no CUDA GPU here; set device: cpu "
                        "(or install a CUDA build of torch on a GPU machine)")
    return torch.device(cfg.device)


def train_dqn(cfg: GymConfig, spec: dict, run, progress: bool, resume: bool = False, probe=None):
    """``probe``: optional ``probe(steps, qnet, buffer)``, called after every env step (it keeps
    its own schedule; benchmarks/seeds/overestimation.py measures Q against true returns with
    one). Off by default; it must not change qnet or buffer."""
    env = VecEnv(cfg.env, cfg.n_envs, cfg.seed, processes=cfg.env_processes)
    device = training_device(cfg)
    qnet = build_agent(cfg, spec).to(device)
    target = copy.deepcopy(qnet).requires_grad_(False)
    opt = torch.optim.Adam(qnet.parameters(), lr=cfg.lr, fused=True)  # fused: faster on CPU and GPU
    buffer = ReplayBuffer(cfg.buffer_size, spec.get("obs_shape", spec["obs_dim"]), (), torch.long,
                          obs_dtype=env.obs_dtype, frame_stacked=spec.get("frame_stacked", False))
    rng = np.random.default_rng(cfg.seed)
    bar = Progress(cfg, run, progress, qnet)
    n, calls, since_target = cfg.n_envs, 0, 0
    stats = {"losses/td": torch.tensor(float("nan"))}
    saver = GymSaver(cfg, run, qnet, {"qnet": qnet, "target": target, "opt": opt, "buffer": buffer, "rng": rng,
                                      "env": env, "progress": bar})
    counters = lambda: {"calls": calls, "since_target": since_target, "stats": dict(stats)}  # noqa: E731
    if resume:
        c = saver.resume()
        calls, since_target, stats = c["calls"], c["since_target"], c["stats"]
    while bar.steps < cfg.total_steps:
        progress_frac = bar.steps / cfg.total_steps
        eps = linear_schedule(cfg.eps_start, cfg.eps_end, cfg.eps_fraction, progress_frac)
        obs = env.obs
        obs_t = torch.from_numpy(obs).to(device)
        qnet.obs_norm.update(obs_t)
        if rng.random() < eps and n == 1:
            actions = np.array([env.action_space.sample()])
        else:
            actions = qnet.act_deterministic(obs_t).cpu().numpy()
            if n > 1:
                explore = rng.random(n) < eps
                actions[explore] = rng.integers(0, spec["act_dim"], explore.sum())
        _, rewards, terminated, _, next_obs = env.step(actions)
        buffer.add(obs, actions, rewards, next_obs, terminated)
        calls, since_target = calls + 1, since_target + n
        if bar.steps + n > cfg.learning_starts and calls % cfg.train_freq == 0:
            k = cfg.gradient_steps if cfg.gradient_steps > 0 else cfg.train_freq * n
            for _ in range(k):
                batch = [t.to(device, non_blocking=True) for t in buffer.sample(cfg.batch_size)]
                stats["losses/td"] = dqn_update(cfg, qnet, target, opt, batch)
        if since_target >= cfg.target_update:
            target.load_state_dict(qnet.state_dict())
            since_target = 0
        stats["charts/epsilon"] = eps
        bar.advance(n, env.drain_episodes(), lambda: stats)
        if probe is not None:
            probe(bar.steps, qnet, buffer)
        saver.maybe(bar.steps, counters)
    saver.final(bar.steps, counters)
    bar.close()
    env.close()
    qnet.cpu()  # saved and evaluated on the CPU
    return qnet, dict(bar.summary(), replay_mb=round(buffer.nbytes() / 2**20, 1))
