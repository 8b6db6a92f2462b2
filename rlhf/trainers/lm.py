"""Token-level RL for language models: collect -> score -> advantages -> update -> log.

GRPO, RLOO and REINFORCE are settings of this one loop (the advantage estimator and the
objective), not three copies of it. Shapes: N = prompts_per_step * group_size rows, C
completion tokens; ``logp, old_logp, ref_logp, mask : [N, C]``, ``rewards, adv : [N]``.
"""
from __future__ import annotations

import hashlib
import itertools
import math
import random
import time

import torch
from tqdm.auto import tqdm

from rlhf.checkpoint import NAME, load_checkpoint, restore, save_checkpoint
from rlhf.config import LMConfig
from rlhf.core import (
    adaptive_kl_coef,
    aggregate,
    gae,
    group_normalize,
    kl_estimate,
    leave_one_out,
    policy_loss,
    value_loss,
    whiten,
)
from rlhf.distributed import Dist
from rlhf.errors import UserError
from rlhf.lm.models import resolve_model
from rlhf.lm.policy import LMPolicy, Rollout, length_buckets
from rlhf.lm.share import adapter_writer
from rlhf.rewards import load_rewards, score
from rlhf.run import Run
from rlhf.tasks import make_task


def train(cfg: LMConfig, run: Run, progress: bool = True, resume: bool = False) -> dict:
    dist = Dist()
    if (cfg.prompts_per_step // dist.world) % cfg.minibatches or cfg.prompts_per_step % dist.world:
        raise UserError(f"prompts_per_step={cfg.prompts_per_step} must split into {dist.world} processes x "
                        f"{cfg.minibatches} minibatches of whole groups; make it a multiple of "
                        f"{dist.world * cfg.minibatches}")
    seed_everything(cfg.seed, cfg.threads)
    task = make_task(cfg.task, cfg.seed, cfg.steps * cfg.prompts_per_step, cfg.eval_task)
    reward_fns = load_rewards(cfg.rewards, cfg.reward_timeout_s, cfg.reward_workers)
    ckpt, state = load_checkpoint(run.dir) if resume else (None, None)
    policy = LMPolicy(resolve_model(cfg.model, revision=cfg.revision), lora_r=cfg.lora_r, lora_alpha=cfg.lora_alpha,
                      lora_dropout=cfg.lora_dropout, lora_targets=cfg.lora_targets, dtype=cfg.dtype,
                      temperature=cfg.temperature, adapter_path=ckpt and str(ckpt / "adapter"),
                      value_head=cfg.algo == "ppo", critic=cfg.critic,
                      gradient_checkpointing=cfg.gradient_checkpointing)
    opt = torch.optim.AdamW(policy.trainable_parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    opt = policy.distribute(dist, opt, cfg.max_grad_norm)  # device; DDP, FSDP2 or DeepSpeed under accelerate
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / (cfg.warmup_steps + 1)))
    counters = {"step": 0, "baseline": None, "bad_steps": 0, "penalty_coef": cfg.penalty_coef}
    if state is not None:
        counters = {**counters, **restore(state, opt, sched, lambda sd: dist.load_optimizer_state(
            policy.train_net, opt, sd, ckpt))}
        run.truncate_history(counters["step"])  # steps logged after the checkpoint are redone
    baseline = Baseline(value=counters["baseline"])
    rows_iter = itertools.islice(task.train_rows(), counters["step"] * cfg.prompts_per_step, None)
    t_start = time.time()
    bar = tqdm(range(counters["step"], cfg.steps), desc=cfg.algo, disable=not progress or not dist.is_main,
               dynamic_ncols=True, initial=counters["step"], total=cfg.steps)
    per_rank = cfg.prompts_per_step // dist.world
    try:
        for step in bar:
            t0 = time.time()
            rows = [next(rows_iter) for _ in range(cfg.prompts_per_step)]  # the global batch
            first = step * cfg.prompts_per_step + dist.rank * per_rank     # this rank's share
            uniforms = sampling_uniforms(cfg.seed, range(first, first + per_rank), cfg.group_size,
                                         cfg.max_new_tokens)
            with dist.autocast():
                roll, prompts, completions, columns = collect(policy, dist.shard(rows), cfg,  # collect
                                                              uniforms=uniforms)
            t1 = time.time()
            local_rewards, reward_means = score(reward_fns, prompts, completions, columns)  # score
            rewards = dist.gather(local_rewards.to(policy.device))  # every rank's, in rank order
            t2 = time.time()
            with dist.autocast():
                ctx = rollout_pass(policy, roll, cfg)                # ref / old log-probs, values
            adv, ret = advantages(rewards, roll, ctx, cfg, baseline, dist)           # advantages
            beta = counters["penalty_coef"]
            stats = {**update(policy, opt, sched, roll, adv, ret, ctx, cfg, dist, beta),  # update
                     "time/ref_s": ctx.pop("time_s")}
            if cfg.objective == "adaptive_kl":  # the PPO paper's controller, once per rollout
                stats["penalty_coef"] = beta
                beta = adaptive_kl_coef(beta, stats["approx_kl"], cfg.target_kl)
            counters = {"step": step + 1, "baseline": baseline.value, "penalty_coef": beta,
                        "bad_steps": counters["bad_steps"] + 1 if stats["skipped"] else 0}
            loss_part = stats.pop("loss_part")
            row = metrics_row(step + 1, rewards, reward_means, roll, {**stats, **ctx.get("stats", {})},
                              cfg, lr=sched.get_last_lr()[0], times=(t0, t1, t2, time.time()), dist=dist)
            if dist.world > 1:
                row["dist/param_share"] = round(dist.param_share(policy.net), 4)  # of the weights, on this rank
            if dist.world > 1 and dist.replicated:  # DDP keeps the ranks' weights equal; show that it did
                row["dist/param_max_diff"] = dist.param_max_diff(policy.trainable_parameters())
            if cfg.debug_tensors:
                dump_tensors(run, step + 1, dist, rewards=rewards, adv=adv, local_rewards=local_rewards,
                             loss_part=torch.tensor(loss_part))
            run.log(row)                                                             # log
            bar.set_postfix(reward=f"{row['reward']:.2f}", kl=f"{row.get('kl', 0.0):.3f}",
                            len=f"{row['completion_len']:.1f}")
            if counters["bad_steps"] >= cfg.max_nonfinite_steps:
                save(run, policy, opt, sched, counters, dist)
                raise UserError(f"the loss was not finite for {counters['bad_steps']} steps in a row (up to "
                                f"step {step + 1}); lower lr or max_grad_norm; the last good adapter is in "
                                f"{run.dir}/adapter")
            if cfg.save_every and (step + 1) % cfg.save_every == 0:
                save(run, policy, opt, sched, counters, dist)
    except KeyboardInterrupt:  # mid-step: keep the adapter; the last checkpoint stays consistent
        if dist.is_main and dist.replicated:  # (sharded weights would need every rank, which may be gone)
            run.save_atomic("adapter", adapter_writer(policy, run))
        raise
    full = save(run, policy, opt, sched, counters, dist)
    if dist.is_main:
        run.plot("reward")
    return summary(run, policy, time.time() - t_start, full)


def sampling_uniforms(seed: int, prompt_ids, group_size: int, max_new_tokens: int) -> torch.Tensor:
    """The random numbers of every draw, [len(prompt_ids) * group_size, max_new_tokens], from a
    generator per prompt keyed by (seed, the prompt's position in the run). A completion thus
    does not depend on which process sampled it or on what else shared its batch: one process
    and several give the same samples (up to float rounding of the logits)."""
    parts = []
    for j in prompt_ids:
        key = hashlib.blake2b(f"{seed}/{j}".encode(), digest_size=8).digest()
        gen = torch.Generator().manual_seed(int.from_bytes(key, "little") & (2**63 - 1))
        parts.append(torch.rand(group_size, max_new_tokens, dtype=torch.float64, generator=gen))
    return torch.cat(parts)


def collect(policy: LMPolicy, rows: list[dict], cfg: LMConfig, greedy: bool = False, adapter: bool = True,
            uniforms: torch.Tensor | None = None):
    """Sample group_size completions per prompt (greedy: one argmax completion); return the
    rollout and what reward functions take: prompts, completions and dataset columns, one per row."""
    g = 1 if greedy else cfg.group_size
    prompts = [r["prompt"] for r in rows]
    ids, attn = policy.encode_prompts(prompts)
    roll = policy.generate(ids, attn, g, cfg.max_new_tokens, greedy=greedy, adapter=adapter, uniforms=uniforms)
    texts = policy.decode(roll.completion_ids, roll.mask)
    conversational = not isinstance(prompts[0], str)
    completions = [[{"role": "assistant", "content": t}] for t in texts] if conversational else texts
    columns = {k: [r[k] for r in rows for _ in range(g)] for k in rows[0] if k != "prompt"}
    return roll, [p for p in prompts for _ in range(g)], completions, columns


def metrics_row(step: int, rewards, reward_means: dict, roll: Rollout, stats: dict, cfg: LMConfig,
                lr: float, times: tuple[float, float, float, float], dist: Dist) -> dict:
    """One line of metrics.jsonl, over all ranks. ``rewards``: every rank's; ``roll``, ``stats``
    and ``reward_means``: this rank's (reduced here). ``times``: start, after sampling, after
    scoring, end."""
    t0, t1, t2, t3 = times
    return {"step": step, "reward": rewards.mean(), "reward_std": rewards.std(),
            **{f"rewards/{k}": dist.mean(v) for k, v in reward_means.items()},
            "frac_groups_all_equal": _frac_equal_groups(rewards, cfg.group_size),
            "completion_len": dist.mean(float(roll.mask.sum(1).mean())),
            "truncated": dist.mean(float(roll.truncated.float().mean())),
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


def advantages(rewards: torch.Tensor, roll: Rollout, ctx: dict, cfg: LMConfig, baseline: Baseline,
               dist: Dist | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Advantages of this rank's rows: one per completion [N] (grpo, rloo, reinforce) or per
    token [N, C] (ppo, with the value targets ``ret``). ``rewards`` holds every rank's rows
    (rank order), so batch statistics are the whole batch's. KL placed in the reward is
    subtracted here."""
    dist = dist or _ONE
    kl = None
    if cfg.kl_placement == "reward" and ctx["ref_logp"] is not None:
        logp = ctx["old_logp"] if ctx["old_logp"] is not None else roll.rollout_logp
        kl = kl_estimate(logp, ctx["ref_logp"], cfg.kl_estimator) * roll.mask     # [N, C]
    if cfg.algo == "ppo":
        last = (roll.mask.sum(1).long() - 1).clamp(min=0)
        token_rewards = torch.zeros_like(roll.mask)
        token_rewards[torch.arange(len(roll)), last] = dist.local(rewards)  # sequence reward on its last token
        if kl is not None:
            token_rewards = token_rewards - cfg.beta * kl
        adv, ret = gae(token_rewards, ctx["old_values"], cfg.gamma, cfg.lam, mask=roll.mask)
        if cfg.whiten_advantages:
            adv = whiten(adv, roll.mask, reduce=dist.sum)
        ctx["stats"] = {"explained_variance": explained_variance(ctx["old_values"], ret, roll.mask, dist.sum)}
        return adv, ret
    if kl is not None:
        rewards = rewards - cfg.beta * dist.gather(kl.sum(1))
    if cfg.algo == "grpo":
        adv = group_normalize(rewards, cfg.group_size, cfg.scale_rewards)
    elif cfg.algo == "rloo":
        adv = leave_one_out(rewards, cfg.group_size)
    else:
        adv = rewards - baseline(rewards)  # reinforce
    return dist.local(adv), None


def explained_variance(values: torch.Tensor, ret: torch.Tensor, mask: torch.Tensor, reduce=None) -> float:
    """1 - Var(ret - V) / Var(ret) over masked tokens: 1 is a perfect critic, <= 0 a useless one.
    ``reduce`` sums over processes (population variances, from sums of x and x^2)."""
    reduce = reduce or (lambda x: x)
    m = mask.to(torch.float64)
    n = reduce(m.sum())

    def var(x):
        x = x.to(torch.float64)
        mean = reduce((x * m).sum()) / n
        return reduce((x * x * m).sum()) / n - mean ** 2

    v = var(ret)
    return float(1 - var(ret - values) / v) if n > 1 and v > 0 else float("nan")


# statistics aggregated with the step's global normaliser: their sum over ranks is the whole
# batch's value; the others are per-rank means, averaged over ranks
SUMMED_STATS = ("loss", "pg_loss", "kl", "vf_loss")


def update(policy: LMPolicy, opt, sched, roll: Rollout, adv: torch.Tensor, ret: torch.Tensor | None,
           ctx: dict, cfg: LMConfig, dist: Dist | None = None, penalty_coef: float | None = None) -> dict:
    """``epochs`` passes over the rollout in ``minibatches`` optimiser steps each. With several
    processes each rank's minibatch is its share of the global one; the loss is normalised by
    the global minibatch's tokens (or sequences) and scaled by the number of processes, so
    DDP's gradient average equals the one-process gradient of the global minibatch."""
    dist = dist or _ONE
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
            denom = dist.sum(_denom(mb_mask, cfg))
            with dist.autocast():
                out = policy.forward(roll.select_groups(groups), values=ret is not None, entropy=first)
            objective, coef = _objective(cfg, penalty_coef)
            old_logp = _pick(ctx["old_logp"], idx)
            if objective == "kl_penalty" and old_logp is None:  # one on-policy step: ratio 1
                old_logp = out["logp"].detach()
            loss, stats = policy_loss(
                out["logp"], adv[idx], mb_mask, old_logp=old_logp,
                ref_logp=_pick(ctx["ref_logp"], idx), objective=objective, kl_penalty_coef=coef,
                clip_low=cfg.clip_low, clip_high=cfg.clip_high,
                kl_coef=cfg.beta if cfg.kl_placement == "loss" else 0.0,
                kl_estimator=cfg.kl_estimator, agg=cfg.agg, denom=denom)
            if ret is not None:  # ppo: the critic's loss on the same tokens and normaliser
                vf = value_loss(out["values"], ret[idx], ctx["old_values"][idx], cfg.value_clip)
                stats["vf_loss"] = aggregate(vf, mb_mask, cfg.agg, denom)
                loss = loss + cfg.vf_coef * stats["vf_loss"]
                stats["vf_loss"] = stats["vf_loss"].detach()
            if first:
                stats.update(_first_minibatch_stats(out, roll, idx))
            grad_norm = _step(policy, opt, sched, loss, stats, cfg, dist)
            skipped += not math.isfinite(grad_norm)
            for key, v in {**stats, "loss": loss.detach(), "grad_norm": grad_norm}.items():
                sums[key] = sums.get(key, 0.0) + float(v)
            if first:
                sums["loss_part"] = float(loss.detach())  # this rank's share of the first loss
    steps = cfg.epochs * cfg.minibatches
    out = {key: v / steps if key != "loss_part" else v for key, v in sums.items() if key != "nonfinite"}
    out = {key: (dist.sum(v) if key in SUMMED_STATS else  # grad_norm: already the same on every rank
                 v if key in ("grad_norm", "loss_part") else dist.mean(v)) for key, v in out.items()}
    out["skipped"] = skipped
    # tokens one policy forward runs: each prompt once, each length bucket of completions
    out["tokens/train"] = dist.sum(float(roll.prompt_ids.numel()
                                         + sum(len(r) * w for r, w in length_buckets(roll.mask))))
    return out


def _step(policy: LMPolicy, opt, sched, loss: torch.Tensor, stats: dict, cfg: LMConfig,
          dist: Dist | None = None) -> float:
    """One optimiser step; a non-finite loss or gradient (on any rank) skips it on every rank
    and keeps the weights. ``loss`` is this rank's share of the global loss."""
    dist = dist or _ONE
    opt.zero_grad(set_to_none=True)
    grad_norm = float("nan")
    bad = dist.max(float("nonfinite" in stats or not math.isfinite(float(loss.detach()))))
    if not bad:  # (DeepSpeed's engine steps inside backward and clips at max_grad_norm itself)
        dist.backward(loss * dist.world)  # DDP, FSDP, ZeRO average gradients over ranks; undo the 1/world
        grad_norm = dist.clip_grad_norm(policy.trainable_parameters(), cfg.max_grad_norm)
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


def _objective(cfg: LMConfig, penalty_coef: float | None) -> tuple[str, float]:
    """The core objective and its KL-penalty coefficient for the recipe's settings."""
    if cfg.algo == "reinforce":
        return "reinforce", 0.0
    if cfg.objective == "clip":
        return "clip", 0.0
    if cfg.objective == "none":  # the importance-sampled surrogate without clip or penalty
        return "kl_penalty", 0.0
    return "kl_penalty", cfg.penalty_coef if penalty_coef is None else penalty_coef


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


def save(run: Run, policy: LMPolicy, opt, sched, counters: dict, dist: Dist) -> dict | None:
    """The adapter for users (``adapter/``) and a resumable checkpoint (``checkpoint/``),
    written by the main process; sharded weights are gathered whole first (every rank takes
    part), and are returned."""
    full = None if dist.replicated else policy.full_trainable(dist)
    opt_state = dist.optimizer_state(policy.train_net, opt)
    shards = dist.save_shards(run.tmp_path(NAME))  # DeepSpeed: each rank's partition, into the new checkpoint
    if dist.is_main:
        run.save_atomic("adapter", adapter_writer(policy, run, full))
        save_checkpoint(run, lambda d: policy.save_adapter(d / "adapter", full), opt, sched, counters,
                        optimizer_state=opt_state, fresh=not shards)
    dist.barrier()
    return full


def dump_tensors(run: Run, step: int, dist: Dist, **tensors) -> None:
    """``debug_tensors``: this rank's tensors of one step, as RUN_DIR/debug/step{N}_rank{R}.safetensors."""
    from safetensors.torch import save_file

    out = run.dir / "debug"
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().float().cpu().clone() for k, v in tensors.items()},
              str(out / f"step{step:04d}_rank{dist.rank}.safetensors"))


class _OneProcess:
    """``Dist`` for code called outside a run (tests, evaluation): one process, no collectives."""

    world, rank, is_main, replicated = 1, 0, True, True

    def sum(self, x):
        return x

    mean = max = gather = local = sum

    def backward(self, loss):
        loss.backward()

    def clip_grad_norm(self, params, max_norm):
        return float(torch.nn.utils.clip_grad_norm_(params, max_norm or float("inf")))


_ONE = _OneProcess()


def summary(run: Run, policy: LMPolicy, seconds: float, full: dict | None = None) -> dict:
    hist = run.history
    last = hist[-5:]
    out = {"run_dir": str(run.dir), "steps": len(hist), "train_time_s": round(seconds, 1),
           "reward_first": hist[0]["reward"] if hist else None,
           "reward_last5": sum(r["reward"] for r in last) / len(last) if last else None,
           "kl_last": hist[-1].get("kl") if hist else None, "adapter_norm": round(policy.adapter_norm(full), 4)}
    if hist and out["adapter_norm"] == 0.0:
        out["warning"] = "the LoRA adapter did not move: check lr and the reward signal"
    return out


def seed_everything(seed: int, threads: int = 0) -> None:
    random.seed(seed)
    torch.manual_seed(seed)
    if threads:
        torch.set_num_threads(threads)
