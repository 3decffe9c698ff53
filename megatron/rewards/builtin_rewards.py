"""Built-in reward functions: `exact_match` and `math` (math-verify). Each is a factory registered by name that
takes the `reward:` config section and returns a function with TRL's signature (see sources.py).

Both compare each completion with the prompt record's reference answer, the column `reward.answer_field`
(default 'answer'); a record whose answer is None (or, for math, not parseable) is not scored (None).
"""
from __future__ import annotations

import threading
from typing import Any, Callable, List, Optional

from megatron.config import ConfigError

from .registry import register_reward


def _answers(columns: dict, field: str, fn_name: str) -> list:
    if field not in columns:
        raise KeyError(f"{fn_name} compares with the column '{field}' (reward.answer_field), but the prompt records "
                       f"have only: {', '.join(sorted(c for c in columns if c != 'completion_ids')) or 'none'}")
    return columns[field]


def normalise_text(text: Any) -> str:
    """Whitespace-insensitive form used by exact_match: runs of whitespace -> one space, ends stripped."""
    return " ".join(str(text).split())


@register_reward("exact_match")
def make_exact_match(reward_cfg: Any) -> Callable[..., List[Optional[float]]]:
    """1.0 when the completion equals the reference answer up to whitespace (`normalise_text`), else 0.0."""
    field = reward_cfg.answer_field

    def exact_match(prompts, completions, **columns) -> List[Optional[float]]:
        answers = _answers(columns, field, "exact_match")
        return [None if a is None else float(normalise_text(c) == normalise_text(a))
                for c, a in zip(completions, answers)]

    return exact_match


@register_reward("math")
def make_math(reward_cfg: Any) -> Callable[..., List[Optional[float]]]:
    """math-verify equivalence of the completion's final answer with the reference (as TRL's accuracy_reward):
    1.0 / 0.0, None when the reference does not parse. Needs `pip install math-verify`."""
    try:
        from math_verify import parse, verify
    except ImportError:
        raise ConfigError("key 'reward.function': the built-in 'math' needs math-verify; "
                          "pip install math-verify") from None
    field = reward_cfg.answer_field

    def math_reward(prompts, completions, **columns) -> List[Optional[float]]:
        answers = _answers(columns, field, "math")
        # math-verify times out with signal.alarm, which only works in the main thread
        timeout = 5 if threading.current_thread() is threading.main_thread() else None
        out: List[Optional[float]] = []
        for completion, answer in zip(completions, answers):
            gold = parse(str(answer), parsing_timeout=timeout) if answer is not None else []
            if not gold:
                out.append(None)
                continue
            pred = parse(str(completion), parsing_timeout=timeout)
            out.append(float(verify(gold, pred, timeout_seconds=timeout)))
        return out

    return math_reward
