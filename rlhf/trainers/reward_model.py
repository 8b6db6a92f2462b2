"""Reward-model trainer: Bradley-Terry on preference pairs (``algo: reward_model``).

    loss = -log sigmoid(r(x, y_chosen) - r(x, y_rejected))      (Bradley & Terry 1952;
                                                                  Ouyang et al. 2022)

The reward model and its two heads: ``rlhf/lm/reward_model.py``; the pairs:
``rlhf/preferences.py``; its held-out accuracy (also ``rlhf eval``): ``rlhf/lm/evaluate.py``.
"""
from __future__ import annotations

import time

import torch
from tqdm.auto import tqdm

from rlhf import checkpoint
from rlhf.core import bradley_terry_loss
from rlhf.errors import UserError
from rlhf.lm.evaluate import heldout_accuracy
from rlhf.lm.reward_model import RM_DIR, RewardModel
from rlhf.preferences import preference_rows
from rlhf.seeding import seed_everything
from rlhf.tracking import Tracking


def train_reward_model(cfg, run, progress: bool = True, resume: bool = False) -> dict:
    """Bradley-Terry training of a reward model on preference pairs; ``cfg.rm_beta`` scales the
    log-ratio reward (DPO's beta); the LR decays linearly to 0 (``linear_lr``)."""
    if cfg.rm_head == "log_ratio" and cfg.rm_beta <= 0:
        raise UserError(f"a reward model needs rm_beta > 0 (the scale of its log-ratio reward), got {cfg.rm_beta}")
    seed_everything(cfg.seed, cfg.threads)
    track = Tracking(cfg, run, progress=progress)  # trackers, report.html
    t0 = time.time()
    rm = RewardModel(cfg.model, cfg.lora_r, cfg.lora_alpha, beta=cfg.rm_beta, trainable=True, head=cfg.rm_head)
    train_rows, eval_rows = preference_rows(cfg, rm)  # arith: samples the base policy (a minute or two)
    torch.manual_seed(cfg.seed)
    params = rm.parameters()
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: linear_lr(s, cfg.warmup_steps, cfg.steps))
    pairs_s, t1 = time.time() - t0, time.time()
    bs = cfg.prompts_per_step
    start = resume_reward_model(run, rm, opt, sched) if resume else 0
    bar = tqdm(range(start, cfg.steps), desc="reward model", disable=not progress, initial=start, total=cfg.steps)
    for step in bar:
        # each pair is seen once while steps * prompts_per_step <= len(train_rows) (always, for arith)
        b_rows = [train_rows[(step * bs + i) % len(train_rows)] for i in range(bs)]
        b_prompts = [r["prompt"] for r in b_rows]
        b_completions = [r["chosen"] for r in b_rows] + [r["rejected"] for r in b_rows]
        scores = rm.score(b_prompts + b_prompts, b_completions)
        loss, stats = bradley_terry_loss(scores[:bs], scores[bs:])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm or float("inf"))
        opt.step()
        sched.step()
        run.log({"step": step + 1, "loss": loss.detach(), "accuracy": stats["accuracy"],
                 "margin": stats["margin"], "grad_norm": grad_norm, "time_s": time.time() - t1})
        bar.set_postfix(loss=f"{loss.item():.3f}", acc=f"{stats['accuracy']:.2f}")
        if cfg.save_every and (step + 1) % cfg.save_every == 0:
            save_reward_model_checkpoint(run, step + 1, rm, opt, sched)
    train_s, t2 = time.time() - t1, time.time()
    heldout = heldout_accuracy(rm, eval_rows)
    run.save_atomic(RM_DIR, rm.save)
    run.log({"step": cfg.steps, **heldout})
    run.plot("accuracy", "accuracy.png")
    return track.finish({"run_dir": str(run.dir), "reward_model": str(run.dir / RM_DIR), "steps": cfg.steps,
                         "train_pairs_seen": cfg.steps * bs, **heldout, "pairs_time_s": round(pairs_s, 1),
                         "train_time_s": round(train_s, 1), "eval_time_s": round(time.time() - t2, 1)})


RM_FOLLOW = {RM_DIR: RM_DIR}  # RUN_DIR/reward_model: the newest checkpoint's until the final save


def save_reward_model_checkpoint(run, step: int, rm, opt, sched) -> None:
    """``checkpoint-<step>/``: the reward model as users load it, plus the trainable tensors,
    optimiser, scheduler and RNG streams a resumed run continues from exactly."""
    def writer(d) -> None:
        rm.save(d / RM_DIR)
        checkpoint.write_state(d, {"optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                                   **checkpoint.rng_state(), "counters": {"step": step},
                                   "params": [p.detach().clone() for p in rm.parameters()]})

    checkpoint.publish(run, step, writer, follow=RM_FOLLOW)


def resume_reward_model(run, rm, opt, sched) -> int:
    """Load the newest checkpoint into ``rm``, ``opt``, ``sched`` and the RNG streams; drop the
    metric rows logged after it; return its step."""
    d = checkpoint.latest(run.dir, RM_FOLLOW)
    if d is None or not (d / checkpoint.STATE_FILE).is_file():
        raise UserError(f"{str(run.dir)!r} has no checkpoint to resume from (no checkpoint/state.pt); "
                        "reward-model runs write one every save_every steps")
    s = checkpoint.read_state(d)
    params = rm.parameters()
    if len(params) != len(s["params"]):
        raise UserError(f"the checkpoint in {d} holds {len(s['params'])} trainable tensors, this recipe's "
                        f"reward model {len(params)}; resume with the recipe the run was started with")
    with torch.no_grad():
        for p, v in zip(params, s["params"]):
            p.copy_(v)
    opt.load_state_dict(s["optimizer"])
    sched.load_state_dict(s["scheduler"])
    checkpoint.set_rng_state(s)
    step = s["counters"]["step"]
    run.truncate_history(step)
    return step


def linear_lr(step: int, warmup: int, steps: int) -> float:
    """LR factor of optimiser step ``step`` (0-based): linear warm-up over ``warmup`` steps, then
    linear decay to 0 at ``steps`` (TRL's RewardTrainer default). With a constant LR, rm_arith.yaml's
    accuracy on its (fresh) training batches dipped mid-run and the run ended at 89.5% held-out."""
    if step < warmup:
        return (step + 1) / (warmup + 1)
    return max(0.0, (steps - step) / max(1, steps - warmup))
