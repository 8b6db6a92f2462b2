"""Rewards for grade-school math in the GSM8K format (``answer`` column: a worked solution
ending in ``#### N``, or just ``N``), and an R1-style format reward.

Equivalence is decided by the ``math-verify`` package (the checker TRL's and open-r1's
accuracy rewards use): ``1/2``, ``0.5`` and ``\\frac{1}{2}`` are the same answer, ``1,000``
is ``1000``. Install it with ``pip install 'rlhf[math]'`` (or ``pip install math-verify``).
"""
import re

from rewards._text import completion_text
from rlhf.errors import UserError

_THINK = re.compile(r"\s*<think>(?:(?!<think>).)*?</think>\s*(\S.*)", re.DOTALL)
_BOXED = re.compile(r"\\boxed\{((?:[^{}]|\{[^{}]*\})*)\}")
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?(?:/\d+)?")


def reference_answer(answer: str) -> str:
    """The final answer of a GSM8K solution: what follows the last ``####`` (else the text)."""
    return str(answer).rpartition("####")[2].strip()


def final_answer(text: str) -> str | None:
    """The answer a completion gives: after its ``</think>`` if it has one, the text after the
    last ``####``, else the last ``\\boxed{...}``, else the last number; None if there is none."""
    text = text.rpartition("</think>")[2]
    if "####" in text:
        return text.rpartition("####")[2].strip() or None
    boxed = _BOXED.findall(text)
    if boxed:
        return boxed[-1].strip()
    numbers = _NUMBER.findall(text)
    return numbers[-1] if numbers else None


def _math_verify():
    try:
        import math_verify
    except ImportError:
        raise UserError("reward math_correct needs the math-verify package: pip install 'rlhf[math]' "
                        "(or pip install math-verify)") from None
    return math_verify


def math_correct(prompts, completions, answer, **_) -> list[float]:
    """1.0 when the completion's final answer (``final_answer``) equals the reference's
    (``reference_answer``) by math-verify, else 0.0 (also when no answer is found)."""
    mv = _math_verify()
    out = []
    for c, a in zip(completions, answer):
        given = final_answer(completion_text(c))
        gold = mv.parse(reference_answer(a))
        pred = mv.parse(given) if given else []
        out.append(float(bool(gold) and bool(pred) and mv.verify(gold, pred)))
    return out


math_correct.requires = ("math_verify",)  # checked by the preflight before a run directory exists


def think_format(prompts, completions, **_) -> list[float]:
    """R1-style format: 1.0 when the completion is one ``<think>...</think>`` block followed by a
    non-empty answer, else 0.0 (no tags, an unclosed block, nothing after it, a second block)."""
    out = []
    for c in completions:
        m = _THINK.fullmatch(completion_text(c))
        out.append(float(m is not None and "<think>" not in m.group(1) and "</think>" not in m.group(1)))
    return out
