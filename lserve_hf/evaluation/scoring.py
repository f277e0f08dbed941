"""RULER-style scoring: the fraction of expected strings found in the output (case-insensitive);
a case passes when every one of them is present."""

from __future__ import annotations


def score(output: str, expected) -> float:
    """Fraction of ``expected`` strings that appear in ``output``, ignoring case."""
    if isinstance(expected, str):
        expected = [expected]
    expected = list(expected)
    if not expected:
        raise ValueError("expected holds no answer string.")
    low = output.lower()
    return sum(e.lower() in low for e in expected) / len(expected)


def passed(output: str, expected) -> bool:
    """Every expected string is present."""
    return score(output, expected) == 1.0
