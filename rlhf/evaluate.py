"""Greedy evaluation of a run on fresh held-out prompts: the base model vs the trained adapter."""
from __future__ import annotations

from pathlib import Path

import torch
import yaml
from tqdm.auto import tqdm

from rlhf.config import build, config_class
from rlhf.errors import UserError
from rlhf.lm.models import resolve_model
from rlhf.lm.policy import LMPolicy
from rlhf.rewards import RewardFn, load_rewards, score
from rlhf.tasks import make_task


def load_run_config(run_dir: str):
    path = Path(run_dir) / "recipe.yaml"
    if not path.is_file():
        raise UserError(f"{run_dir!r} is not a run directory (no recipe.yaml); pass the run_dir "
                        "printed by `rlhf train`")
    values = yaml.safe_load(path.read_text()) or {}
    return build(config_class(values), values)


def evaluate_lm_cli(run_dir: str, cfg, args) -> dict:
    return evaluate_lm(run_dir, args.problems, progress=not args.no_progress, cfg=cfg)


def evaluate_lm(run_dir: str, problems: int | None = None, progress: bool = True, cfg=None) -> dict:
    cfg = cfg or load_run_config(run_dir)
    adapter = Path(run_dir) / "adapter"
    if not (adapter / "adapter_config.json").is_file():
        raise UserError(f"{run_dir!r} has no saved adapter yet; train it first (rlhf train ...)")
    torch.manual_seed(cfg.seed)
    policy = LMPolicy(resolve_model(cfg.model, revision=cfg.revision), dtype=cfg.dtype, adapter_path=str(adapter))
    task = make_task(cfg.task, cfg.seed, cfg.steps * cfg.prompts_per_step, cfg.eval_task)
    rows = task.held_out(problems or cfg.eval_problems, cfg.eval_seed)
    if task.name == "arith":  # accuracy: the correctness reward alone, no shaping
        from rewards import arith_correct

        fns, metric = [RewardFn("arith_correct", arith_correct)], "accuracy"
    else:
        fns, metric = load_rewards(cfg.rewards, cfg.reward_timeout_s, cfg.reward_workers), "reward"
    out = {"run_dir": str(run_dir), "problems": len(rows)}
    for label, use_adapter in (("base", False), ("trained", True)):
        out[f"{label}_{metric}"] = round(greedy_score(policy, rows, fns, cfg, use_adapter, progress), 4)
    return out


@torch.no_grad()
def greedy_score(policy: LMPolicy, rows: list[dict], fns, cfg, adapter: bool, progress: bool) -> float:
    """Mean total reward of greedy completions (accuracy when the reward is 0/1 correctness)."""
    from rlhf.trainers.lm import collect

    total = 0.0
    batches = range(0, len(rows), cfg.eval_batch)
    for i in tqdm(batches, desc="eval " + ("trained" if adapter else "base"), disable=not progress):
        chunk = rows[i:i + cfg.eval_batch]
        _, prompts, completions, columns = collect(policy, chunk, cfg, greedy=True, adapter=adapter)
        rewards, _ = score(fns, prompts, completions, columns)
        total += float(rewards.sum())
    return total / max(len(rows), 1)
