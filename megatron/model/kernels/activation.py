"""SwiGLU fast path: `silu(gate) * up` as one autograd node that saves only its input.

The plain twin (`F.silu(gate) * up` after `h.chunk(2)`) keeps gate, silu(gate) and up for backward (3F per
token) and its backward concatenates two gradients; here the input h = [gate | up] (2F) is saved and the
gradient is written straight into one [.., 2F] tensor: d gate = silu'(gate) * g * up (aten's silu_backward),
d up = g * silu(gate). GeLU has no separate fast path: `F.gelu` is one native kernel with its own backward.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


class _FusedSwiGLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h: torch.Tensor) -> torch.Tensor:
        gate, up = h.chunk(2, dim=-1)
        ctx.save_for_backward(h)
        return F.silu(gate).mul_(up)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        (h,) = ctx.saved_tensors
        gate, up = h.chunk(2, dim=-1)
        out = torch.empty_like(h)
        f = gate.shape[-1]
        torch.ops.aten.silu_backward(grad * up, gate, grad_input=out[..., :f])
        torch.mul(F.silu(gate), grad, out=out[..., f:])
        return out


def fused_swiglu(h: torch.Tensor) -> torch.Tensor:
    """h [..., 2F] = [gate | up] -> silu(gate) * up [..., F]; the same values and gradients as the plain twin."""
    return _FusedSwiGLU.apply(h)


def swiglu(h: torch.Tensor) -> torch.Tensor:
    """Plain twin: h [..., 2F] = [gate | up] -> silu(gate) * up [..., F]."""
    gate, up = h.chunk(2, dim=-1)
    return F.silu(gate) * up
