"""Helpers shared by the metric modules."""

from __future__ import annotations

from typing import Sequence


def require_answers(answers: Sequence[str]) -> list[str]:
    """Return ``answers`` as a list, rejecting a bare string or an empty list."""
    if isinstance(answers, str):
        raise TypeError("answers must be a sequence of strings, not a single str")
    answers = list(answers)
    if not answers:
        raise ValueError("answers must contain at least one reference answer")
    return answers
