"""``rlhf eval`` of LM runs: greedy accuracy (or reward) of the base model vs the trained adapter
on fresh held-out prompts; for a reward model, its pairwise accuracy on held-out pairs."""
from __future__ import annotations

from pathlib import Path

import torch
from tqdm.auto import tqdm

from rlhf.config import load_run_config
from rlhf.distributed import process_device
from rlhf.errors import UserError
from rlhf.lm.models import resolve_model
from rlhf.lm.policy import LMPolicy
from rlhf.lm.reward_model import RM_DIR, RewardModel
from rlhf.lm.rollout import collect
from rlhf.lm.rollout_record import completion_id_lists
from rlhf.preferences import preference_rows
from rlhf.rewards import RewardFn, TrainerState, load_rewards, score
from rlhf.tasks import task_from_config


def evaluate_lm_cli(run_dir: str, cfg, args) -> dict:
    return evaluate_lm(run_dir, args.problems, progress=not args.no_progress, cfg=cfg)


def evaluate_lm(run_dir: str, problems: int | None = None, progress: bool = True, cfg=None) -> dict:
    cfg = cfg or load_run_config(run_dir)
    adapter = Path(run_dir) / "adapter"
    if not (adapter / "adapter_config.json").is_file():
        raise UserError(f"{run_dir!r} has no saved adapter yet; train it first (rlhf train ...)")
    torch.manual_seed(cfg.seed)
    if cfg.threads:  # the run's thread count (threads=1 on a shared machine), not torch's default
        torch.set_num_threads(cfg.threads)
    device = process_device()  # the device the trainer ran on (accelerate's pick); dtype auto resolves for it
    policy = LMPolicy(resolve_model(cfg.model, revision=cfg.revision), dtype=cfg.dtype, adapter_path=str(adapter),
                      device=device)
    policy.to(device)
    policy.set_options(top_k=cfg.top_k, top_p=cfg.top_p, min_p=cfg.min_p, stop=cfg.stop, max_prompt_length=
                       cfg.max_prompt_length, chat_template_kwargs=cfg.chat_template_kwargs, decode=cfg.decode)
    task = task_from_config(cfg)
    rows = task.held_out(problems or cfg.eval_problems, cfg.eval_seed)
    if task.name == "arith":  # accuracy: the correctness reward alone, no shaping
        from rewards import arith_correct

        fns, metric = [RewardFn("arith_correct", arith_correct)], "accuracy"
    else:
        fns, metric = load_rewards(cfg.rewards, cfg.reward_timeout_s, cfg.reward_workers), "reward"
    out = {"run_dir": str(run_dir), "problems": len(rows), "device": str(policy.device)}
    for label, use_adapter in (("base", False), ("trained", True)):
        out[f"{label}_{metric}"] = round(greedy_score(policy, rows, fns, cfg, use_adapter, progress), 4)
    return out


@torch.no_grad()
def greedy_score(policy: LMPolicy, rows: list[dict], fns, cfg, adapter: bool, progress: bool) -> float:
    """Mean total reward of greedy completions (accuracy when the reward is 0/1 correctness)."""
    total = 0.0
    batches = range(0, len(rows), cfg.eval_batch)
    for i in tqdm(batches, desc="eval " + ("trained" if adapter else "base"), disable=not progress):
        chunk = rows[i:i + cfg.eval_batch]
        roll, prompts, completions, columns = collect(policy, chunk, cfg, greedy=True, adapter=adapter)
        rewards, _, _ = score(fns, prompts, completions, columns, completion_id_lists(roll),  # unscored: 0
                              TrainerState(cfg.steps, cfg.steps))
        total += float(rewards.sum())
    return total / max(len(rows), 1)


def evaluate_rm_cli(run_dir: str, cfg, args) -> dict:
    """``rlhf eval`` of a reward-model run: pairwise accuracy on its held-out pairs."""
    path = Path(run_dir) / RM_DIR
    if not (path / "adapter_config.json").is_file():
        raise UserError(f"{run_dir!r} has no trained reward model yet ({RM_DIR}/ is missing)")
    rm = RewardModel(str(path))
    _, rows = preference_rows(cfg, rm, args.problems, train=False)
    return {"run_dir": str(run_dir), **heldout_accuracy(rm, rows)}


def heldout_accuracy(rm: RewardModel, rows: list[dict]) -> dict:
    """Pairwise accuracy on all held-out pairs and on each ``kind`` of pair (arith: near_miss,
    sampled), with their counts."""
    right = pairwise_right(rm, rows)
    out = {"heldout_pairs": len(rows), "heldout_pairwise_accuracy": round(sum(right) / max(len(rows), 1), 4)}
    kinds = sorted({r["kind"] for r in rows if "kind" in r})
    for kind in kinds if len(kinds) > 1 else []:
        mine = [ok for ok, r in zip(right, rows) if r.get("kind") == kind]
        out[f"heldout_pairs_{kind}"] = len(mine)
        out[f"heldout_accuracy_{kind}"] = round(sum(mine) / len(mine), 4)
    return out


@torch.no_grad()
def pairwise_right(rm: RewardModel, rows: list[dict], batch: int = 32) -> list[bool]:
    """For each pair: does the chosen completion score strictly above the rejected one?"""
    was_training = rm.model.training
    rm.model.eval()
    right = []
    for i in range(0, len(rows), batch):
        chunk = rows[i:i + batch]
        prompts = [r["prompt"] for r in chunk]
        s = rm.score(prompts + prompts, [r["chosen"] for r in chunk] + [r["rejected"] for r in chunk])
        right += (s[:len(chunk)] > s[len(chunk):]).tolist()
    rm.model.train(was_training)
    return right
