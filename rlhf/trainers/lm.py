"""Token-level RL for language models: collect -> score -> advantages -> update -> log.

GRPO, RLOO, REINFORCE and PPO are settings of this one loop (the advantage estimator and the
objective), not copies of it. Shapes: N = prompts_per_step * group_size rows, C completion
tokens; ``logp, old_logp, ref_logp, mask : [N, C]``, ``rewards, adv : [N]`` (ppo: ``[N, C]``).
The plumbing lives with its owner: processes in ``rlhf/distributed.py``, saves, resume, Ctrl-C
and stopping on a diverged loss in ``rlhf/checkpoint.py``, sampling in ``rlhf/lm/rollout.py``.
"""
from __future__ import annotations

import itertools
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
from rlhf.core.importance import tis_level, tis_weights
from rlhf.distributed import ONE_PROCESS, Dist
from rlhf.lm.models import resolve_model
from rlhf.lm.forward import length_buckets
from rlhf.lm.policy import LMPolicy
from rlhf.lm.rollout import RolloutPass, kl_after_update, kl_terms, rollout_pass, sampling_uniforms
from rlhf.lm.rollout_record import Rollout, completion_id_lists
from rlhf.lm.share import adapter_writer
from rlhf.trainers.lm_step import accumulate, optimiser_step
from rlhf.rewards import TrainerState, load_rewards, score
from rlhf.run import Run
from rlhf.seeding import seed_everything
from rlhf.trainers.lm_sources import completion_budget, draws_per_row, policy_class, rollout_source, train_rows
from rlhf.tracking import Tracking, accelerator_kwargs


def train(cfg: LMConfig, run: Run, progress: bool = True, resume: bool = False) -> dict:
    dist = Dist(trackers=accelerator_kwargs(cfg, run.dir))
    track = Tracking(cfg, run, dist.acc, progress)  # trackers, completions.jsonl, report.html
    check_batches(cfg, dist)
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


def check_batches(cfg: LMConfig, dist: Dist) -> None:
    """The step's prompts split over processes and minibatches; micro-batches where they can run."""
    dist.check_split(cfg.prompts_per_step, cfg.minibatches)
    dist.check_micro_batches(cfg.micro_batch_size)


def build(cfg: LMConfig, dist: Dist, ckpt=None) -> tuple[LMPolicy, torch.optim.Optimizer, object]:
    """The policy (with a checkpoint's adapter when resuming), its optimiser placed for the
    processes (DDP, FSDP2 or DeepSpeed under accelerate) and the warm-up LR schedule."""
    policy = policy_class(cfg, LMPolicy)(
        resolve_model(cfg.model, revision=cfg.revision), lora_r=cfg.lora_r, lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora_dropout, lora_targets=cfg.lora_targets, dtype=cfg.dtype, temperature=cfg.temperature,
        adapter_path=ckpt and str(ckpt / "adapter"), value_head=cfg.algo == "ppo", critic=cfg.critic,
        gradient_checkpointing=cfg.gradient_checkpointing, disable_dropout=cfg.disable_dropout, device=dist.device,
        reference=bool(cfg.kl_coef))
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
            **episode_stats(roll, dist), **stats, "lr": lr, "time/generate_s": t1 - t0, "time/score_s": t2 - t1,
            "time/update_s": t3 - t2, "time/step_s": t3 - t0}


def episode_stats(roll: Rollout, dist: Dist) -> dict:
    """An agent run's episodes (none for single-turn rollouts): environment steps this step
    (every rank's episodes' turns) and the mean turns an episode."""
    turns = roll.reward_inputs.columns.get("turns") if roll.reward_inputs is not None else None
    if not turns:
        return {}
    return {"env_steps": dist.sum(float(sum(turns))), "episode/turns": dist.mean(sum(turns) / len(turns))}


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
            opt.zero_grad(set_to_none=True)
            stats, first_keys, bad = minibatch_gradients(policy, roll, perm[k * size:(k + 1) * size], adv, ret,
                                                         passes, mask, cfg, dist, penalty_coef, first)
            once |= first_keys
            grad_norm, bad_step = optimiser_step(policy, opt, sched, stats, cfg.max_grad_norm, dist, bool(bad))
            skipped += bad_step
            for key, v in {**stats, "grad_norm": grad_norm}.items():
                sums[key] = sums.get(key, 0.0) + float(v)
            if first:
                loss_part = stats.get("loss", float("nan"))  # this rank's share of the first loss
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


def minibatch_gradients(policy: LMPolicy, roll: Rollout, groups: torch.Tensor, adv: torch.Tensor,
                        ret: torch.Tensor | None, passes: RolloutPass, mask: torch.Tensor, cfg: LMConfig, dist: Dist,
                        penalty_coef: float | None, first: bool) -> tuple[dict, set, bool]:
    """Gradients of the minibatch of prompt ``groups``, accumulated over micro-batches of
    ``micro_batch_size`` rows (rlhf/trainers/lm_step.py), each micro-batch's loss normalised by
    the whole minibatch over all processes. Returns its stats (the micro-batches' sums: a per-token
    mean is weighted by each micro-batch's share of the tokens, so it is the minibatch's), the
    names of the first-minibatch stats, and whether a non-finite loss stopped it."""
    idx = roll.rows_of(groups)
    denom = dist.sum(_denom(mask[idx], cfg))
    tokens = (mask[idx].sum().clamp(min=1), roll.mask[idx].sum().clamp(min=1))  # the per-token means' weights
    tis = tis_level(cfg.tis, policy.dtype) if roll.rollout_logp is not None else "none"
    first_keys: set = set()

    def loss_of(out: dict, rows: torch.Tensor):
        rows = idx[rows]
        loss, stats = micro_loss(out, roll, rows, adv, ret, passes, mask, cfg, penalty_coef, denom, tis,
                                 kl_logged="k1" if policy.truncation.active else None)
        share = mask[rows].sum() / tokens[0]
        stats = {k: v if k in SUMMED_STATS else v * share for k, v in stats.items()}
        if first:
            first_stats = _first_minibatch_stats(out, roll, rows, _pick(passes.old_logp, rows))
            first_keys.update(first_stats)
            stats.update({k: v * roll.mask[rows].sum() / tokens[1] for k, v in first_stats.items()})
        return loss, stats

    stats, bad = accumulate(policy, roll.select_groups(groups), cfg.micro_batch_size, loss_of, dist,
                            values=ret is not None, entropy=first)
    return stats, first_keys, bad


def micro_loss(out: dict, roll: Rollout, rows: torch.Tensor, adv: torch.Tensor, ret: torch.Tensor | None,
               passes: RolloutPass, mask: torch.Tensor, cfg: LMConfig, penalty_coef: float | None, denom: float,
               tis: str, *, kl_logged: str | None = None) -> tuple[torch.Tensor, dict]:
    """The loss of the rollout's ``rows`` (a micro-batch) from the policy's outputs ``out`` on them,
    normalised by the minibatch's ``denom``: the recipe's ``objective`` (``rlhf.core``'s registry),
    weighted by truncated importance sampling of the sampler against the trainer (``tis``: token,
    sequence or none), with the KL term in the loss, plus (with value targets ``ret``) the critic's
    loss on the same tokens and normaliser. The trainer's rollout-policy log-probs are the rollout
    pass's, or, where it ran none (one on-policy step), this update's own before any step."""
    m = mask[rows]
    old_logp = _pick(passes.old_logp, rows)
    old_logp = out["logp"].detach() if old_logp is None else old_logp
    weight, tis_stats = None, {}
    if tis != "none":
        weight, tis_stats = tis_weights(old_logp, roll.rollout_logp[rows], m, tis, cfg.tis_cap)
    kl = kl_terms(cfg)
    loss, stats = policy_loss(
        out["logp"], adv[rows], m, old_logp=old_logp, ref_logp=_pick(passes.ref_logp, rows),
        objective=cfg.objective, clip_range=cfg.clip_range, clip_range_high=cfg.clip_range_high,
        penalty_coef=cfg.penalty_coef if penalty_coef is None else penalty_coef,
        kl_coef=kl.loss_coef, kl_estimator=kl.estimator, agg=cfg.agg, denom=denom, is_weight=weight,
        kl_logged=kl_logged)  # k1 where the policy is truncated (truncated pi vs full ref: policy_loss)
    if ret is not None:  # the critic's loss on the same tokens and normaliser
        vf = aggregate(value_loss(out["values"], ret[rows], passes.old_values[rows], cfg.clip_range_value),
                       m, cfg.agg, denom)
        loss, stats["vf_loss"] = loss + cfg.vf_coef * vf, vf.detach()
    return loss, {**stats, **tis_stats}


def _step_stats(sums: dict, once: set, steps: int, dist: Dist) -> dict:
    """The update's stats: means over its ``steps`` optimiser steps (``once``: the first
    minibatch's value), then over ranks (``SUMMED_STATS``: summed, the global normaliser's)."""
    out = {key: v / steps if key not in once else v for key, v in sums.items() if key != "nonfinite"}
    return {key: (dist.sum(v) if key in SUMMED_STATS else  # grad_norm: already the same on every rank
                  v if key == "grad_norm" else dist.mean(v)) for key, v in out.items()}


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
    if out["adapter_norm"] != out["adapter_norm"]:  # full fine-tuning without a reference: nothing to measure from
        out["adapter_norm"] = None
    if hist and out["adapter_norm"] == 0.0:
        out["warning"] = "the trained weights did not move: check lr and the reward signal"
    return out
