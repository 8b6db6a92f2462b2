"""Token-level RL for language models: collect -> score -> advantages -> update -> log.

GRPO, RLOO, REINFORCE and PPO are settings of this one loop (the advantage estimator and the
objective), not copies of it. Shapes: N = prompts_per_step * group_size rows, C completion
tokens; ``logp, old_logp, ref_logp, mask : [N, C]``, ``rewards, adv : [N]`` (ppo: ``[N, C]``).
The plumbing lives with its owner: processes in ``rlhf/distributed.py``, saves, resume, Ctrl-C
and stopping on a diverged loss in ``rlhf/checkpoint.py``, sampling in ``rlhf/lm/rollout.py``.
"""
from __future__ import annotations

import itertools
import math
import time
from dataclasses import asdict, dataclass

import torch
from tqdm.auto import tqdm

from rlhf.checkpoint import LMSaver, load_lm_checkpoint
from rlhf.config import LMConfig
from rlhf.core import (
    ADV_ESTIMATORS,
    AdvInput,
    adaptive_kl_coef,
    aggregate,
    explained_variance,
    kl_estimate,
    policy_loss,
    value_loss,
    whiten,
)
from rlhf.distributed import ONE_PROCESS, Dist
from rlhf.lm.models import resolve_model
from rlhf.lm.forward import length_buckets
from rlhf.lm.policy import LMPolicy
from rlhf.lm.rollout import RolloutPass, kl_after_update, kl_terms, rollout_pass, sampling_uniforms
from rlhf.lm.rollout_record import Rollout, completion_id_lists
from rlhf.lm.share import adapter_writer
from rlhf.rewards import TrainerState, load_rewards, score
from rlhf.run import Run
from rlhf.seeding import seed_everything
from rlhf.trainers.lm_sources import completion_budget, draws_per_row, policy_class, rollout_source, train_rows
from rlhf.tracking import Tracking, accelerator_kwargs


def train(cfg: LMConfig, run: Run, progress: bool = True, resume: bool = False) -> dict:
    dist = Dist(trackers=accelerator_kwargs(cfg, run.dir))
    track = Tracking(cfg, run, dist.acc, progress)  # trackers, completions.jsonl, report.html
    dist.check_split(cfg.prompts_per_step, cfg.minibatches)
    seed_everything(cfg.seed, cfg.threads)
    reward_fns = load_rewards(cfg.rewards, cfg.reward_timeout_s, cfg.reward_workers)
    ckpt, saved = load_lm_checkpoint(run.dir, dist) if resume else (None, None)
    policy, opt, sched = build(cfg, dist, ckpt)
    saver = LMSaver(run, policy, opt, sched, dist, lambda d, full=None: adapter_writer(policy, run, full)(d))
    state = LoopState(penalty_coef=cfg.penalty_coef)
    if saved is not None:
        state = LoopState(**{**asdict(state), **saver.resume(ckpt, saved)})
    baseline = Baseline(value=state.baseline)
    prompts_iter = itertools.islice(train_rows(cfg), state.step * cfg.prompts_per_step, None)
    source = rollout_source(policy, cfg)  # the task's prompts through the sampler, or episodes in an env
    t_start = time.time()
    bar = tqdm(range(state.step, cfg.steps), desc=cfg.algo, disable=not progress or not dist.is_main,
               dynamic_ncols=True, initial=state.step, total=cfg.steps)
    with saver.adapter_kept_on_interrupt():
        for step in bar:
            t0 = time.time()
            rows = [next(prompts_iter) for _ in range(cfg.prompts_per_step)]  # the global batch
            with dist.autocast():                                                   # collect
                roll = source(dist.shard(rows), uniforms=rank_uniforms(cfg, step, dist))
            prompts, completions, columns = (roll.reward_inputs.prompts, roll.reward_inputs.completions,
                                             roll.reward_inputs.columns)
            t1 = time.time()
            reward_values: dict = {}
            local_rewards, reward_means, local_scored = score(                       # score
                reward_fns, prompts, completions, columns, completion_id_lists(roll), TrainerState(step, cfg.steps),
                values_out=reward_values)
            rewards = dist.gather(local_rewards.to(policy.device))  # every rank's, in rank order
            scored = dist.gather(local_scored.to(policy.device, torch.float32)) > 0
            t2 = time.time()
            with dist.autocast():
                passes = rollout_pass(policy, roll, cfg)             # ref / old log-probs, values
            adv, ret, adv_stats = advantages(rewards, roll, passes, cfg, baseline, dist, scored)  # advantages
            stats, loss_part = update(policy, opt, sched, roll, adv, ret, passes, cfg, dist,  # update
                                      state.penalty_coef)
            stats["time/ref_s"] = passes.seconds
            if "kl_after_update" in stats:  # adaptive_kl (``update`` decides): the coefficient this update used
                stats["penalty_coef"] = state.penalty_coef
            state = state.after(stats, baseline.value, cfg)
            row = metrics_row(step + 1, rewards, reward_means, roll, {**stats, **adv_stats}, cfg,  # log
                              lr=sched.get_last_lr()[0], times=(t0, t1, t2, time.time()), dist=dist)
            row.update(dist.step_stats(policy.net, policy.trainable_parameters()))
            if cfg.max_prompt_length:  # prompts cut to their last max_prompt_length tokens, so far
                row["prompts_truncated"] = dist.sum(policy.prompts_truncated)
            if cfg.debug_tensors:
                run.dump_tensors(step + 1, dist.rank, rewards=rewards, adv=adv, local_rewards=local_rewards,
                                 loss_part=torch.tensor(loss_part))
            run.log(row)
            track.completions(step + 1, prompts, completions, local_rewards, reward_values, adv, roll)
            bar.set_postfix(reward=f"{row['reward']:.2f}", kl=f"{row.get('kl', 0.0):.3f}",
                            len=f"{row['completion_len']:.1f}")
            saver.after_step(asdict(state), cfg.save_every, cfg.max_nonfinite_steps)
    full = saver.final(asdict(state))
    if dist.is_main:
        run.plot("reward")
    return track.finish(summary(run, policy, time.time() - t_start, full))


def build(cfg: LMConfig, dist: Dist, ckpt=None) -> tuple[LMPolicy, torch.optim.Optimizer, object]:
    """The policy (with a checkpoint's adapter when resuming), its optimiser placed for the
    processes (DDP, FSDP2 or DeepSpeed under accelerate) and the warm-up LR schedule."""
    policy = policy_class(cfg, LMPolicy)(
        resolve_model(cfg.model, revision=cfg.revision), lora_r=cfg.lora_r, lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora_dropout, lora_targets=cfg.lora_targets, dtype=cfg.dtype, temperature=cfg.temperature,
        adapter_path=ckpt and str(ckpt / "adapter"), value_head=cfg.algo == "ppo", critic=cfg.critic,
        gradient_checkpointing=cfg.gradient_checkpointing, disable_dropout=cfg.disable_dropout, device=dist.device)
    policy.set_options(top_k=cfg.top_k, top_p=cfg.top_p, min_p=cfg.min_p, stop=cfg.stop, max_prompt_length=
                       cfg.max_prompt_length, chat_template_kwargs=cfg.chat_template_kwargs, decode=cfg.decode)
    opt = torch.optim.AdamW(policy.trainable_parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    opt = policy.distribute(dist, opt, cfg.max_grad_norm)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / (cfg.warmup_steps + 1)))
    return policy, opt, sched


@dataclass
class LoopState:
    """What one step hands the next, and what a checkpoint keeps to resume: the number of
    steps done, REINFORCE's moving baseline, the KL-penalty coefficient (``adaptive_kl`` moves
    it) and how many steps in a row skipped their update for a non-finite loss."""

    step: int = 0
    baseline: float | None = None
    bad_steps: int = 0
    penalty_coef: float = 1.0

    def after(self, stats: dict, baseline: float | None, cfg: LMConfig) -> LoopState:
        coef = self.penalty_coef
        if "kl_after_update" in stats:  # adaptive_kl: the PPO paper's controller, once per rollout
            coef = adaptive_kl_coef(coef, stats["kl_after_update"], cfg.target_kl)
        return LoopState(step=self.step + 1, baseline=baseline, penalty_coef=coef,
                         bad_steps=self.bad_steps + 1 if stats["skipped"] else 0)


def rank_uniforms(cfg: LMConfig, step: int, dist: Dist) -> torch.Tensor:
    """The sampling noise of this rank's prompts of ``step`` (keyed by each prompt's position in the run)."""
    per_rank = cfg.prompts_per_step // dist.world
    first = step * cfg.prompts_per_step + dist.rank * per_rank
    return sampling_uniforms(cfg.seed, range(first, first + per_rank), cfg.group_size, draws_per_row(cfg))


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

    def __call__(self, rewards: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
        """The baseline for ``rewards`` [N], then the update with their mean over ``valid`` rows
        (all by default); a batch with no valid row leaves the baseline as it was."""
        if valid is not None:
            if not valid.any():
                return torch.tensor(0.0 if self.value is None else self.value)
            rewards = rewards[valid]
        mean = float(rewards.mean())
        b = mean if self.value is None else self.value
        self.value = mean if self.value is None else self.decay * b + (1 - self.decay) * mean
        return torch.tensor(b)


def advantages(rewards: torch.Tensor, roll: Rollout, passes: RolloutPass, cfg: LMConfig, baseline: Baseline,
               dist: Dist | None = None, scored: torch.Tensor | None = None
               ) -> tuple[torch.Tensor, torch.Tensor | None, dict]:
    """Advantages of this rank's rows from the recipe's ``adv_estimator`` (``rlhf.core``'s
    registry): one per completion [N] (grpo, rloo, reinforce) or per token [N, C] (gae, with the
    value targets ``ret``), and their stats (with ``ret``: the critic's explained variance).
    ``rewards`` and ``scored`` hold every rank's rows (rank order), so batch statistics are the
    whole batch's. KL placed in the reward is handed to the estimator, which subtracts it.
    ``scored`` [N] bool (default all True): a row no reward function scored has no reward, so its
    advantage is 0 and it stays out of every statistic (group mean/std, leave-one-out, the
    REINFORCE baseline, PPO's whitening; PPO's value target there is the critic's own rollout
    value: no regression signal). Its tokens stay in the loss and its normaliser, as in TRL: a
    row with advantage 0, like a group whose rewards are all equal, still carries the KL term."""
    dist = dist or ONE_PROCESS
    valid = None if scored is None or bool(scored.all()) else scored.bool()
    x = AdvInput(rewards, mask=roll.mask, values=passes.old_values, valid=valid, group_size=cfg.group_size,
                 gamma=cfg.gamma, gae_lambda=cfg.gae_lambda, scale_rewards=cfg.scale_rewards, baseline=baseline,
                 local=dist.local, gather=dist.gather, reduce=dist.sum)
    kl = kl_terms(cfg)
    if kl.reward_coef and passes.ref_logp is not None:
        logp = passes.old_logp if passes.old_logp is not None else roll.rollout_logp
        x.kl, x.kl_coef = kl_estimate(logp, passes.ref_logp, kl.estimator) * roll.mask, kl.reward_coef  # [N, C]
    adv, ret = ADV_ESTIMATORS.get(cfg.adv_estimator)(x)
    if ret is None:
        return adv, None, {}
    keep = roll.mask if valid is None else roll.mask * dist.local(valid)[:, None].to(roll.mask.dtype)
    if cfg.norm_adv:
        adv = whiten(adv, keep, reduce=dist.sum)
    return adv, ret, {"explained_variance": explained_variance(passes.old_values, ret, keep, dist.sum)}


# statistics aggregated with the step's global normaliser: their sum over ranks is the whole
# batch's value; the others are per-rank means, averaged over ranks
SUMMED_STATS = ("loss", "pg_loss", "kl", "vf_loss")


def update(policy: LMPolicy, opt, sched, roll: Rollout, adv: torch.Tensor, ret: torch.Tensor | None,
           passes: RolloutPass, cfg: LMConfig, dist: Dist | None = None, penalty_coef: float | None = None
           ) -> tuple[dict, float]:
    """``epochs`` passes over the rollout in ``minibatches`` optimiser steps each. With several
    processes each rank's minibatch is its share of the global one; the loss is normalised by
    the global minibatch's tokens (or sequences) and scaled by the number of processes, so
    DDP's gradient average equals the one-process gradient of the global minibatch. Returns
    the step's stats and this rank's share of the first minibatch's loss (``debug_tensors``).
    ``approx_kl`` is the mean of the minibatches' KL(pi_old || pi) *before* each step (CleanRL's
    debug variable); with ``objective: adaptive_kl``, ``kl_after_update`` is the KL after the last
    step, on the whole rollout (one more no-grad forward): what the controller is fed.
    ``penalty_coef``: the KL penalty's current beta (default: the recipe's)."""
    dist = dist or ONE_PROCESS
    mask = roll.mask * (~roll.truncated)[:, None] if cfg.mask_truncated else roll.mask
    n_groups = roll.prompt_ids.shape[0]
    size = n_groups // cfg.minibatches  # minibatches hold whole groups: shared prompt, shared baseline
    sums: dict[str, float] = {}
    once: set[str] = set()  # first-minibatch values: not averaged over the steps
    skipped = 0
    policy.update_mode()  # (LMPolicy.update_mode: dropout off unless disable_dropout: false)
    for epoch in range(cfg.epochs):
        perm = torch.randperm(n_groups) if cfg.minibatches > 1 else torch.arange(n_groups)
        for k in range(cfg.minibatches):
            first = epoch == 0 and k == 0
            loss, stats, first_stats = minibatch_loss(policy, roll, perm[k * size:(k + 1) * size], adv, ret,
                                                      passes, mask, cfg, dist, penalty_coef, first)
            once |= set(first_stats)
            stats.update(first_stats)
            grad_norm, bad_step = _step(policy, opt, sched, loss, stats, cfg, dist)
            skipped += bad_step
            for key, v in {**stats, "loss": loss.detach(), "grad_norm": grad_norm}.items():
                sums[key] = sums.get(key, 0.0) + float(v)
            if first:
                loss_part = float(loss.detach())  # this rank's share of the first loss
    out = _step_stats(sums, once, cfg.epochs * cfg.minibatches, dist)
    out["skipped"] = skipped
    if cfg.objective == "adaptive_kl":  # the controller's input: the policy's move over the whole update
        old = passes.old_logp if passes.old_logp is not None else roll.rollout_logp
        with dist.autocast():
            out["kl_after_update"] = kl_after_update(policy, roll, old, mask, dist.sum)
    # tokens one policy forward runs: each prompt once, each length bucket of completions
    out["tokens/train"] = dist.sum(float(roll.prompt_ids.numel()
                                         + sum(len(r) * w for r, w in length_buckets(roll.mask))))
    return out, loss_part


def minibatch_loss(policy: LMPolicy, roll: Rollout, groups: torch.Tensor, adv: torch.Tensor,
                   ret: torch.Tensor | None, passes: RolloutPass, mask: torch.Tensor, cfg: LMConfig, dist: Dist,
                   penalty_coef: float | None, first: bool) -> tuple[torch.Tensor, dict, dict]:
    """The loss of the minibatch of prompt ``groups``: the recipe's ``objective`` (``rlhf.core``'s
    registry) with the KL term in the loss, plus (with value targets ``ret``) the critic's loss on
    the same tokens and normaliser. Returns ``(loss, stats, first-minibatch stats)``."""
    idx = roll.rows_of(groups)
    mb_mask = mask[idx]
    denom = dist.sum(_denom(mb_mask, cfg))
    with dist.autocast():
        out = policy.forward(roll.select_groups(groups), values=ret is not None, entropy=first)
    old_logp = _pick(passes.old_logp, idx)
    kl = kl_terms(cfg)
    loss, stats = policy_loss(
        out["logp"], adv[idx], mb_mask, old_logp=out["logp"].detach() if old_logp is None else old_logp,
        ref_logp=_pick(passes.ref_logp, idx), objective=cfg.objective, clip_range=cfg.clip_range,
        clip_range_high=cfg.clip_range_high, penalty_coef=cfg.penalty_coef if penalty_coef is None else penalty_coef,
        kl_coef=kl.loss_coef, kl_estimator=kl.estimator, agg=cfg.agg, denom=denom,
        kl_logged="k1" if policy.truncation.active else None)  # (truncated pi vs full ref: policy_loss)
    if ret is not None:  # the critic's loss on the same tokens and normaliser
        vf = value_loss(out["values"], ret[idx], passes.old_values[idx], cfg.clip_range_value)
        stats["vf_loss"] = aggregate(vf, mb_mask, cfg.agg, denom)
        loss = loss + cfg.vf_coef * stats["vf_loss"]
        stats["vf_loss"] = stats["vf_loss"].detach()
    return loss, stats, _first_minibatch_stats(out, roll, idx, old_logp) if first else {}


def _step_stats(sums: dict, once: set, steps: int, dist: Dist) -> dict:
    """The update's stats: means over its ``steps`` optimiser steps (``once``: the first
    minibatch's value), then over ranks (``SUMMED_STATS``: summed, the global normaliser's)."""
    out = {key: v / steps if key not in once else v for key, v in sums.items() if key != "nonfinite"}
    return {key: (dist.sum(v) if key in SUMMED_STATS else  # grad_norm: already the same on every rank
                  v if key == "grad_norm" else dist.mean(v)) for key, v in out.items()}


def _step(policy: LMPolicy, opt, sched, loss: torch.Tensor, stats: dict, cfg: LMConfig,
          dist: Dist | None = None) -> tuple[float, bool]:
    """One optimiser step; a non-finite loss or gradient (on any rank) skips it on every rank
    and keeps the weights. ``loss`` is this rank's share of the global loss. Returns the gradient
    norm and whether the step was skipped as non-finite.

    ``dtype: float16`` (``policy.scaler``, a ``torch.amp.GradScaler``): the loss is multiplied by
    the scale before backward, so that small gradients survive float16's range, and the gradients
    are divided by it before clipping. Gradients that overflow at the current scale skip the step
    and halve the scale (the scaler's own job: not counted as a non-finite step); the scale
    grows again after 2000 clean steps. Logged: ``amp/loss_scale``, ``amp/overflow``."""
    dist = dist or ONE_PROCESS
    scaler = policy.scaler
    opt.zero_grad(set_to_none=True)
    grad_norm = float("nan")
    bad = dist.max(float("nonfinite" in stats or not math.isfinite(float(loss.detach()))))
    if not bad:  # (DeepSpeed's engine steps inside backward and clips at max_grad_norm itself)
        scaled = loss * dist.world  # DDP, FSDP, ZeRO average gradients over ranks; undo the 1/world
        dist.backward(scaled if scaler is None else scaler.scale(scaled))
        if scaler is not None:
            scaler.unscale_(opt)
        grad_norm = dist.clip_grad_norm(policy.trainable_parameters(), cfg.max_grad_norm)
    if scaler is not None and not bad:
        stats["amp/loss_scale"] = scaler.get_scale()  # the scale this step's backward used
        stats["amp/overflow"] = float(not math.isfinite(grad_norm))
        scaler.step(opt)  # skips opt.step() when unscale_ found an inf or NaN gradient
        scaler.update()
        if math.isfinite(grad_norm):
            sched.step()
        return grad_norm, False
    if math.isfinite(grad_norm):
        opt.step()
        sched.step()
    else:
        opt.zero_grad(set_to_none=True)
    return grad_norm, not math.isfinite(grad_norm)


def _first_minibatch_stats(out: dict, roll: Rollout, idx: torch.Tensor, old_logp: torch.Tensor | None) -> dict:
    """Entropy, the log-prob gap between sampler and trainer (a silent-bug detector), and the
    gap between the rollout pass's old log-probs and the update's (0 when the ratio is 1
    on-policy, as it must be before the first optimiser step)."""
    m = roll.mask[idx]
    n = m.sum().clamp(min=1)
    stats = {"entropy": (out["entropy"] * m).sum() / n}
    if roll.rollout_logp is not None:
        stats["logp_gap_rollout_trainer"] = ((out["logp"].detach() - roll.rollout_logp[idx]).abs() * m).sum() / n
    if old_logp is not None:
        stats["logp_gap_old_trainer"] = ((out["logp"].detach() - old_logp).abs() * m).sum() / n
    return stats


def _denom(mask: torch.Tensor, cfg: LMConfig) -> float:
    """The normaliser of this optimiser step (the whole minibatch, all its tokens)."""
    if cfg.agg == "token_mean":
        return float(mask.sum().clamp(min=1))
    if cfg.agg == "seq_mean":
        return float(mask.shape[0])
    return float(mask.shape[0] * completion_budget(cfg))  # constant: Dr. GRPO's B * max_len


def _pick(t, idx):
    return None if t is None else t[idx]


def _frac_equal_groups(rewards: torch.Tensor, g: int) -> float:
    groups = rewards.reshape(-1, g)
    return float((groups.max(1).values == groups.min(1).values).float().mean())


def summary(run: Run, policy: LMPolicy, seconds: float, full: dict | None = None) -> dict:
    hist = run.history
    last = hist[-5:]
    out = {"run_dir": str(run.dir), "steps": len(hist), "train_time_s": round(seconds, 1),
           "reward_first": hist[0]["reward"] if hist else None,
           "reward_last5": sum(r["reward"] for r in last) / len(last) if last else None,
           "kl_last": hist[-1].get("kl") if hist else None, "adapter_norm": round(policy.adapter_norm(full), 4),
           "dtype": policy.dtype}  # the base weights' precision (dtype: auto's choice)
    if hist and out["adapter_norm"] == 0.0:
        out["warning"] = "the LoRA adapter did not move: check lr and the reward signal"
    return out
