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
from rlhf.core import group_normalize, leave_one_out, policy_loss
from rlhf.errors import UserError
from rlhf.lm.models import resolve_model
from rlhf.lm.policy import LMPolicy, Rollout
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
                      temperature=cfg.temperature, adapter_path=ckpt and str(ckpt / "adapter"))
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
            adv = advantages(rewards, cfg, baseline)                                 # advantages
            t2 = time.time()
            stats = update(policy, opt, sched, roll, adv, cfg)                       # update
            counters = {"step": step + 1, "baseline": baseline.value,
                        "bad_steps": counters["bad_steps"] + 1 if stats["skipped"] else 0}
            row = {"step": step + 1, "reward": rewards.mean(), "reward_std": rewards.std(),
                   **{f"rewards/{k}": v for k, v in reward_means.items()},
                   "frac_groups_all_equal": _frac_equal_groups(rewards, cfg.group_size),
                   "completion_len": roll.mask.sum(1).mean(), "truncated": roll.truncated.float().mean(),
                   **stats, "lr": sched.get_last_lr()[0], "time/generate_s": t1 - t0,
                   "time/score_s": t2 - t1, "time/update_s": time.time() - t2, "time/step_s": time.time() - t0}
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
    except KeyboardInterrupt:
        save(run, policy, opt, sched, counters)
        raise
    save(run, policy, opt, sched, counters)
    run.plot("reward")
    return summary(run, policy, time.time() - t_start)


def collect(policy: LMPolicy, rows: list[dict], cfg: LMConfig):
    """Sample group_size completions per prompt; repeat the dataset columns to match."""
    prompts = [r["prompt"] for r in rows]
    ids, attn = policy.encode_prompts(prompts)
    roll = policy.generate(ids, attn, cfg.group_size, cfg.max_new_tokens)
    texts = policy.decode(roll.completion_ids, roll.mask)
    g = cfg.group_size
    conversational = not isinstance(prompts[0], str)
    completions = [[{"role": "assistant", "content": t}] for t in texts] if conversational else texts
    columns = {k: [r[k] for r in rows for _ in range(g)] for k in rows[0] if k != "prompt"}
    return roll, [p for p in prompts for _ in range(g)], completions, columns


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


def advantages(rewards: torch.Tensor, cfg: LMConfig, baseline: Baseline) -> torch.Tensor:
    """One advantage per completion, [N]."""
    if cfg.algo == "grpo":
        return group_normalize(rewards, cfg.group_size, cfg.scale_rewards)
    if cfg.algo == "rloo":
        return leave_one_out(rewards, cfg.group_size)
    return rewards - baseline(rewards)  # reinforce


def update(policy: LMPolicy, opt, sched, roll: Rollout, adv: torch.Tensor, cfg: LMConfig) -> dict:
    """``epochs`` passes over the rollout in ``minibatches`` optimiser steps each."""
    mask = roll.mask * (~roll.truncated)[:, None] if cfg.mask_truncated else roll.mask
    t_ref = time.time()
    with torch.no_grad():
        ref_logp = policy.logp(roll, adapter=False) if cfg.beta else None
        # off-policy after the first optimiser step: ratios need the rollout policy's log-probs
        old_logp = policy.logp(roll) if cfg.epochs * cfg.minibatches > 1 else None
    t_ref = time.time() - t_ref
    n_groups = roll.prompt_ids.shape[0]
    size = n_groups // cfg.minibatches  # minibatches hold whole groups: shared prompt, shared baseline
    sums: dict[str, float] = {}
    skipped = 0
    for epoch in range(cfg.epochs):
        perm = torch.randperm(n_groups) if cfg.minibatches > 1 else torch.arange(n_groups)
        for k in range(cfg.minibatches):
            groups = perm[k * size:(k + 1) * size]
            idx = roll.rows_of(groups)
            mb_mask = mask[idx]
            logp = policy.logp(roll.select_groups(groups))
            loss, stats = policy_loss(
                logp, adv[idx], mb_mask, old_logp=_pick(old_logp, idx), ref_logp=_pick(ref_logp, idx),
                objective="reinforce" if cfg.algo == "reinforce" else "clip",
                clip_low=cfg.clip_low, clip_high=cfg.clip_high, kl_coef=cfg.beta,
                kl_estimator=cfg.kl_estimator, agg=cfg.agg, denom=_denom(mb_mask, cfg))
            if epoch == 0 and k == 0 and roll.rollout_logp is not None:
                gap = (logp.detach() - roll.rollout_logp[idx]).abs() * roll.mask[idx]
                stats["logp_gap_rollout_trainer"] = gap.sum() / roll.mask[idx].sum().clamp(min=1)
            opt.zero_grad(set_to_none=True)
            grad_norm = float("nan")
            if "nonfinite" not in stats:
                loss.backward()
                grad_norm = float(torch.nn.utils.clip_grad_norm_(
                    policy.trainable_parameters(), cfg.max_grad_norm or float("inf")))
            if math.isfinite(grad_norm):
                opt.step()
                sched.step()
            else:  # a non-finite loss or gradient: skip this optimiser step, keep the weights
                opt.zero_grad(set_to_none=True)
                skipped += 1
            for key, v in {**stats, "loss": loss.detach(), "grad_norm": grad_norm}.items():
                sums[key] = sums.get(key, 0.0) + float(v)
    steps = cfg.epochs * cfg.minibatches
    out = {key: v / steps for key, v in sums.items() if key != "nonfinite"}
    out["skipped"] = skipped
    out["time/ref_s"] = t_ref  # reference (and old-policy) log-prob passes
    # tokens one policy forward runs: each prompt once, completions on top of its cache
    out["tokens/train"] = roll.prompt_ids.numel() + roll.completion_ids.numel()
    return out


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
