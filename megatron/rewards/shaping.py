"""Reward shaping that depends on the completion, not on its content: DAPO's soft overlong punishment.

Yu et al. 2025, "DAPO: An Open-Source LLM Reinforcement Learning System at Scale" (arXiv:2503.14476), eq. 13, with
L_max the generation budget (generation.max_new_tokens) and L_cache the buffer (rollout.overlong_buffer):

    R_length(y) = 0                                  |y| <= L_max - L_cache
                = ((L_max - L_cache) - |y|) / L_cache    L_max - L_cache < |y| <= L_max
                = -1                                 |y| > L_max

scaled by rollout.overlong_penalty and added to the reward.
"""
from __future__ import annotations

import torch


def overlong_penalty(lengths: torch.Tensor, max_len: int, buffer: int, penalty: float = 1.0) -> torch.Tensor:
    """DAPO's soft overlong punishment (module docstring) -> Float64[N], in [-penalty, 0].

    Args: lengths Long[N] (completion lengths in tokens), max_len L_max, buffer L_cache (0 = off: all zeros),
    penalty (the value at max_len).
    """
    lengths = lengths.to(torch.float64)
    if buffer <= 0:
        return torch.zeros_like(lengths)
    if buffer > max_len:
        raise ValueError(f"overlong_penalty: buffer {buffer} exceeds max_len {max_len}")
    excess = (lengths - (max_len - buffer)).clamp(min=0.0)
    return -penalty * (excess / buffer).clamp(max=1.0)
