"""An LM policy: a causal LM with a LoRA adapter, turned into token log-probs.

Shapes: P prompts, G completions each, N = P * G rows, Lp prompt length (left-padded),
C completion length (right-padded after EOS). The reference policy is the same weights with
the adapter disabled, so it costs no second copy of the model.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from rlhf.core import selective_log_softmax
from rlhf.errors import UserError


@dataclass
class Rollout:
    """One batch of sampled completions (the LM's version of a gym rollout buffer)."""

    prompt_ids: Tensor        # [N, Lp] left-padded
    prompt_mask: Tensor       # [N, Lp]
    completion_ids: Tensor    # [N, C] right-padded
    mask: Tensor              # [N, C] 1 on real completion tokens (EOS included)
    truncated: Tensor         # [N] bool: hit max_new_tokens without EOS
    rollout_logp: Tensor | None = None  # [N, C] log-probs as seen while sampling

    def __len__(self) -> int:
        return self.prompt_ids.shape[0]

    def select(self, idx: Tensor | slice) -> "Rollout":
        pick = lambda t: None if t is None else t[idx]  # noqa: E731
        return Rollout(*(pick(getattr(self, f)) for f in self.__dataclass_fields__))


class LMPolicy:
    """Causal LM + LoRA. ``logp(rollout)`` is the only thing the trainer needs from it."""

    def __init__(self, model_path: str, *, lora_r: int = 16, lora_alpha: int = 32,
                 lora_dropout: float = 0.0, lora_targets: str | list[str] = "all-linear",
                 dtype: str = "float32", temperature: float = 1.0, adapter_path: str | None = None):
        import transformers
        from peft import LoraConfig, PeftModel, get_peft_model

        transformers.logging.set_verbosity_error()
        self.temperature = temperature
        self.tokenizer = transformers.AutoTokenizer.from_pretrained(model_path)
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        torch_dtype = getattr(torch, dtype, None)
        if not isinstance(torch_dtype, torch.dtype):
            raise UserError(f"dtype {dtype!r} is not a torch dtype; use float32 or bfloat16")
        base = transformers.AutoModelForCausalLM.from_pretrained(model_path, dtype=torch_dtype)
        if getattr(base.config, "quantization_config", None) is not None:
            raise UserError(f"checkpoint {model_path} is marked as quantised; re-save it without "
                            "quantization_config (rlhf model pull does this) to train it")
        self.eos_ids = _eos_ids(self.tokenizer, base)
        if adapter_path is not None:
            self.model = PeftModel.from_pretrained(base, adapter_path, is_trainable=True)
        else:
            cfg = LoraConfig(r=lora_r, lora_alpha=lora_alpha, lora_dropout=lora_dropout,
                             target_modules=lora_targets, task_type="CAUSAL_LM")
            self.model = get_peft_model(base, cfg)

    # ------------------------------------------------------------------ prompts
    def encode_prompts(self, prompts: list) -> tuple[Tensor, Tensor]:
        """Chat-template conversational prompts (lists of messages), tokenize, left-pad."""
        texts = [self.apply_template(p) for p in prompts]
        enc = self.tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        return enc.input_ids, enc.attention_mask

    def apply_template(self, prompt) -> str:
        if isinstance(prompt, str):
            return prompt
        if self.tokenizer.chat_template is None:
            raise UserError("the prompts are conversations but the tokenizer has no chat template; "
                            "use plain-text prompts or a model with a chat template")
        return self.tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)

    def decode(self, completion_ids: Tensor, mask: Tensor) -> list[str]:
        return [self.tokenizer.decode(ids[m.bool()], skip_special_tokens=True)
                for ids, m in zip(completion_ids, mask)]

    # ------------------------------------------------------------------ sampling
    @torch.no_grad()
    def generate(self, prompt_ids: Tensor, prompt_mask: Tensor, group_size: int,
                 max_new_tokens: int, greedy: bool = False, with_logp: bool = True,
                 adapter: bool = True) -> Rollout:
        """Sample ``group_size`` completions per prompt (rows of one prompt are contiguous);
        ``greedy`` decodes the argmax instead; ``adapter=False`` samples the reference."""
        was_training = self.model.training
        self.model.eval()
        kwargs = dict(do_sample=not greedy, max_new_tokens=max_new_tokens,
                      num_return_sequences=group_size, pad_token_id=self.tokenizer.pad_token_id,
                      eos_token_id=self.eos_ids, return_dict_in_generate=True,
                      output_scores=with_logp and not greedy)
        if not greedy:  # plain temperature sampling: no top-k / top-p truncation
            kwargs.update(temperature=self.temperature, top_k=0, top_p=1.0)
        if adapter:
            out = self.model.generate(input_ids=prompt_ids, attention_mask=prompt_mask, **kwargs)
        else:
            with self.model.disable_adapter():
                out = self.model.generate(input_ids=prompt_ids, attention_mask=prompt_mask, **kwargs)
        self.model.train(was_training)
        completion = out.sequences[:, prompt_ids.shape[1]:]
        mask, truncated = completion_mask(completion, self.eos_ids)
        rollout_logp = None
        if out.scores:
            # scores are the temperature-scaled logits the sampler used, one [N, V] per step
            scores = torch.stack(out.scores, dim=1)[:, : completion.shape[1]]
            rollout_logp = selective_log_softmax(scores, completion) * mask
        return Rollout(prompt_ids.repeat_interleave(group_size, 0),
                       prompt_mask.repeat_interleave(group_size, 0),
                       completion, mask, truncated, rollout_logp)

    # ------------------------------------------------------------------ log-probs
    def logp(self, batch: Rollout, adapter: bool = True) -> Tensor:
        """Log-probs [N, C] of the completion tokens under the policy (or the reference when
        ``adapter=False``), at the sampling temperature. The LM head runs only on the C
        positions that predict completion tokens, never on the prompt."""
        ids = torch.cat([batch.prompt_ids, batch.completion_ids[:, :-1]], dim=1)
        attn = torch.cat([batch.prompt_mask, batch.mask[:, :-1]], dim=1)
        # positions as generate() assigns them under left padding
        pos = (attn.cumsum(-1) - 1).clamp(min=0)
        c = batch.completion_ids.shape[1]
        if adapter:
            logits = self.model(input_ids=ids, attention_mask=attn, position_ids=pos,
                                logits_to_keep=c, use_cache=False).logits
        else:
            with self.model.disable_adapter():
                logits = self.model(input_ids=ids, attention_mask=attn, position_ids=pos,
                                    logits_to_keep=c, use_cache=False).logits
        logits = logits / self.temperature
        return selective_log_softmax(logits, batch.completion_ids) * batch.mask

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad]

    def adapter_norm(self) -> float:
        """L2 norm of the LoRA B matrices: 0 at init, so 0 after training means nothing moved."""
        sq = sum(float((p.detach().float() ** 2).sum()) for n, p in self.model.named_parameters()
                 if "lora_B" in n)
        return sq ** 0.5

    def save_adapter(self, path) -> None:
        self.model.save_pretrained(str(path), safe_serialization=True)


def _eos_ids(tokenizer, model) -> list[int]:
    ids = {tokenizer.eos_token_id}
    cfg_eos = getattr(model.generation_config, "eos_token_id", None)
    ids.update(cfg_eos if isinstance(cfg_eos, list) else [cfg_eos])
    return sorted(i for i in ids if i is not None)


def completion_mask(completion: Tensor, eos_ids: list[int]) -> tuple[Tensor, Tensor]:
    """1 on tokens up to and including the first EOS, 0 after it. Returns (mask, truncated)."""
    is_eos = torch.isin(completion, torch.tensor(eos_ids))
    seen_before = (is_eos.cumsum(-1) - is_eos.long()) > 0  # an EOS strictly earlier
    mask = (~seen_before).float()
    return mask, ~is_eos.any(-1)
