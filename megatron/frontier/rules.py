"""The per-unit filter rules: refusal phrases, length bounds, score bounds, top fraction per prompt.

Pure functions of one text / number (the top fraction: of one prompt's scores); `megatron.frontier.filter`
applies them in order. Text matching works on `normalise_text`: lower case, curly quotes made straight,
whitespace runs collapsed to one space.
"""
from __future__ import annotations

import math
import os
import re
from typing import List, Optional, Sequence

SHIPPED_PHRASES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "refusal_phrases.txt")
_QUOTES = str.maketrans({"\u2018": "'", "\u2019": "'", "\u201c": '"', "\u201d": '"'})
_SPACE = re.compile(r"\s+")


def normalise_text(text: str) -> str:
    """Lower-cased `text` with curly quotes straightened and whitespace collapsed (str -> str)."""
    return _SPACE.sub(" ", text.translate(_QUOTES).lower()).strip()


def load_phrases(path: Optional[str] = None) -> List[str]:
    """Normalised phrases of `path` (default: the shipped refusal_phrases.txt), one per line.

    Blank lines and lines starting with '#' are skipped. Raises ValueError naming the file when it holds none.
    """
    path = path or SHIPPED_PHRASES
    if not os.path.isfile(path):
        raise ValueError(f"--refusal-phrases: phrase file {path!r} does not exist")
    with open(path, "r", encoding="utf-8") as fh:
        phrases = [normalise_text(line) for line in fh if line.strip() and not line.lstrip().startswith("#")]
    if not phrases:
        raise ValueError(f"--refusal-phrases: {path!r} holds no phrases (one per line, '#' comments)")
    return phrases


class RefusalRule:
    """Finds the first listed phrase that occurs in a text (case- and whitespace-insensitive)."""

    def __init__(self, phrases: Sequence[str]):
        """phrases: already normalised (see `load_phrases`)."""
        self.phrases = list(phrases)

    def match(self, text: str) -> Optional[str]:
        """The first phrase contained in `text`, or None."""
        norm = normalise_text(text)
        return next((p for p in self.phrases if p in norm), None)


def length_verdict(length: int, low: Optional[int], high: Optional[int]) -> Optional[str]:
    """'too_short' when length < low, 'too_long' when length > high (bounds inclusive, None = unbounded), else None."""
    if low is not None and length < low:
        return "too_short"
    if high is not None and length > high:
        return "too_long"
    return None


def score_verdict(score: Optional[float], low: Optional[float], high: Optional[float]) -> Optional[str]:
    """'unscored' for a None score, 'score_low' below `low`, 'score_high' above `high` (inclusive bounds), else None."""
    if score is None:
        return "unscored"
    if low is not None and score < low:
        return "score_low"
    if high is not None and score > high:
        return "score_high"
    return None


def top_fraction_keep(scores: Sequence[float], fraction: float) -> List[bool]:
    """Which of one prompt's units to keep: the ceil(fraction * k) highest of its k scores.

    Ties are broken by position (the earlier unit wins), so the result is deterministic. fraction in (0, 1].
    Returns one bool per score.
    """
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"--top-fraction must be in (0, 1], got {fraction!r}")
    k = len(scores)
    keep_n = math.ceil(fraction * k - 1e-9)  # 0.5 * 4 is 2, not 3 after rounding noise
    order = sorted(range(k), key=lambda i: (-scores[i], i))
    keep = [False] * k
    for i in order[:keep_n]:
        keep[i] = True
    return keep
