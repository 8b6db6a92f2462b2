"""Token-level RL for language models: collect -> score -> advantages -> update -> log.

GRPO, RLOO and REINFORCE are settings of this one loop (the advantage estimator and the
objective), not three copies of it. Shapes: N = prompts_per_step * group_size rows, C
completion tokens; ``logp, old_logp, ref_logp, mask : [N, C]``, ``rewards, adv : [N]``.
"""
from __future__ import annotations

import itertools
import math
import random
import time

import torch
from tqdm.auto import tqdm

from rlhf.checkpoint import load_checkpoint, restore, save_checkpoint
from rlhf.config import LMConfig
from rlhf.core import (
    aggregate,
    gae,
    group_normalize,
    kl_estimate,
    leave_one_out,
    policy_loss,
    value_loss,
    whiten,
)
from rlhf.errors import UserError
from rlhf.lm.models import resolve_model
from rlhf.lm.policy import LMPolicy, Rollout, length_buckets
from rlhf.rewards import load_rewards, score
from rlhf.run import Run
from rlhf.tasks import make_task


def train(cfg: LMConfig, run: Run, progress: bool = True, resume: bool = False) -> dict:
    seed_everything(cfg.seed, cfg.threads)
    task = make_task(cfg.task, cfg.seed, cfg.steps * cfg.prompts_per_step, cfg.eval_task)
    reward_fns = load_rewards(cfg.rewards)
    ckpt, state = load_checkpoint(run.dir) if resume else (None, None)
    policy = LMPolicy(resolve_model(cfg.model), lora_r=cfg.lora_r, lora_alpha=cfg.lora_alpha,
                      lora_dropout=cfg.lora_dropout, lora_targets=cfg.lora_targets, dtype=cfg.dtype,
                      temperature=cfg.temperature, adapter_path=ckpt and str(ckpt / "adapter"),
                      value_head=cfg.algo == "ppo")
    opt = torch.optim.AdamW(policy.trainable_parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / (cfg.warmup_steps + 1)))
    counters = {"step": 0, "baseline": None, "bad_steps": 0}
    if state is not None:
        counters = restore(state, opt, sched)
        run.truncate_history(counters["step"])  # steps logged after the checkpoint are redone
    baseline = Baseline(value=counters["baseline"])
    rows_iter = itertools.islice(task.train_rows(), counters["step"] * cfg.prompts_per_step, None)
    t_start = time.time()
    bar = tqdm(range(counters["step"], cfg.steps), desc=cfg.algo, disable=not progress,
               dynamic_ncols=True, initial=counters["step"], total=cfg.steps)
    try:
        for step in bar:
            t0 = time.time()
            rows = [next(rows_iter) for _ in range(cfg.prompts_per_step)]
            roll, prompts, completions, columns = collect(policy, rows, cfg)        # collect
            t1 = time.time()
            rewards, reward_means = score(reward_fns, prompts, completions, columns)  # score
            t2 = time.time()
            ctx = rollout_pass(policy, roll, cfg)                    # ref / old log-probs, values
            adv, ret = advantages(rewards, roll, ctx, cfg, baseline)                 # advantages
            stats = {**update(policy, opt, sched, roll, adv, ret, ctx, cfg),         # update
                     "time/ref_s": ctx.pop("time_s")}
            counters = {"step": step + 1, "baseline": baseline.value,
                        "bad_steps": counters["bad_steps"] + 1 if stats["skipped"] else 0}
            row = metrics_row(step + 1, rewards, reward_means, roll, {**stats, **ctx.get("stats", {})},
                              cfg, lr=sched.get_last_lr()[0], times=(t0, t1, t2, time.time()))
            run.log(row)                                                             # log
            bar.set_postfix(reward=f"{row['reward']:.2f}", kl=f"{stats.get('kl', 0.0):.3f}",
                            len=f"{row['completion_len']:.1f}")
            if counters["bad_steps"] >= cfg.max_nonfinite_steps:
                save(run, policy, opt, sched, counters)
                raise UserError(f"the loss was not finite for {counters['bad_steps']} steps in a row (up to "
                                f"step {step + 1}); lower lr or max_grad_norm; the last good adapter is in "
                                f"{run.dir}/adapter")
            if cfg.save_every and (step + 1) % cfg.save_every == 0:
                save(run, policy, opt, sched, counters)
    except KeyboardInterrupt:  # mid-step: keep the adapter; the last checkpoint stays consistent
        run.save_atomic("adapter", policy.save_adapter)
        raise
    save(run, policy, opt, sched, counters)
    run.plot("reward")
    return summary(run, policy, time.time() - t_start)


def collect(policy: LMPolicy, rows: list[dict], cfg: LMConfig, greedy: bool = False, adapter: bool = True):
    """Sample group_size completions per prompt (greedy: one argmax completion); return the
    rollout and what reward functions take: prompts, completions and dataset columns, one per row."""
    g = 1 if greedy else cfg.group_size
    prompts = [r["prompt"] for r in rows]
    ids, attn = policy.encode_prompts(prompts)
    roll = policy.generate(ids, attn, g, cfg.max_new_tokens, greedy=greedy, adapter=adapter)
    texts = policy.decode(roll.completion_ids, roll.mask)
    conversational = not isinstance(prompts[0], str)
    completions = [[{"role": "assistant", "content": t}] for t in texts] if conversational else texts
    columns = {k: [r[k] for r in rows for _ in range(g)] for k in rows[0] if k != "prompt"}
    return roll, [p for p in prompts for _ in range(g)], completions, columns


def metrics_row(step: int, rewards, reward_means: dict, roll: Rollout, stats: dict, cfg: LMConfig,
                lr: float, times: tuple[float, float, float, float]) -> dict:
    """One line of metrics.jsonl. ``times``: start, after sampling, after scoring, end."""
    t0, t1, t2, t3 = times
    return {"step": step, "reward": rewards.mean(), "reward_std": rewards.std(),
            **{f"rewards/{k}": v for k, v in reward_means.items()},
            "frac_groups_all_equal": _frac_equal_groups(rewards, cfg.group_size),
            "completion_len": roll.mask.sum(1).mean(), "truncated": roll.truncated.float().mean(),
            **stats, "lr": lr, "time/generate_s": t1 - t0, "time/score_s": t2 - t1,
            "time/update_s": t3 - t2, "time/step_s": t3 - t0}


class Baseline:
    """Exponential moving average of the mean reward: REINFORCE's baseline. The first batch
    is its own baseline; after that ``b <- decay * b + (1 - decay) * mean(rewards)``."""

    def __init__(self, decay: float = 0.9, value: float | None = None):
        self.decay, self.value = decay, value

    def __call__(self, rewards: torch.Tensor) -> torch.Tensor:
        mean = float(rewards.mean())
        b = mean if self.value is None else self.value
        self.value = mean if self.value is None else self.decay * b + (1 - self.decay) * mean
        return torch.tensor(b)


@torch.no_grad()
def rollout_pass(policy: LMPolicy, roll: Rollout, cfg: LMConfig) -> dict:
    """No-grad passes over the rollout: the reference's log-probs (when beta > 0), and the
    rollout policy's log-probs and values when the update needs them (several optimiser steps
    per rollout make it off-policy; PPO needs V(s_t) for GAE)."""
    t = time.time()
    ctx: dict = {"ref_logp": policy.logp(roll, adapter=False) if cfg.beta else None,
                 "old_logp": None, "old_values": None}
    if cfg.algo == "ppo" or cfg.epochs * cfg.minibatches > 1:
        out = policy.forward(roll, values=cfg.algo == "ppo")
        ctx["old_logp"], ctx["old_values"] = out["logp"], out.get("values")
    ctx["time_s"] = time.time() - t
    return ctx


def advantages(rewards: torch.Tensor, roll: Rollout, ctx: dict, cfg: LMConfig, baseline: Baseline
               ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Advantages: one per completion [N] (grpo, rloo, reinforce) or per token [N, C] (ppo,
    with the value targets ``ret``). KL placed in the reward is subtracted here."""
    kl = None
    if cfg.kl_placement == "reward" and ctx["ref_logp"] is not None:
        logp = ctx["old_logp"] if ctx["old_logp"] is not None else roll.rollout_logp
        kl = kl_estimate(logp, ctx["ref_logp"], cfg.kl_estimator) * roll.mask     # [N, C]
    if cfg.algo == "ppo":
        last = (roll.mask.sum(1).long() - 1).clamp(min=0)
        token_rewards = torch.zeros_like(roll.mask)
        token_rewards[torch.arange(len(roll)), last] = rewards  # the sequence reward on its last token
        if kl is not None:
            token_rewards = token_rewards - cfg.beta * kl
        adv, ret = gae(token_rewards, ctx["old_values"], cfg.gamma, cfg.lam, mask=roll.mask)
        if cfg.whiten_advantages:
            adv = whiten(adv, roll.mask)
        ctx["stats"] = {"explained_variance": explained_variance(ctx["old_values"], ret, roll.mask)}
        return adv, ret
    if kl is not None:
        rewards = rewards - cfg.beta * kl.sum(1)
    if cfg.algo == "grpo":
        return group_normalize(rewards, cfg.group_size, cfg.scale_rewards), None
    if cfg.algo == "rloo":
        return leave_one_out(rewards, cfg.group_size), None
    return rewards - baseline(rewards), None  # reinforce


def explained_variance(values: torch.Tensor, ret: torch.Tensor, mask: torch.Tensor) -> float:
    """1 - Var(ret - V) / Var(ret) over masked tokens: 1 is a perfect critic, <= 0 a useless one."""
    m = mask.bool()
    var = ret[m].var()
    return float(1 - (ret[m] - values[m]).var() / var) if var > 0 else float("nan")


def update(policy: LMPolicy, opt, sched, roll: Rollout, adv: torch.Tensor, ret: torch.Tensor | None,
           ctx: dict, cfg: LMConfig) -> dict:
    """``epochs`` passes over the rollout in ``minibatches`` optimiser steps each."""
    mask = roll.mask * (~roll.truncated)[:, None] if cfg.mask_truncated else roll.mask
    n_groups = roll.prompt_ids.shape[0]
    size = n_groups // cfg.minibatches  # minibatches hold whole groups: shared prompt, shared baseline
    sums: dict[str, float] = {}
    skipped = 0
    for epoch in range(cfg.epochs):
        perm = torch.randperm(n_groups) if cfg.minibatches > 1 else torch.arange(n_groups)
        for k in range(cfg.minibatches):
            groups = perm[k * size:(k + 1) * size]
            idx = roll.rows_of(groups)
            mb_mask, first = mask[idx], epoch == 0 and k == 0
            out = policy.forward(roll.select_groups(groups), values=ret is not None, entropy=first)
            loss, stats = policy_loss(
                out["logp"], adv[idx], mb_mask, old_logp=_pick(ctx["old_logp"], idx),
                ref_logp=_pick(ctx["ref_logp"], idx),
                objective="reinforce" if cfg.algo == "reinforce" else "clip",
                clip_low=cfg.clip_low, clip_high=cfg.clip_high,
                kl_coef=cfg.beta if cfg.kl_placement == "loss" else 0.0,
                kl_estimator=cfg.kl_estimator, agg=cfg.agg, denom=_denom(mb_mask, cfg))
            if ret is not None:  # ppo: the critic's loss on the same tokens and normaliser
                vf = value_loss(out["values"], ret[idx], ctx["old_values"][idx], cfg.value_clip)
                stats["vf_loss"] = aggregate(vf, mb_mask, cfg.agg, _denom(mb_mask, cfg))
                loss = loss + cfg.vf_coef * stats["vf_loss"]
                stats["vf_loss"] = stats["vf_loss"].detach()
            if first:
                stats.update(_first_minibatch_stats(out, roll, idx))
            grad_norm = _step(policy, opt, sched, loss, stats, cfg)
            skipped += not math.isfinite(grad_norm)
            for key, v in {**stats, "loss": loss.detach(), "grad_norm": grad_norm}.items():
                sums[key] = sums.get(key, 0.0) + float(v)
    steps = cfg.epochs * cfg.minibatches
    out = {key: v / steps for key, v in sums.items() if key != "nonfinite"}
    out["skipped"] = skipped
    # tokens one policy forward runs: each prompt once, each length bucket of completions
    out["tokens/train"] = roll.prompt_ids.numel() + sum(len(r) * w for r, w in length_buckets(roll.mask))
    return out


def _step(policy: LMPolicy, opt, sched, loss: torch.Tensor, stats: dict, cfg: LMConfig) -> float:
    """One optimiser step; a non-finite loss or gradient skips it and keeps the weights."""
    opt.zero_grad(set_to_none=True)
    grad_norm = float("nan")
    if "nonfinite" not in stats and math.isfinite(float(loss)):
        loss.backward()
        grad_norm = float(torch.nn.utils.clip_grad_norm_(
            policy.trainable_parameters(), cfg.max_grad_norm or float("inf")))
    if math.isfinite(grad_norm):
        opt.step()
        sched.step()
    else:
        opt.zero_grad(set_to_none=True)
    return grad_norm


def _first_minibatch_stats(out: dict, roll: Rollout, idx: torch.Tensor) -> dict:
    """Entropy, and the log-prob gap between sampler and trainer (a silent-bug detector)."""
    m = roll.mask[idx]
    n = m.sum().clamp(min=1)
    stats = {"entropy": (out["entropy"] * m).sum() / n}
    if roll.rollout_logp is not None:
        stats["logp_gap_rollout_trainer"] = ((out["logp"].detach() - roll.rollout_logp[idx]).abs() * m).sum() / n
    return stats


def _denom(mask: torch.Tensor, cfg: LMConfig) -> float:
    """The normaliser of this optimiser step (the whole minibatch, all its tokens)."""
    if cfg.agg == "token_mean":
        return float(mask.sum().clamp(min=1))
    if cfg.agg == "seq_mean":
        return float(mask.shape[0])
    return float(mask.shape[0] * cfg.max_new_tokens)  # constant: Dr. GRPO's B * max_len


def _pick(t, idx):
    return None if t is None else t[idx]


def _frac_equal_groups(rewards: torch.Tensor, g: int) -> float:
    groups = rewards.reshape(-1, g)
    return float((groups.max(1).values == groups.min(1).values).float().mean())


def save(run: Run, policy: LMPolicy, opt, sched, counters: dict) -> None:
    """The adapter for users (``adapter/``) and a resumable checkpoint (``checkpoint/``)."""
    run.save_atomic("adapter", policy.save_adapter)
    save_checkpoint(run, lambda d: policy.save_adapter(d / "adapter"), opt, sched, counters)


def summary(run: Run, policy: LMPolicy, seconds: float) -> dict:
    hist = run.history
    last = hist[-5:]
    out = {"run_dir": str(run.dir), "steps": len(hist), "train_time_s": round(seconds, 1),
           "reward_first": hist[0]["reward"] if hist else None,
           "reward_last5": sum(r["reward"] for r in last) / len(last) if last else None,
           "kl_last": hist[-1].get("kl") if hist else None, "adapter_norm": round(policy.adapter_norm(), 4)}
    if hist and out["adapter_norm"] == 0.0:
        out["warning"] = "the LoRA adapter did not move: check lr and the reward signal"
    return out


def seed_everything(seed: int, threads: int = 0) -> None:
    random.seed(seed)
    torch.manual_seed(seed)
    if threads:
        torch.set_num_threads(threads)
