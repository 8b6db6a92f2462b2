"""Code execution reward: run the completion's Python program against input/output test cases."""
from __future__ import annotations

import json
import os
import re
import sys
from concurrent.futures import ThreadPoolExecutor

from rewards._text import completion_text
from rlhf.sandbox import Limits, limits_note, missing_layers, run_python

_FENCE = re.compile(r"```(?:python|py|python3)[ \t]*\n(.*?)```", re.DOTALL | re.IGNORECASE)
_warned = False


def extract_program(text: str) -> str:
    """The last ```python fenced block of ``text``, else the whole text."""
    blocks = _FENCE.findall(text)
    return blocks[-1] if blocks else text


def code_tests(prompts, completions, tests, **_) -> list[float | None]:
    """Fraction of test cases the completion's program passes, in [0, 1].

    Dataset column ``tests``: per row, a list of ``{"input": str, "output": str}`` cases (or that
    list as a JSON string, for CSV files). The program (the last ```python block of the completion,
    else the whole completion) is run once per case with ``input`` as its standard input; the case
    passes when what it prints equals ``output``, ignoring trailing whitespace on each line and
    trailing blank lines. The exit status is not looked at, and the expected output never enters the
    program's process, so a program cannot claim a pass (``sys.exit(0)``, an object equal to
    everything) without printing the right answer. A row with no cases scores None.

    Each run is a separate process under ``rlhf.sandbox`` limits (``code_tests.limits``: 2 s CPU,
    5 s wall clock, 512 MB for all its processes, 16 MB files, 16 processes, no network, a read-only
    root holding only the interpreter and its standard library, a 64 MB tmpfs as its only writable
    place, empty environment, ``python -I -S``); see that module for what holds on which machine.
    A program that breaks a limit fails that case. Cases run in parallel, up to one per CPU.
    """
    _warn_once()
    jobs = []
    for i, (completion, cases) in enumerate(zip(completions, tests)):
        program = extract_program(completion_text(completion))
        jobs += [(i, program, case) for case in _cases(cases, i)]
    counts = [[0, 0] for _ in completions]  # passed, total per sample
    with ThreadPoolExecutor(max_workers=max(os.cpu_count() or 1, 1)) as pool:
        for (i, _, _), ok in zip(jobs, pool.map(lambda job: _passes(*job[1:]), jobs)):
            counts[i][0] += ok
            counts[i][1] += 1
    return [passed / total if total else None for passed, total in counts]


def _passes(program: str, case: dict) -> bool:
    result = run_python(program, case["input"], code_tests.limits)
    return result.returncode is not None and _norm(result.stdout) == _norm(case["output"])


def _norm(text: str) -> str:
    return "\n".join(line.rstrip() for line in text.rstrip().splitlines())


def _cases(cases, row: int) -> list[dict]:
    if isinstance(cases, str):
        try:
            cases = json.loads(cases)
        except json.JSONDecodeError as exc:
            raise ValueError(f"column 'tests' of row {row} is a string but not JSON ({exc}); it must be a "
                             'list of {"input": ..., "output": ...} cases') from exc
    ok = isinstance(cases, (list, tuple)) and all(
        isinstance(c, dict) and isinstance(c.get("input"), str) and isinstance(c.get("output"), str)
        for c in cases)
    if not ok:
        raise ValueError(f"column 'tests' of row {row} must be a list of {{\"input\": str, \"output\": str}} "
                         f"cases, got {str(cases)[:80]!r}")
    return list(cases)


def _warn_once() -> None:
    global _warned
    if _warned:
        return
    _warned = True
    if missing_layers():
        print(f"code_tests: {limits_note()}", file=sys.stderr)


code_tests.limits = Limits()  # tests and users may set a smaller or larger one
