"""Learned rewards: a sequence classifier with one output, trained on preference pairs with
the Bradley-Terry loss, and usable as a reward function in any recipe (``rewards: [rm:DIR]``).

    loss = -log sigmoid(r(prompt, chosen) - r(prompt, rejected))      (Bradley & Terry 1952;
                                                                      Ouyang et al. 2022)
"""
from __future__ import annotations

import random
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from rewards._text import completion_text
from rlhf.errors import UserError

RM_DIR = "reward_model"


def bradley_terry_loss(chosen: torch.Tensor, rejected: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """Mean of ``-log sigmoid(r_chosen - r_rejected)`` over pairs [B]; stats: pairwise accuracy."""
    margin = chosen - rejected
    loss = -F.logsigmoid(margin).mean()
    return loss, {"accuracy": (margin > 0).float().mean().detach(), "margin": margin.mean().detach()}


def arith_pairs(n: int, seed: int, exclude: set | None = None) -> list[dict]:
    """Preference pairs for the addition task: the right sum is preferred to a plausible wrong
    one (off by one, by ten, digits swapped, or a rambling answer with a wrong number)."""
    from rlhf.tasks import ARITH_TEMPLATE

    rng, rows, exclude = random.Random(seed), [], exclude or set()
    while len(rows) < n:
        a, b = rng.randint(10, 99), rng.randint(10, 99)
        if (a, b) in exclude:
            continue
        s = a + b
        wrong = rng.choice([s + 1, s - 1, s + 10, s - 10, int(str(s)[::-1]), s + rng.randint(2, 9)])
        if wrong == s:
            wrong = s + 1
        rejected = str(wrong) if rng.random() < 0.7 else f"{a} + {b} = {wrong}"
        chosen = str(s) if rng.random() < 0.7 else f"{a} + {b} = {s}"
        rows.append({"prompt": [{"role": "user", "content": ARITH_TEMPLATE.format(a=a, b=b)}],
                     "chosen": chosen, "rejected": rejected, "a": a, "b": b})
    return rows


class RewardModel:
    """A causal LM trunk (LoRA) with a scalar score head, scoring chat-formatted texts."""

    def __init__(self, path: str, lora_r: int = 16, lora_alpha: int = 32, trainable: bool = False):
        import transformers
        from peft import LoraConfig, PeftModel, get_peft_model

        transformers.logging.set_verbosity_error()
        saved = Path(path) / "adapter_config.json"
        if saved.is_file():  # a trained reward model: base checkpoint + adapter (+ score head)
            import json

            base_path = json.loads(saved.read_text())["base_model_name_or_path"]
            self.tokenizer = transformers.AutoTokenizer.from_pretrained(path)
            base = transformers.AutoModelForSequenceClassification.from_pretrained(base_path, num_labels=1)
            base.config.pad_token_id = self.tokenizer.pad_token_id
            self.model = PeftModel.from_pretrained(base, path, is_trainable=trainable)
        else:
            self.tokenizer = transformers.AutoTokenizer.from_pretrained(path)
            base = transformers.AutoModelForSequenceClassification.from_pretrained(path, num_labels=1)
            if self.tokenizer.pad_token is None:
                self.tokenizer.pad_token = self.tokenizer.eos_token
            base.config.pad_token_id = self.tokenizer.pad_token_id
            cfg = LoraConfig(r=lora_r, lora_alpha=lora_alpha, target_modules="all-linear",
                             task_type="SEQ_CLS", modules_to_save=["score"])
            self.model = get_peft_model(base, cfg)
        self.tokenizer.padding_side = "left"  # the score is read at the last position

    def texts(self, prompts: list, completions: list) -> list[str]:
        out = []
        for p, c in zip(prompts, completions):
            c_text = completion_text(c)
            if isinstance(p, str):
                out.append(p + c_text)
            else:
                out.append(self.tokenizer.apply_chat_template(
                    p + [{"role": "assistant", "content": c_text}], tokenize=False))
        return out

    def score(self, prompts: list, completions: list) -> torch.Tensor:
        enc = self.tokenizer(self.texts(prompts, completions), return_tensors="pt", padding=True,
                             add_special_tokens=False)
        return self.model(**enc).logits.squeeze(-1).float()

    def save(self, path) -> None:
        self.model.save_pretrained(str(path), safe_serialization=True)
        self.tokenizer.save_pretrained(str(path))


class RewardModelFn:
    """A trained reward model behind the TRL reward contract: ``fn(prompts, completions, **kw)``."""

    def __init__(self, path: str):
        if not (Path(path) / "adapter_config.json").is_file():
            raise UserError(f"reward model {path!r} not found (no adapter_config.json); train one with "
                            "`rlhf train recipes/rm_arith.yaml` and point at its run_dir/reward_model")
        self.rm = RewardModel(path)
        self.rm.model.eval()
        self.__name__ = f"rm:{path}"

    @torch.no_grad()
    def __call__(self, prompts, completions, **_) -> list[float]:
        return self.rm.score(prompts, completions).tolist()


def train_reward_model(cfg, run, progress: bool = True, resume: bool = False) -> dict:
    """Bradley-Terry training of a reward model on preference pairs."""
    from rlhf.lm.models import resolve_model
    from rlhf.tasks import load_rows, split_held_out
    from rlhf.trainers.lm import seed_everything

    if resume:
        raise UserError("reward-model runs are short and do not checkpoint; start a new run instead of --resume")
    seed_everything(cfg.seed, cfg.threads)
    if cfg.task == "arith":
        train_rows = arith_pairs(cfg.steps * cfg.prompts_per_step, cfg.seed)
        seen = {(r["a"], r["b"]) for r in train_rows}  # held-out pairs are fresh problems
        eval_rows = arith_pairs(cfg.eval_problems, cfg.eval_seed, exclude=seen)
    else:
        rows = load_rows(cfg.task)
        missing = {"prompt", "chosen", "rejected"} - set(rows[0])
        if missing:
            raise UserError(f"preference file {cfg.task!r} lacks columns {sorted(missing)}; it needs "
                            "prompt, chosen and rejected")
        train_rows, eval_rows = split_held_out(rows, random.Random(cfg.seed), cfg.eval_task)
    rm = RewardModel(resolve_model(cfg.model), cfg.lora_r, cfg.lora_alpha)
    params = [p for p in rm.model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    t0 = time.time()
    bs = cfg.prompts_per_step
    bar = tqdm(range(cfg.steps), desc="reward model", disable=not progress)
    for step in bar:
        batch = [train_rows[(step * bs + i) % len(train_rows)] for i in range(bs)]
        prompts = [r["prompt"] for r in batch]
        scores = rm.score(prompts + prompts, [r["chosen"] for r in batch] + [r["rejected"] for r in batch])
        loss, stats = bradley_terry_loss(scores[:bs], scores[bs:])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm or float("inf"))
        opt.step()
        run.log({"step": step + 1, "loss": loss.detach(), "accuracy": stats["accuracy"],
                 "margin": stats["margin"]})
        bar.set_postfix(loss=f"{loss.item():.3f}", acc=f"{stats['accuracy']:.2f}")
    acc = pairwise_accuracy(rm, eval_rows)
    run.save_atomic(RM_DIR, rm.save)
    run.log({"step": cfg.steps, "heldout_pairwise_accuracy": acc})
    run.plot("accuracy", "accuracy.png")
    return {"run_dir": str(run.dir), "reward_model": str(run.dir / RM_DIR), "steps": cfg.steps,
            "heldout_pairs": len(eval_rows), "heldout_pairwise_accuracy": round(acc, 4),
            "train_time_s": round(time.time() - t0, 1)}


def evaluate_rm_cli(run_dir: str, cfg, args) -> dict:
    """``rlhf eval`` of a reward-model run: pairwise accuracy on fresh held-out pairs."""
    path = Path(run_dir) / RM_DIR
    if not (path / "adapter_config.json").is_file():
        raise UserError(f"{run_dir!r} has no trained reward model yet ({RM_DIR}/ is missing)")
    rm = RewardModel(str(path))
    seen = {(r["a"], r["b"]) for r in arith_pairs(cfg.steps * cfg.prompts_per_step, cfg.seed)}
    rows = arith_pairs(args.problems or cfg.eval_problems, cfg.eval_seed, exclude=seen)
    return {"run_dir": str(run_dir), "heldout_pairs": len(rows),
            "heldout_pairwise_accuracy": round(pairwise_accuracy(rm, rows), 4)}


@torch.no_grad()
def pairwise_accuracy(rm: RewardModel, rows: list[dict], batch: int = 32) -> float:
    rm.model.eval()
    correct = 0
    for i in range(0, len(rows), batch):
        chunk = rows[i:i + batch]
        prompts = [r["prompt"] for r in chunk]
        s = rm.score(prompts + prompts, [r["chosen"] for r in chunk] + [r["rejected"] for r in chunk])
        correct += int((s[:len(chunk)] > s[len(chunk):]).sum())
    rm.model.train()
    return correct / max(len(rows), 1)
