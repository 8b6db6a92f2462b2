"""Generic text rewards."""
from rewards._text import completion_text


def length_penalty(prompts, completions, max_chars: int = 200, **_) -> list[float]:
    """-(characters / max_chars), capped at -1: a gentle push towards brevity."""
    return [-min(len(completion_text(c)) / max_chars, 1.0) for c in completions]
