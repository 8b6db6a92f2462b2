"""SAC (Haarnoja et al. 2018) with twin critics, Polyak-averaged targets and automatic
entropy tuning. Targets and losses are the pure functions of ``rlhf.core.value_learning``."""
from __future__ import annotations

import copy

import torch

from rlhf.core.value_learning import sac_actor_loss, soft_q_target, temperature_loss
from rlhf.gym.common import build_agent
from rlhf.gym.config import GymConfig
from rlhf.gym.envs import VecEnv
from rlhf.gym.progress import Progress
from rlhf.gym.policies import TwinQ
from rlhf.gym.replay import ReplayBuffer
from rlhf.gym.resume import GymSaver


class SAC:
    def __init__(self, cfg: GymConfig, spec: dict):
        self.cfg = cfg
        self.actor = build_agent(cfg, spec)
        self.critic = TwinQ(spec["obs_dim"], spec["act_dim"], cfg.hidden, cfg.layers)
        self.critic_target = copy.deepcopy(self.critic).requires_grad_(False)
        self.actor_opt = torch.optim.Adam(self.actor.parameters(), lr=cfg.lr, fused=True)
        self.critic_opt = torch.optim.Adam(self.critic.parameters(), lr=cfg.lr, fused=True)
        self.auto_alpha = cfg.alpha is None
        self.log_alpha = torch.zeros(1, requires_grad=self.auto_alpha)
        if not self.auto_alpha:
            self.log_alpha.data.fill_(float(torch.log(torch.tensor(cfg.alpha))))
        self.alpha_opt = torch.optim.Adam([self.log_alpha], lr=cfg.lr, fused=True)
        self.target_entropy = -float(spec["act_dim"]) if cfg.target_entropy is None else cfg.target_entropy
        self.online = list(self.critic.parameters())
        self.targets = list(self.critic_target.parameters())

    def update(self, batch) -> dict:
        cfg = self.cfg
        obs, actions, rewards, next_obs, terminated = batch
        alpha = self.log_alpha.detach().exp()
        with torch.no_grad():
            next_actions, next_logp = self.actor(next_obs)
            nq1, nq2 = self.critic_target(next_obs, next_actions)
            y = soft_q_target(rewards, nq1, nq2, next_logp, terminated, cfg.gamma, alpha)
        q1, q2 = self.critic(obs, actions)
        critic_loss = 0.5 * ((q1 - y) ** 2 + (q2 - y) ** 2).mean()
        self.critic_opt.zero_grad(set_to_none=True)
        critic_loss.backward()
        self.critic_opt.step()
        # actor: gradients flow through the reparameterised action into the (frozen) critics
        self.critic.requires_grad_(False)
        new_actions, logp = self.actor(obs)
        actor_loss = sac_actor_loss(logp, *self.critic(obs, new_actions), alpha).mean()
        self.actor_opt.zero_grad(set_to_none=True)
        actor_loss.backward()
        self.actor_opt.step()
        self.critic.requires_grad_(True)
        if self.auto_alpha:
            alpha_loss = temperature_loss(self.log_alpha, logp, self.target_entropy).mean()
            self.alpha_opt.zero_grad(set_to_none=True)
            alpha_loss.backward()
            self.alpha_opt.step()
        with torch.no_grad():  # Polyak: target <- (1 - tau) target + tau online
            torch._foreach_lerp_(self.targets, self.online, cfg.tau)
        return {"losses/critic": critic_loss.detach(), "losses/actor": actor_loss.detach(),
                "charts/alpha": alpha, "charts/entropy": -logp.detach().mean()}


def train_sac(cfg: GymConfig, spec: dict, run, progress: bool, resume: bool = False):
    env = VecEnv(cfg.env, cfg.n_envs, cfg.seed, processes=cfg.env_processes)
    agent = SAC(cfg, spec)
    buffer = ReplayBuffer(cfg.buffer_size, spec["obs_dim"], (spec["act_dim"],))
    bar = Progress(cfg, run, progress, agent.actor)
    n, calls, stats = cfg.n_envs, 0, {}
    saver = GymSaver(cfg, run, agent.actor, {"actor": agent.actor, "critic": agent.critic,
                                             "critic_target": agent.critic_target, "actor_opt": agent.actor_opt,
                                             "critic_opt": agent.critic_opt, "alpha_opt": agent.alpha_opt,
                                             "buffer": buffer, "env": env, "progress": bar})
    counters = lambda: {"calls": calls, "stats": dict(stats), "log_alpha": agent.log_alpha.detach().clone()}  # noqa: E731
    if resume:
        c = saver.resume()
        calls, stats = c["calls"], c["stats"]
        with torch.no_grad():
            agent.log_alpha.copy_(c["log_alpha"])
    while bar.steps < cfg.total_steps:
        obs = env.obs
        if bar.steps < cfg.learning_starts:  # uniform random warm-up
            actions = torch.rand(n, spec["act_dim"]) * agent.actor.scale * 2 + agent.actor.bias - agent.actor.scale
        else:
            with torch.no_grad():
                actions, _ = agent.actor(torch.from_numpy(obs))
        actions = actions.numpy()
        _, rewards, terminated, _, next_obs = env.step(actions)
        buffer.add(obs, actions, rewards, next_obs, terminated)
        calls += 1
        if bar.steps + n > cfg.learning_starts and calls % cfg.train_freq == 0:
            k = cfg.gradient_steps if cfg.gradient_steps > 0 else cfg.train_freq * n
            for _ in range(k):
                stats = agent.update(buffer.sample(cfg.batch_size))
        bar.advance(n, env.drain_episodes(), lambda: stats)
        saver.maybe(bar.steps, counters)
    saver.final(bar.steps, counters)
    bar.close()
    env.close()
    return agent.actor, bar.summary()
