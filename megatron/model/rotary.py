"""Rotary position embeddings (RoFormer, Su et al. 2021, arXiv:2104.09864) in the GPT-NeoX / Hugging Face
`rotate_half` layout, with partial rotary (only the first `rot_dim` dims of each head rotate) and the
`linear` (Chen et al. 2023, position interpolation) and `llama3` frequency scalings computed exactly as
`transformers.modeling_rope_utils` does.

cos/sin are produced per token from `position_ids` [B, S], so positions restart inside a packed row.
"""
from __future__ import annotations

import math
from typing import Any, Dict, Optional, Tuple

import torch
from torch import nn

ROPE_TYPES = ("default", "linear", "llama3")


def rotary_dim(head_dim: int, rotary_pct: float) -> int:
    """Number of rotated dims per head: int(head_dim * rotary_pct) (as HF's partial_rotary_factor)."""
    return int(head_dim * rotary_pct)


def rope_type_of(rope_scaling: Optional[Dict[str, Any]]) -> str:
    """The scaling type of an HF-style `rope_scaling` dict ('rope_type' or legacy 'type'); 'default' if None."""
    if not rope_scaling:
        return "default"
    return str(rope_scaling.get("rope_type", rope_scaling.get("type", "default")))


def compute_inv_freq(rot_dim: int, theta: float, rope_scaling: Optional[Dict[str, Any]] = None) -> torch.Tensor:
    """Inverse frequencies [rot_dim // 2] fp32: theta ** (-2i / rot_dim), then scaled per `rope_scaling`.

    linear: inv_freq / factor.
    llama3: wavelengths longer than original_max_position_embeddings / low_freq_factor are divided by factor,
    shorter than .../high_freq_factor kept, and those in between interpolated smoothly.
    """
    if rot_dim == 0:
        return torch.zeros(0, dtype=torch.float, device="cpu")
    # Always a real CPU tensor, even inside `with torch.device("meta")` (deferred model builds): it is a plain
    # attribute that no state dict or to_empty() restores.
    inv_freq = 1.0 / (theta ** (torch.arange(0, rot_dim, 2, dtype=torch.int64, device="cpu").float() / rot_dim))
    kind = rope_type_of(rope_scaling)
    if kind == "default":
        return inv_freq
    if kind == "linear":
        return inv_freq / float(rope_scaling["factor"])
    if kind == "llama3":
        factor = float(rope_scaling["factor"])
        low = float(rope_scaling["low_freq_factor"])
        high = float(rope_scaling["high_freq_factor"])
        old_ctx = float(rope_scaling["original_max_position_embeddings"])
        low_wavelen, high_wavelen = old_ctx / low, old_ctx / high
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
        smooth = (old_ctx / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
        return torch.where(medium, smoothed, scaled)
    raise ValueError(f"rope_scaling type {kind!r} is not supported; use one of {', '.join(ROPE_TYPES)}")


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """[x1, x2] -> [-x2, x1] over the last dim (halves, not interleaved pairs). x: [..., d] -> [..., d]."""
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the first rot_dim dims of every head; the rest pass through.

    x: [B, S, heads, hd]; cos, sin: [B, S, rot_dim] in x's dtype. Returns [B, S, heads, hd].
    """
    rot = cos.shape[-1]
    if rot == 0:
        return x
    cos, sin = cos.unsqueeze(2), sin.unsqueeze(2)
    x_rot, x_pass = x[..., :rot], x[..., rot:]
    x_rot = x_rot * cos + rotate_half(x_rot) * sin
    return torch.cat((x_rot, x_pass), dim=-1) if x_pass.shape[-1] else x_rot


class RotaryEmbedding(nn.Module):
    """Holds inv_freq and makes cos/sin.

    inv_freq is a plain fp32 tensor attribute, not a buffer: it never appears in a state dict and a
    `model.bfloat16()` / DeepSpeed half cast cannot round it (bf16 frequencies would corrupt long positions).

    forward(position_ids [B, S] long, dtype) -> (cos, sin), each [B, S, rot_dim] in `dtype`, computed in fp32.
    """

    def __init__(self, head_dim: int, rotary_pct: float = 1.0, theta: float = 10000.0,
                 rope_scaling: Optional[Dict[str, Any]] = None):
        super().__init__()
        self.rot_dim = rotary_dim(head_dim, rotary_pct)
        self.inv_freq = compute_inv_freq(self.rot_dim, theta, rope_scaling)

    def forward(self, position_ids: torch.Tensor, dtype: torch.dtype = torch.float) -> Tuple[torch.Tensor, torch.Tensor]:
        """position_ids [B, S] -> (cos, sin) [B, S, rot_dim]; the two halves repeat the same frequencies."""
        if self.inv_freq.device != position_ids.device:  # moved once, kept fp32
            self.inv_freq = self.inv_freq.to(position_ids.device)
        freqs = position_ids[..., None].float() * self.inv_freq
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(dtype), emb.sin().to(dtype)

    @classmethod
    def from_config(cls, cfg) -> "RotaryEmbedding":
        """Built from cfg.derived.head_dim, cfg.model.{rotary_pct, rope_theta, rope_scaling}."""
        m = cfg.model
        return cls(cfg.derived.head_dim, m.rotary_pct, m.rope_theta, m.rope_scaling)
