"""Rotary fast path: q and k rotated in one autograd node from half-width cos/sin tables.

The plain twin (`megatron.model.rotary.apply_rotary`) builds `rotate_half(x)` with a negation and a
concatenation and keeps the sliced inputs for backward. Here, with h = rot_dim / 2 and (c, s) the cos/sin of
the h frequencies:  y1 = x1 c - x2 s,  y2 = x2 c + x1 s,  the rest of the head passes through. The rotation is
orthogonal, so the backward is the rotation by -s: only (c, s) are saved, shared by q and k.
"""
from __future__ import annotations

from typing import Callable, Tuple

import torch


def _rotate_into(out: torch.Tensor, x: torch.Tensor, c: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """out[..., :2h] = rotation of x[..., :2h] by (c, s) (s may be negated by the caller); the rest copied.

    x, out: [B, S, heads, hd]; c, s: [B, S, 1, h]. Returns out.
    """
    h = c.shape[-1]
    x1, x2 = x[..., :h], x[..., h:2 * h]
    o1, o2 = out[..., :h], out[..., h:2 * h]
    torch.mul(x1, c, out=o1)
    o1.addcmul_(x2, s, value=-1.0)
    torch.mul(x2, c, out=o2)
    o2.addcmul_(x1, s)
    if 2 * h < x.shape[-1]:
        out[..., 2 * h:] = x[..., 2 * h:]
    return out


class _FusedRotary(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q: torch.Tensor, k: torch.Tensor, c: torch.Tensor, s: torch.Tensor):
        ctx.save_for_backward(c, s)
        return (_rotate_into(torch.empty_like(q, memory_format=torch.contiguous_format), q, c, s),
                _rotate_into(torch.empty_like(k, memory_format=torch.contiguous_format), k, c, s))

    @staticmethod
    def backward(ctx, gq: torch.Tensor, gk: torch.Tensor):
        c, s = ctx.saved_tensors
        neg = -s
        out_q = None if gq is None else _rotate_into(torch.empty_like(gq), gq, c, neg)
        out_k = None if gk is None else _rotate_into(torch.empty_like(gk), gk, c, neg)
        return out_q, out_k, None, None


def fused_rotary(q: torch.Tensor, k: torch.Tensor, cos_half: torch.Tensor,
                 sin_half: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Rotate the first rot_dim dims of every q and k head (rotate_half layout); the rest pass through.

    q: [B, S, nq, hd], k: [B, S, nkv, hd]; cos_half, sin_half: [B, S, rot_dim/2] in q's dtype (the h distinct
    frequencies; the plain twin's [B, S, rot_dim] tables repeat them twice). Returns (q', k'), same shapes;
    the same values and gradients as `apply_rotary(q, cat(c, c), cat(s, s))` and the same for k.
    """
    if cos_half.shape[-1] == 0:
        return q, k
    c, s = cos_half.unsqueeze(2), sin_half.unsqueeze(2)
    return _FusedRotary.apply(q, k, c, s)


def _device_inv_freq(rotary, device: torch.device) -> torch.Tensor:
    """rotary.inv_freq on `device` (moved once and kept fp32, as RotaryEmbedding.forward does)."""
    if rotary.inv_freq.device != device:
        rotary.inv_freq = rotary.inv_freq.to(device)
    return rotary.inv_freq


def _eager(rotary, q: torch.Tensor, k: torch.Tensor, position_ids: torch.Tensor):
    from ..rotary import apply_rotary
    cos, sin = rotary(position_ids, q.dtype)
    return apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)


def _fused(rotary, q: torch.Tensor, k: torch.Tensor, position_ids: torch.Tensor):
    freqs = position_ids[..., None].float() * _device_inv_freq(rotary, position_ids.device)  # [B, S, rot/2]
    return fused_rotary(q, k, freqs.cos().to(q.dtype), freqs.sin().to(q.dtype))


def rotary_kernel(kernel: str) -> Callable:
    """`(rotary: RotaryEmbedding, q [B,S,nq,hd], k [B,S,nkv,hd], position_ids [B,S]) -> (q', k')` for registry
    choice `kernel` (eager | fused | compiled); all give the rotation of `megatron.model.rotary`."""
    if kernel == "eager":
        return _eager
    if kernel == "fused":
        return _fused
    if kernel == "compiled":
        from .compiled import compiled_rotary
        fn = compiled_rotary()
        return lambda rotary, q, k, pos: fn(q, k, pos, _device_inv_freq(rotary, pos.device))
    raise ValueError(f"rotary kernel {kernel!r} is not one of eager, fused, compiled")
