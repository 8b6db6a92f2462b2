"""A TRL ``environment_factory`` class as a text environment, unchanged: one instance per episode,
``reset(**row)`` returning text (or None), its public methods the tools the model may call.

A reply holding a tool call -- ``{"name": ..., "arguments": {...}}``, bare or inside
``<tool_call>...</tool_call>`` -- calls that method; what it returns (or the error it raises) is
the next observation. A reply without a tool call is the model's answer and ends the episode.
The return is the environment's ``reward`` attribute (0 without one) however the episode ends:
each step's reward is the change of that attribute.

What differs from TRL: the tools are described in the instructions (each method's name,
parameters and docstring) and their results come back as user messages, so a model whose chat
template has no tool role works too; the template's own tool format is not used.
"""
from __future__ import annotations

import inspect
import json
import re

TOOL_CALL = re.compile(r"<tool_call>\s*(\{.*?\})\s*</tool_call>|(\{.*\})", re.S)


def is_tool_environment(cls) -> bool:
    """A TRL-style environment: ``reset`` and no ``step``."""
    return callable(getattr(cls, "reset", None)) and not callable(getattr(cls, "step", None))


def tool_methods(env) -> dict:
    return {n: m for n, m in inspect.getmembers(env, callable) if not n.startswith("_") and n != "reset"}


def parse_tool_call(text: str) -> tuple[str, dict] | None:
    """``(name, arguments)`` of the first tool call in ``text``, None when it holds none."""
    for m in TOOL_CALL.finditer(text):
        try:
            call = json.loads(m.group(1) or m.group(2))
        except json.JSONDecodeError:
            continue
        if isinstance(call, dict) and isinstance(call.get("name"), str):
            args = call.get("arguments", {})
            return call["name"], args if isinstance(args, dict) else {}
    return None


class ToolEnvironment:
    """``cls(**kwargs)`` (a TRL environment) behind the text-environment API (``rlhf.agents.text_envs``)."""

    def __init__(self, cls, **kwargs):
        self.env = cls(**kwargs)
        self.tools = {n: f for n, f in tool_methods(self.env).items() if n != "reward"}
        lines = [f"- {n}{inspect.signature(f)}: {inspect.getdoc(f) or ''}".rstrip(": ") for n, f in self.tools.items()]
        self.instructions = ("You can call these tools, one per reply, as "
                             '<tool_call>{"name": NAME, "arguments": {...}}</tool_call>; a reply without a tool '
                             "call is your final answer.\n" + "\n".join(lines))

    def reset(self, seed: int | None = None, options: dict | None = None) -> tuple[str, dict]:
        params = inspect.signature(self.env.reset).parameters
        takes_seed = "seed" in params or any(p.kind is p.VAR_KEYWORD for p in params.values())
        text = self.env.reset(seed=seed) if takes_seed else self.env.reset()
        return text or "", {"valid_actions": None}

    def reward(self) -> float:
        return float(getattr(self.env, "reward", 0.0) or 0.0)

    def step(self, action: str):
        before, call = self.reward(), parse_tool_call(action)
        if call is None:  # the answer
            return "", self.reward() - before, True, False, {}
        name, args = call
        if name not in self.tools:
            return f"Error: no tool {name!r}; tools: {', '.join(self.tools)}", 0.0, False, False, \
                {"invalid_action": True}
        try:
            result = str(self.tools[name](**args))
        except Exception as exc:  # the tool's own error is the model's observation, as in TRL
            result = f"Error: {type(exc).__name__}: {exc}"
        return result, self.reward() - before, False, False, {}
