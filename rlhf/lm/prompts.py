"""Prompts in, token ids out (and completion ids back to text): chat-template rendering,
tokenisation, the ``max_prompt_length`` cut, left padding.

Single-turn: a conversation (a list of messages) is rendered once with the generation prompt
appended; plain text is taken as it is. A multi-turn source renders turn by turn and appends
ids, never re-rendering earlier turns (DESIGN.md, "A rollout is a contract").
"""
from __future__ import annotations

from torch import Tensor

from rlhf.errors import UserError


def render_prompt(tokenizer, prompt, chat_template_kwargs: dict | None = None) -> str:
    """The text the model sees for ``prompt``: itself if a string, else the conversation through
    the tokenizer's chat template with the assistant's turn opened (``chat_template_kwargs``:
    extra ``apply_chat_template`` arguments)."""
    if isinstance(prompt, str):
        return prompt
    if tokenizer.chat_template is None:
        raise UserError("the prompts are conversations but the tokenizer has no chat template; "
                        "use plain-text prompts or a model with a chat template")
    return tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True,
                                         **(chat_template_kwargs or {}))


def tokenize_prompts(tokenizer, texts: list[str], max_prompt_length: int = 0) -> tuple[Tensor, Tensor, int]:
    """``(ids, mask, cut)``: ``texts`` tokenised (no special tokens added: the template has them)
    and left-padded, each keeping its last ``max_prompt_length`` tokens (0: all); ``cut`` counts
    the texts that were longer."""
    if not max_prompt_length:
        enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        return enc.input_ids, enc.attention_mask, 0
    ids = tokenizer(texts, add_special_tokens=False).input_ids
    cut = sum(len(x) > max_prompt_length for x in ids)
    enc = tokenizer.pad({"input_ids": [x[-max_prompt_length:] for x in ids]}, return_tensors="pt", padding=True)
    return enc["input_ids"], enc["attention_mask"], cut


def decode_completions(tokenizer, completion_ids: Tensor, mask: Tensor) -> list[str]:
    """Each row's text: its tokens where ``mask`` is 1, special tokens dropped."""
    return [tokenizer.decode(ids[m.bool()], skip_special_tokens=True) for ids, m in zip(completion_ids, mask)]
