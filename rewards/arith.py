"""Rewards for the addition task."""
import re

from rewards._text import completion_text

_INT = re.compile(r"-?\d[\d,]*")


def last_integer(text: str) -> int | None:
    """The last integer written in ``text`` (thousands commas allowed), or None."""
    found = _INT.findall(text)
    if not found:
        return None
    digits = found[-1].replace(",", "")
    return int(digits) if digits.strip("-") else None


def arith_correct(prompts, completions, answer, **_) -> list[float]:
    """1.0 when the last integer in the completion equals the answer, else 0.0."""
    return [float(last_integer(completion_text(c)) == int(a)) for c, a in zip(completions, answer)]


def arith_format(prompts, completions, **_) -> list[float]:
    """Shaping: 1.0 when the completion is just a number (what the prompt asks for), else 0.0.

    Use with care: added to ``arith_correct`` at weight 0.5 on SmolLM2-135M, the policy learned
    to print a bare, wrong number (format 1.0, correctness 0.0 by step 18), so the main recipe
    does not use it.
    """
    return [float(re.fullmatch(r"\s*-?\d+\.?\s*", completion_text(c)) is not None) for c in completions]
