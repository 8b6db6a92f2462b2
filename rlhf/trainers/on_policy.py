"""On-policy actor-critic family: REINFORCE with a baseline (reinforce), A2C, PPO, TRPO.

One loop: ``collect -> advantages -> update -> log``. The algorithms differ only in the
advantage estimator (the recipe's ``adv_estimator``: Monte-Carlo returns for reinforce, GAE
otherwise), the policy objective (``objective``: reinforce for reinforce and a2c, ppo's surrogate,
none for trpo) and the update rule (``UPDATES``, by algo); estimators and objectives are looked up
in ``rlhf.core``'s registries, and every policy loss goes through ``rlhf.core.policy_loss`` with
the gym layout ``[N, 1]``.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import torch
from torch import Tensor

from rlhf.core import (ADV_ESTIMATORS, AdvInput, Registry, adaptive_kl_coef, explained_variance, kl_estimate,
                       policy_loss, value_loss, whiten)
from rlhf.core.natural_gradient import backtracking_line_search, conjugate_gradient, max_step_scale
from rlhf.gym.common import build_agent, clip_grad_norm
from rlhf.gym.config import GymConfig
from rlhf.gym.envs import RewardScaler, VecEnv
from rlhf.gym.progress import Progress
from rlhf.gym.resume import GymSaver
from rlhf.gym.policies import ActorCritic


@dataclass
class Batch:
    """A flattened rollout, ``b_`` prefixed as in CleanRL: N = n_steps * n_envs rows."""

    obs: Tensor       # [N, D] observations as the policy saw them (normalised at act time, norm_obs)
    actions: Tensor   # [N] or [N, A]
    logp: Tensor      # [N] log pi_old(a|s) at collection
    values: Tensor    # [N] V_old(s)
    adv: Tensor       # [N]
    ret: Tensor       # [N] value targets


def collect(cfg: GymConfig, env: VecEnv, policy: ActorCritic, scaler: RewardScaler, rng: np.random.Generator) -> Batch:
    """Roll ``n_steps`` per env; bootstrap V(final obs) on truncation, cut on termination.
    The rollout runs in NumPy (``policy.sampler``): no torch op per env step.

    With ``norm_obs`` the batch keeps each observation normalised with the statistics of the
    moment it was acted on, and every bootstrap value is computed then too (CleanRL, SB3): the
    update then scores exactly what the policy saw, so its ratio is 1 before the first step.
    Re-normalising raw observations with the end-of-rollout statistics would make the ratio,
    the clip fraction, approx_kl and the adaptive beta measure the normaliser's drift."""
    T, N = cfg.n_steps, env.n
    obs = np.zeros((T, N, env.obs.shape[1]), dtype=np.float32)
    actions = np.zeros((T, N), dtype=np.int64) if env.discrete else np.zeros((T, N, *env.action_space.shape), np.float32)
    logp, values, rewards, terminated, dones = (np.zeros((T, N), dtype=np.float32) for _ in range(5))
    truncations: list[tuple[int, np.ndarray, np.ndarray]] = []  # (t, env rows, final obs)
    sample, norm = policy.sampler(rng), policy.obs_norm.numpy()
    for t in range(T):
        raw = np.asarray(env.obs, dtype=np.float32)
        if policy.obs_norm.enabled:
            policy.obs_norm.update(torch.from_numpy(raw))
        actions[t], logp[t], values[t] = sample(raw)
        obs[t] = norm(raw)  # what ``sample`` saw (the same NumPy function of the same statistics)
        _, r, term, trunc, next_obs = env.step(actions[t])
        done = np.maximum(term, trunc)
        rewards[t] = scaler(r, done)
        terminated[t], dones[t] = term, done
        if trunc.any():  # V(final obs) now, with the statistics the step was taken under
            rows = np.flatnonzero(trunc)
            with torch.no_grad():
                truncations.append((t, rows, policy.value(torch.from_numpy(next_obs[rows]))))
    obs, actions, logp, values, rewards, terminated, dones = (
        torch.from_numpy(x) for x in (obs, actions, logp, values, rewards, terminated, dones))
    with torch.no_grad():
        last_value = policy.value(torch.from_numpy(env.obs))
        next_values = torch.cat([values[1:], last_value[None]])  # V(s_{t+1}) along each env's row
        for t, rows, final_value in truncations:  # the successor of a truncated step is its final obs
            next_values[t, rows] = final_value
    # time-last layout [N, T] for the core estimators; the recipe's adv_estimator (rlhf.core's registry)
    adv, ret = ADV_ESTIMATORS.get(cfg.adv_estimator)(AdvInput(
        rewards.T, values=values.T, gamma=cfg.gamma, gae_lambda=cfg.gae_lambda, next_values=next_values.T,
        terminated=terminated.T, dones=dones.T, last_value=last_value))
    flat = lambda x: x.T.reshape(-1)  # noqa: E731  back to time-major rows, matching obs
    return Batch(obs.reshape(T * N, -1), actions.reshape(T * N, *actions.shape[2:]),
                 logp.reshape(-1), values.reshape(-1), flat(adv), flat(ret))


def actor_critic_loss(cfg: GymConfig, policy: ActorCritic, b: Batch, idx, clip: float, penalty_coef: float,
                      norm_adv: bool, log_entropy: bool = True) -> tuple[Tensor, dict]:
    """policy_loss (shared core, the recipe's ``objective``) + vf_coef * value loss - ent_coef *
    entropy on rows ``idx``
    (slice(None) for the whole batch: no gather copies). ``norm_adv`` whitens the rows'
    advantages; without an entropy bonus the entropy is only a logged statistic, computed
    outside the graph and only when ``log_entropy``."""
    x = b.obs[idx]  # already normalised (``collect``)
    params, v = policy.actor(x), policy.critic(x).squeeze(-1)
    logp = policy.log_prob(params, b.actions[idx])
    adv = b.adv[idx]
    adv = whiten(adv) if norm_adv and len(adv) > 1 else adv
    pg, stats = policy_loss(logp[:, None], adv[:, None], None, old_logp=b.logp[idx][:, None],
                            objective=cfg.objective, clip_range=clip, penalty_coef=penalty_coef)
    vl = value_loss(v, b.ret[idx], b.values[idx], cfg.clip_range_value).mean()
    loss = pg + cfg.vf_coef * vl
    stats["value_loss"] = vl.detach()
    if cfg.ent_coef != 0.0:
        entropy = policy.entropy(params).mean()
        loss = loss - cfg.ent_coef * entropy
        stats["entropy"] = entropy.detach()
    elif log_entropy:
        with torch.no_grad():
            stats["entropy"] = policy.entropy(params).mean()
    return loss, stats


def step(opt, loss: Tensor, params, max_grad_norm: float) -> None:
    opt.zero_grad(set_to_none=True)
    loss.backward()
    if max_grad_norm > 0:
        clip_grad_norm(params, max_grad_norm)
    opt.step()


# each on-policy algo's update rule, ``rule(updater, batch, clip) -> stats``, by the recipe's algo name
UPDATES = Registry("algo")


class Updater:
    """Holds the optimiser(s) and per-algorithm state (PPO's adaptive penalty_coef)."""

    def __init__(self, cfg: GymConfig, policy: ActorCritic):
        self.cfg, self.policy = cfg, policy
        self.params = list(policy.parameters())
        if cfg.algo == "trpo":  # the actor moves by natural steps; only the critic has an optimiser
            self.actor_params = list(policy.actor.parameters()) + ([policy.log_std] if not policy.discrete else [])
            self.params = list(policy.critic.parameters())
        if cfg.optimizer == "rmsprop":
            self.opt = torch.optim.RMSprop(self.params, lr=cfg.lr, alpha=0.99, eps=1e-5)
        else:
            self.opt = torch.optim.Adam(self.params, lr=cfg.lr, eps=1e-5, fused=True)  # fused: ~20% faster on CPU
        self.penalty_coef = cfg.penalty_coef

    def __call__(self, b: Batch, progress: float) -> dict:
        frac = 1.0 - progress if self.cfg.lr_schedule == "linear" else 1.0
        for g in self.opt.param_groups:
            g["lr"] = self.cfg.lr * frac
        clip = self.cfg.clip_range * (1.0 - progress if self.cfg.clip_schedule == "linear" else 1.0)
        return UPDATES.get(self.cfg.algo)(self, b, clip)

    @UPDATES.register("reinforce", "a2c")  # A2C differs in the advantage (GAE, short rollouts) and recipe
    def reinforce(self, b: Batch, clip: float) -> dict:
        """One gradient step of the policy objective (reinforce's and a2c's: 'reinforce') + value
        regression."""
        loss, stats = actor_critic_loss(self.cfg, self.policy, b, slice(None), clip, 0.0, self.cfg.norm_adv)
        step(self.opt, loss, self.params, self.cfg.max_grad_norm)
        return stats

    @UPDATES.register("ppo")
    def ppo(self, b: Batch, clip: float) -> dict:
        cfg, n = self.cfg, len(b.logp)
        mb = n // cfg.minibatches  # minibatches divides n (GymConfig.validate)
        full = mb == n  # one minibatch = the whole rollout (rl-zoo's CartPole setting)
        if full and cfg.norm_adv:  # the same rows every epoch: whiten once, not once per epoch
            b = replace(b, adv=whiten(b.adv))
        starts = range(0, n - mb + 1, mb)
        for epoch in range(cfg.epochs):
            perm = None if full else torch.randperm(n)  # the whole batch needs no shuffle
            kls = []
            for start in starts:
                idx = slice(None) if full else perm[start:start + mb]
                last = epoch == cfg.epochs - 1 and start == starts[-1]
                loss, stats = actor_critic_loss(cfg, self.policy, b, idx, clip, self.penalty_coef,
                                                cfg.norm_adv and not full, log_entropy=last)
                step(self.opt, loss, self.params, cfg.max_grad_norm)
                kls.append(stats["approx_kl"])
                if epoch == 0 and start == 0:  # before any step: ratio 1 up to float rounding
                    first = {f"{k}_first": stats[k] for k in ("approx_kl", "clip_frac") if k in stats}
        stats["approx_kl"] = torch.stack(kls).mean()  # before each step: CleanRL's debug variable
        stats.update(first)
        if cfg.objective == "adaptive_kl":  # the controller measures the whole update's move
            stats["kl_after_update"] = self.kl_after_update(b)
            self.penalty_coef = adaptive_kl_coef(self.penalty_coef, float(stats["kl_after_update"]), cfg.target_kl)
        stats["penalty_coef"] = torch.tensor(self.penalty_coef)
        return stats

    @torch.no_grad()
    def kl_after_update(self, b: Batch) -> Tensor:
        """KL(pi_old || pi) on the rollout after the last update step, the adaptive-KL
        controller's input: the mean k3 estimate ``rho - 1 - log rho`` (``rho = pi / pi_old``) over
        the rollout's actions, sampled by pi_old, so its expectation is KL(pi_old || pi)."""
        logp = self.policy.log_prob(self.policy.actor(b.obs), b.actions)  # b.obs is normalised (``collect``)
        return kl_estimate(b.logp, logp, "k3").mean()

    @UPDATES.register("trpo")
    def trpo(self, b: Batch, clip: float) -> dict:
        """Natural-gradient step on the importance-sampled surrogate under mean KL <= target_kl,
        then ``critic_updates`` epochs of value regression."""
        cfg, policy, params = self.cfg, self.policy, self.actor_params
        adv = whiten(b.adv) if cfg.norm_adv else b.adv
        with torch.no_grad():
            old_params = policy.actor(b.obs)  # b.obs is normalised already (``collect``)
            old_log_std = policy.log_std.detach().clone() if not policy.discrete else None

        def surrogate() -> tuple[Tensor, dict]:
            logp = policy.log_prob(policy.actor(b.obs), b.actions)
            return policy_loss(logp[:, None], adv[:, None], None, old_logp=b.logp[:, None], objective=cfg.objective)

        def mean_kl() -> Tensor:
            return policy.kl_from(old_params, policy.actor(b.obs), old_log_std).mean()

        loss, stats = surrogate()
        grad = torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, params)])
        kl_grad = torch.cat([g.reshape(-1) for g in torch.autograd.grad(mean_kl(), params, create_graph=True)])

        def fvp(v: Tensor) -> Tensor:  # Fisher-vector product = Hessian of the mean KL times v
            hv = torch.autograd.grad(kl_grad @ v, params, retain_graph=True)
            return torch.cat([h.reshape(-1) for h in hv]) + cfg.cg_damping * v

        direction = conjugate_gradient(fvp, -grad, cfg.cg_iters)
        full_step = max_step_scale(direction, fvp(direction), cfg.target_kl) * direction
        flat0 = torch.cat([p.detach().reshape(-1) for p in params])

        def assign(flat: Tensor) -> None:
            i = 0
            for p in params:
                p.data.copy_(flat[i:i + p.numel()].view_as(p))
                i += p.numel()

        @torch.no_grad()
        def evaluate(delta: Tensor) -> tuple[float, float]:
            assign(flat0 + delta)
            new_loss, _ = surrogate()
            return float(loss - new_loss), float(mean_kl())

        accepted, k = backtracking_line_search(evaluate, full_step, float(-(grad @ full_step)), cfg.target_kl,
                                               cfg.line_search_steps)
        assign(flat0 + accepted if accepted is not None else flat0)
        n = len(b.ret)
        mb = n // cfg.minibatches
        for _ in range(cfg.critic_updates):
            perm = torch.randperm(n)
            for start in range(0, n - mb + 1, mb):
                idx = perm[start:start + mb]
                vl = value_loss(policy.critic(b.obs[idx]).squeeze(-1), b.ret[idx]).mean()
                step(self.opt, vl, self.params, cfg.max_grad_norm)
        stats.update(value_loss=vl.detach(), line_search_k=torch.tensor(float(k)),
                     approx_kl=torch.tensor(float(mean_kl())) if accepted is not None else torch.tensor(0.0))
        return stats


def train_on_policy(cfg: GymConfig, spec: dict, run, progress: bool, resume: bool = False):
    env = VecEnv(cfg.env, cfg.n_envs, cfg.seed, processes=cfg.env_processes)
    policy = build_agent(cfg, spec)
    scaler = RewardScaler(cfg.n_envs, cfg.gamma, cfg.norm_reward)
    update = Updater(cfg, policy)
    rng = np.random.default_rng(cfg.seed)  # the rollout's action noise
    bar = Progress(cfg, run, progress, policy)
    per_rollout = cfg.n_steps * cfg.n_envs
    stats: dict = {}
    saver = GymSaver(cfg, run, policy, {"policy": policy, "opt": update.opt, "rng": rng, "env": env,
                                        "scaler": scaler, "progress": bar})
    counters = lambda: {"penalty_coef": update.penalty_coef}  # noqa: E731  (PPO's adaptive KL coefficient)
    if resume:
        update.penalty_coef = saver.resume()["penalty_coef"]
    while bar.steps < cfg.total_steps:
        b = collect(cfg, env, policy, scaler, rng)
        stats = update(b, bar.steps / cfg.total_steps)
        stats["explained_variance"] = explained_variance(b.values, b.ret, torch.ones_like(b.ret))
        bar.advance(per_rollout, env.drain_episodes(), lambda: stats)
        saver.maybe(bar.steps, counters)
    saver.final(bar.steps, counters)
    bar.close()
    env.close()
    return policy, bar.summary()
