"""Built-in reward functions, named by their short name in recipes (``rewards: [arith_correct]``).

Every function follows TRL's contract: ``fn(prompts, completions, **columns) -> list[float | None]``
with completions as strings, or as message lists (``[{"role": "assistant", "content": ...}]``)
for conversational prompts. ``None`` means "not applicable to this sample".
"""
from rewards._text import completion_text
from rewards.arith import arith_correct, arith_format, last_integer
from rewards.code import code_tests
from rewards.env import env_return, env_success
from rewards.math import math_correct, think_format
from rewards.text import length_penalty

REGISTRY = {f.__name__: f for f in (arith_correct, arith_format, code_tests, env_return, env_success,
                                         length_penalty, math_correct, think_format)}

__all__ = ["REGISTRY", "arith_correct", "arith_format", "code_tests", "completion_text", "env_return", "env_success",
           "last_integer", "length_penalty", "math_correct", "think_format"]
