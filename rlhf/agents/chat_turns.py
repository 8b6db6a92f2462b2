"""The chat template applied turn by turn, token-in/token-out (DESIGN.md, "A rollout is a contract").

An episode's ids are built by appending: the first prompt (rendered with the generation prompt
open), then the policy's sampled ids as they are, then the environment's turn: the text the
template puts after the assistant's reply (its end of turn), the user's message holding the
observation, and the next generation prompt. Earlier turns are never re-rendered nor
re-tokenised, so the trainer sees exactly the ids the sampler conditioned on.

That is only the conversation the template would render if rendering a longer conversation
extends the text of the shorter one: the *prefix property*. Templates that drop or rewrite
earlier turns (thinking models that strip an earlier turn's reasoning) break it; each turn
checks it, and a template that breaks it is refused.
"""
from __future__ import annotations

from rlhf.errors import UserError


class ChatTurns:
    """Renders conversations with ``tokenizer``'s chat template (``template_kwargs``: extra
    ``apply_chat_template`` arguments) and turns an environment's reply into the ids that follow
    the policy's own."""

    def __init__(self, tokenizer, template_kwargs: dict | None = None):
        if tokenizer.chat_template is None:
            raise UserError("an agent recipe needs a model with a chat template (episodes are conversations); "
                            "this tokenizer has none")
        self.tokenizer, self.kwargs = tokenizer, dict(template_kwargs or {})
        self.eos_text = tokenizer.eos_token or ""

    def render(self, messages: list[dict], generation_prompt: bool) -> str:
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt,
                                                  **self.kwargs)

    def ids(self, text: str) -> list[int]:
        """``text`` tokenised as it is (the template wrote its special tokens into it)."""
        return self.tokenizer(text, add_special_tokens=False).input_ids

    def env_turn_text(self, messages: list[dict], reply: str, user: dict, ended: bool) -> str:
        """The text after the policy's reply ``reply`` to ``messages``, up to the next generation
        prompt: the template's end of the assistant's turn (less the end token the policy
        wrote itself when ``ended``), then ``user`` and the opened assistant turn. Refuses a
        template that breaks the prefix property."""
        opened = self.render(messages, True)
        closed = self.render(messages + [{"role": "assistant", "content": reply}], False)
        after = self.render(messages + [{"role": "assistant", "content": reply}, user], True)
        turn = closed[len(opened):]
        if not (closed.startswith(opened) and turn.startswith(reply) and after.startswith(closed)):
            raise UserError(prefix_error(opened, closed, after))
        tail = turn[len(reply):]
        if ended and self.eos_text and tail.startswith(self.eos_text):
            tail = tail[len(self.eos_text):]
        return tail + after[len(closed):]


def prefix_error(opened: str, closed: str, after: str) -> str:
    where = "the reply's turn" if not closed.startswith(opened) else "the next turn"
    shorter, longer = (opened, closed) if not closed.startswith(opened) else (closed, after)
    at = next((i for i, (a, b) in enumerate(zip(shorter, longer)) if a != b), len(shorter))
    return (f"the chat template breaks the prefix property a multi-turn episode needs: rendering {where} "
            f"rewrites earlier text (at character {at}: {shorter[at:at + 40]!r} became {longer[at:at + 40]!r}); "
            "use a template that keeps earlier turns as they were (such as one with thinking-trace stripping "
            "turned off through chat_template_kwargs) or a model whose template does")
