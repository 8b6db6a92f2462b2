"""``rlhf eval`` of an agent run: episodes on held-out seeds (and held-out environments:
``eval_env_kwargs``), the base model against the trained adapter: success rate and mean return,
each with its standard error, acting greedily (``base_success``, ...: the most likely action
each turn) and sampling at the recipe's temperature (``base_sampled_success``, ...: the policy
as it trained), one episode per seed either way."""
from __future__ import annotations

import math
from pathlib import Path

import torch
from tqdm.auto import tqdm

from rlhf.agents.choose import ChoicePolicy
from rlhf.agents.episodes import EpisodeSource, episode_source
from rlhf.agents.task_seeds import held_out_rows
from rlhf.config import load_run_config
from rlhf.distributed import process_device
from rlhf.errors import UserError
from rlhf.lm.models import resolve_model


def evaluate_agent_cli(run_dir: str, cfg, args) -> dict:
    return evaluate_agent(run_dir, args.problems, progress=not args.no_progress, cfg=cfg)


def evaluate_agent(run_dir: str, episodes: int | None = None, progress: bool = True, cfg=None) -> dict:
    cfg = cfg or load_run_config(run_dir)
    adapter = Path(run_dir) / "adapter"
    if not (adapter / "adapter_config.json").is_file():
        raise UserError(f"{run_dir!r} has no saved adapter yet; train it first (rlhf train ...)")
    torch.manual_seed(cfg.seed)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = process_device()
    policy = ChoicePolicy(resolve_model(cfg.model, revision=cfg.revision), dtype=cfg.dtype, adapter_path=str(adapter),
                          temperature=cfg.temperature, device=device)
    policy.to(device)
    policy.set_options(top_k=cfg.top_k, top_p=cfg.top_p, min_p=cfg.min_p, stop=cfg.stop,
                       chat_template_kwargs=cfg.chat_template_kwargs)
    rows = held_out_rows(episodes or cfg.eval_problems, cfg.eval_seed)
    source = episode_source(policy, cfg, held_out=True)
    out = {"run_dir": str(run_dir), "episodes": len(rows), "env": cfg.env, "device": str(policy.device)}
    for label, use_adapter in (("base", False), ("trained", True)):
        for mode, greedy in (("", True), ("sampled_", False)):
            scores = play(source, rows, cfg.eval_batch, use_adapter, progress, greedy)
            out.update({f"{label}_{mode}{k}": v for k, v in scores.items()})
    return out


@torch.no_grad()
def play(source: EpisodeSource, rows: list[dict], batch: int, adapter: bool, progress: bool = False,
         greedy: bool = True) -> dict:
    """One episode from each of ``rows``' seeds, greedy or sampled: success rate and mean return
    with standard errors."""
    success, returns = [], []
    desc = f"eval {'trained' if adapter else 'base'}{'' if greedy else ' (sampled)'}"
    for i in tqdm(range(0, len(rows), batch), desc=desc, disable=not progress):
        cols = source(rows[i:i + batch], greedy=greedy, adapter=adapter, group_size=1).reward_inputs.columns
        success += cols["success"]
        returns += cols["env_return"]
    n = max(len(returns), 1)
    p, mean = sum(success) / n, sum(returns) / n
    var = sum((r - mean) ** 2 for r in returns) / max(n - 1, 1)
    return {"success": round(p, 4), "success_se": round(math.sqrt(p * (1 - p) / n), 4),
            "return": round(mean, 4), "return_se": round(math.sqrt(var / n), 4)}
