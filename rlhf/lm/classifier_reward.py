"""``rm:MODEL`` rewards: a reward model behind the reward-function contract.

``MODEL`` is either a directory written by ``algo: reward_model`` (a LoRA adapter with
``reward_model.json``: ``rlhf.lm.reward_model.RewardModelFn``), or a sequence classifier with one
output, as TRL's GRPOTrainer takes one by name: a Hub id (found in the Hugging Face cache, or
downloaded) or a checkpoint directory, loaded with ``AutoModelForSequenceClassification`` and its
own tokenizer. The classifier scores the text of prompt + completion: a conversation goes through
its tokenizer's chat template (prompt messages, then the completion as the assistant's), a plain
prompt is followed by the completion's text; the reward is the logit of its one label, read by the
model's own forward (the last token that is not padding).
"""
from __future__ import annotations

from pathlib import Path

import torch

from rewards import completion_text
from rlhf.errors import UserError
from rlhf.lm.models import looks_local, resolve_model
from rlhf.lm.reward_model import RM_DIR, RewardModelFn, require_trained


def load_reward_model(target: str):
    """The reward function ``rm:target`` names: one of ours, or a sequence classifier."""
    if is_ours(target):
        return RewardModelFn(target)  # (it says how to train one when the directory is missing)
    return SequenceClassifierReward(target)


def is_ours(target: str) -> bool:
    """Whether ``rm:target`` names a reward model trained here (``algo: reward_model``): its
    directory, or a local path that does not exist yet (to be trained)."""
    path = Path(target).expanduser()
    ours = (path / "adapter_config.json").is_file()
    missing_local = not path.exists() and (looks_local(target) or path.name == RM_DIR)
    return ours or missing_local or (path.is_dir() and not (path / "config.json").is_file())


def check_reward_model(target: str) -> None:
    """Before a run: a reward model of ours that is not trained yet stops with one sentence
    (a Hub classifier is checked when it loads)."""
    if is_ours(target):
        require_trained(target)


class SequenceClassifierReward:
    """A sequence-classification model with one output as ``fn(prompts, completions, **kw)``."""

    def __init__(self, name: str, batch_size: int = 16):
        import transformers

        try:
            path = resolve_model(name)
        except UserError as exc:
            raise UserError(f"reward model rm:{name}: {exc}") from None
        config = transformers.AutoConfig.from_pretrained(path)
        kinds = config.architectures or []
        if not any(k.endswith("ForSequenceClassification") for k in kinds):
            raise UserError(f"reward model rm:{name} is a {', '.join(kinds) or 'model of unknown architecture'}, "
                            "not a sequence classifier: its score head would be untrained noise; name a "
                            "*ForSequenceClassification checkpoint with one label, or a directory trained by "
                            "algo: reward_model")
        if config.num_labels != 1:
            raise UserError(f"reward model rm:{name} has {config.num_labels} labels; a reward is one number, so "
                            "it needs a sequence classifier with num_labels=1")
        transformers.logging.set_verbosity_error()
        self.tokenizer = transformers.AutoTokenizer.from_pretrained(path)
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.model = transformers.AutoModelForSequenceClassification.from_pretrained(
            path, use_safetensors=True).eval()  # (safetensors only: loading runs no code)
        if self.model.config.pad_token_id is None:  # how the forward finds each row's last token
            self.model.config.pad_token_id = self.tokenizer.pad_token_id
        self.batch_size = batch_size
        self.__name__ = f"rm:{name}"
        from accelerate import PartialState

        self.model.to(PartialState().device)

    def texts(self, prompts: list, completions: list) -> list[str]:
        """Each prompt + completion as the text the classifier reads."""
        out = []
        for p, c in zip(prompts, completions):
            if isinstance(p, str):
                out.append(p + completion_text(c))
                continue
            if self.tokenizer.chat_template is None:
                raise UserError(f"reward model {self.__name__} has no chat template for conversational prompts; "
                                "use plain-text prompts or a reward model whose tokenizer has one")
            reply = c if isinstance(c, list) else [{"role": "assistant", "content": c}]
            out.append(self.tokenizer.apply_chat_template(list(p) + list(reply), tokenize=False))
        return out

    @torch.no_grad()
    def __call__(self, prompts, completions, **_) -> list[float]:
        texts, scores = self.texts(prompts, completions), []
        for i in range(0, len(texts), self.batch_size):
            enc = self.tokenizer(texts[i:i + self.batch_size], return_tensors="pt", padding=True,
                                 padding_side="right", add_special_tokens=False).to(self.model.device)
            scores += self.model(**enc).logits[:, 0].float().tolist()
        return scores
