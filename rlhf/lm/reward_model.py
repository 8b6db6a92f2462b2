"""A learned reward: a LoRA adapter on a causal LM that scores (prompt, completion) pairs, and
the same behind the reward-function contract (``rewards: [rm:DIR]`` in any recipe). Trained by
``rlhf/trainers/reward_model.py`` with the Bradley-Terry loss (``rlhf.core.bradley_terry_loss``).

Two heads (the recipe's ``rm_head``). The default, ``log_ratio``, is the log-likelihood ratio
of a LoRA-adapted copy of the LM to the frozen base (the same weights with the adapter
disabled), summed over the completion's tokens:

    r(x, y) = beta * sum_t [log p_rm(y_t | x, y_<t) - log p_base(y_t | x, y_<t)]
                                                 (DPO's implicit reward, Rafailov et al. 2023)

``classifier`` is the classic sequence classifier with one output (``AutoModelForSequenceClassification``):
a fresh linear score head on the final hidden state of the last token, over the same LoRA trunk.

Why log_ratio by default: on the addition pairs of ``rm_arith.yaml`` telling 122 from 121 as
59 + 63 needs arithmetic, which a new head has to learn from one bit per pair, while the ratio
starts from the LM's own next-token predictions, which already hold some of it, and is exactly
0 for every text before training (no taste for a format or a length to unlearn). The measured
held-out accuracies of both heads are in the README ("Learned rewards").
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from rewards import completion_text
from rlhf.config import LMConfig
from rlhf.distributed import process_device
from rlhf.errors import UserError
from rlhf.lm.models import resolve_model
from rlhf.lm.forward import PolicyNet, positions

RM_DIR = "reward_model"
META_FILE = "reward_model.json"  # base model, head and beta, beside the adapter
SCORE_HEAD_FILE = "score_head.safetensors"  # rm_head: classifier
HEADS = LMConfig.choices["rm_head"]


class RewardModel:
    """A LoRA adapter on a causal LM that scores (prompt, completion) pairs, with one of two heads
    (``head``, the recipe's ``rm_head``):

    - ``log_ratio``: ``beta`` times the adapter's log-likelihood ratio to the base, summed over
      the completion tokens (module docstring);
    - ``classifier``: a sequence classifier with one output, a linear score head on the final
      hidden state of the last real token of prompt + completion (``AutoModelForSequenceClassification``'s
      reading), over the LoRA-adapted trunk.

    ``path``: a model name or checkpoint (a new, untrained reward model) or a directory written
    by ``save`` (a trained one; its head and beta come from the directory). ``device``: where it
    runs (default: the process's device as accelerate picks it, the policy's)."""

    def __init__(self, path: str, lora_r: int = 16, lora_alpha: int = 32, beta: float = 1.0,
                 trainable: bool = False, head: str = "log_ratio", device: torch.device | str | None = None):
        import transformers
        from peft import LoraConfig, PeftModel, get_peft_model

        transformers.logging.set_verbosity_error()
        saved = Path(path)
        if (saved / "adapter_config.json").is_file():  # a trained reward model
            if not (saved / META_FILE).is_file():
                raise UserError(f"{path!r} holds an adapter but no {META_FILE}, so it is not a reward model "
                                "written by this version; train it again with `rlhf train recipes/rm_arith.yaml`")
            meta = json.loads((saved / META_FILE).read_text())
            self.model_name, self.beta, self.head = meta["model"], float(meta["beta"]), meta.get("head", "log_ratio")
            self.tokenizer = transformers.AutoTokenizer.from_pretrained(path)
            base = transformers.AutoModelForCausalLM.from_pretrained(resolve_model(self.model_name))
            self.model = PeftModel.from_pretrained(base, path, is_trainable=trainable)
        else:
            if head not in HEADS:
                raise UserError(f"rm_head={head!r} is not valid; choose one of {', '.join(HEADS)}")
            self.model_name, self.beta, self.head = path, float(beta), head
            base_path = resolve_model(path)
            self.tokenizer = transformers.AutoTokenizer.from_pretrained(base_path)
            base = transformers.AutoModelForCausalLM.from_pretrained(base_path)
            cfg = LoraConfig(r=lora_r, lora_alpha=lora_alpha, target_modules="all-linear",
                             task_type="CAUSAL_LM")
            self.model = get_peft_model(base, cfg)
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.net = PolicyNet(self.model, None, temperature=1.0)  # the log-ratio's log-probs
        self.score_head = None
        if self.head == "classifier":  # one output, no bias (as AutoModelForSequenceClassification)
            self.score_head = torch.nn.Linear(self.model.config.hidden_size, 1, bias=False)
            if (saved / SCORE_HEAD_FILE).is_file():
                from safetensors.torch import load_file

                self.score_head.load_state_dict(load_file(str(saved / SCORE_HEAD_FILE)))
            else:
                torch.nn.init.normal_(self.score_head.weight, std=self.model.config.initializer_range)
            self.score_head.requires_grad_(trainable or not (saved / SCORE_HEAD_FILE).is_file())
        self.device = torch.device(device) if device is not None else process_device()
        self.net.to(self.device)
        if self.score_head is not None:
            self.score_head.to(self.device)

    def parameters(self) -> list[torch.nn.Parameter]:
        """The trainable parameters: the adapter's, and the score head's for ``classifier``."""
        head = list(self.score_head.parameters()) if self.score_head is not None else []
        return [p for p in self.model.parameters() if p.requires_grad] + head

    def split(self, prompt, completion) -> tuple[str, str]:
        """(the prompt as the policy sees it, the completion's text up to and with its end token):
        conversational prompts go through the chat template with the generation prompt."""
        text, eos = completion_text(completion), self.tokenizer.eos_token or ""
        if isinstance(prompt, str):
            return prompt, text + eos
        prefix = self.tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
        full = self.tokenizer.apply_chat_template(prompt + [{"role": "assistant", "content": text}],
                                                  tokenize=False)
        return (prefix, full[len(prefix):]) if full.startswith(prefix) else (prefix, text + eos)

    def encode(self, prompts: list, completions: list) -> dict[str, torch.Tensor]:
        """Each distinct prompt once, left-padded: ``prompt_ids, prompt_mask`` [P, T]; ``owner`` [N]:
        the prompt of each completion; the completions right-padded: ``ids, mask`` [N, K]. Prompt
        and completion are tokenised apart, so the boundary is where the policy's sampling began."""
        tok, index, prefixes, owner, suffixes = self.tokenizer, {}, [], [], []
        for p, c in zip(prompts, completions):
            prefix, suffix = self.split(p, c)
            if prefix not in index:
                index[prefix] = len(prefixes)
                prefixes.append(tok(prefix, add_special_tokens=False).input_ids)
            owner.append(index[prefix])
            suffixes.append(tok(suffix, add_special_tokens=False).input_ids)
        t, k = max(map(len, prefixes)), max(1, max(map(len, suffixes)))
        out = {"prompt_ids": torch.full((len(prefixes), t), tok.pad_token_id, dtype=torch.long),
               "prompt_mask": torch.zeros(len(prefixes), t, dtype=torch.long),
               "owner": torch.tensor(owner, dtype=torch.long),
               "ids": torch.full((len(suffixes), k), tok.pad_token_id, dtype=torch.long),
               "mask": torch.zeros(len(suffixes), k, dtype=torch.long)}
        for i, a in enumerate(prefixes):
            out["prompt_ids"][i, t - len(a):] = torch.tensor(a, dtype=torch.long)
            out["prompt_mask"][i, t - len(a):] = 1
        for i, b in enumerate(suffixes):
            out["ids"][i, :len(b)] = torch.tensor(b, dtype=torch.long)
            out["mask"][i, :len(b)] = 1
        return out

    def _logp(self, enc: dict[str, torch.Tensor], adapter: bool = True) -> torch.Tensor:
        """log p of each completion token [N, K], 0 on padding (``adapter=False``: the base's),
        by the policy's own training forward (``PolicyNet``): each prompt runs once, and its
        completions (a pair's chosen and rejected ones) run on top of its keys and values."""
        return self.net(enc["prompt_ids"], enc["prompt_mask"], enc["ids"], enc["mask"], adapter=adapter,
                        owner=enc["owner"])["logp"]

    def score(self, prompts: list, completions: list) -> torch.Tensor:
        """Rewards [N]: ``beta * sum over completion tokens of (log p_rm - log p_base)``, or the
        classifier's score of the last real token."""
        enc = {k: v.to(self.device) for k, v in self.encode(prompts, completions).items()}
        if self.head == "classifier":
            return self._classifier_score(enc)
        logp = self._logp(enc)
        with torch.no_grad():
            ref = self._logp(enc, adapter=False)
        return self.beta * (logp - ref).sum(-1)

    def _classifier_score(self, enc: dict[str, torch.Tensor]) -> torch.Tensor:
        """The score head on the final hidden state [N, d] of each completion's last real token
        (its end token), after one pass over prompt (left-padded) + completion (right-padded)."""
        owner, t = enc["owner"], enc["prompt_ids"].shape[1]
        ids = torch.cat([enc["prompt_ids"][owner], enc["ids"]], 1)
        mask = torch.cat([enc["prompt_mask"][owner], enc["mask"]], 1)
        decoder = self.model.get_base_model().get_decoder()
        hidden = decoder(input_ids=ids, attention_mask=mask, position_ids=positions(mask),
                         use_cache=False).last_hidden_state
        last = t + enc["mask"].sum(-1) - 1  # [N]
        return self.score_head(hidden[torch.arange(len(ids), device=last.device), last]).squeeze(-1).float()

    def save(self, path) -> None:
        self.model.save_pretrained(str(path), safe_serialization=True)
        self.tokenizer.save_pretrained(str(path))
        reward = {"log_ratio": "beta * sum_t [log p_rm(y_t) - log p_base(y_t)] over completion tokens",
                  "classifier": "linear score head on the last real token's final hidden state"}[self.head]
        if self.score_head is not None:
            from safetensors.torch import save_file

            save_file(self.score_head.state_dict(), str(Path(path) / SCORE_HEAD_FILE))
        (Path(path) / META_FILE).write_text(json.dumps(
            {"model": self.model_name, "head": self.head, "beta": self.beta, "reward": reward}, indent=1))


def require_trained(path: str) -> None:
    """One sentence, saying how to train it, unless ``path`` holds a trained reward model."""
    if not (Path(path) / "adapter_config.json").is_file():
        parent = Path(path).parent if Path(path).name == RM_DIR else Path("RUN_DIR")
        raise UserError(f"reward model {path!r} not found (no adapter_config.json); train it first: "
                        f"`rlhf train recipes/rm_arith.yaml --run-dir {parent}` writes "
                        f"{parent / RM_DIR}")


class RewardModelFn:
    """A trained reward model behind the TRL reward contract: ``fn(prompts, completions, **kw)``."""

    def __init__(self, path: str):
        require_trained(path)
        self.rm = RewardModel(path)
        self.rm.model.eval()
        self.__name__ = f"rm:{path}"

    @torch.no_grad()
    def __call__(self, prompts, completions, **_) -> list[float]:
        return self.rm.score(prompts, completions).tolist()
