"""`compiled` implementations: the plain twins under `torch.compile(dynamic=True)` (inductor on CPU and GPU).

dynamic=True marks sizes symbolic from the first compile, so a new packed-row width or token count reuses the
compiled code instead of recompiling every step. Compilation happens on the first call (seconds to a minute
per function on a small CPU), which is why `model.kernels: auto` does not pick these (docs/benchmarks.md).
torch._dynamo is imported only when a `compiled` op is built.
"""
from __future__ import annotations

from typing import Callable, Tuple

import torch
import torch.nn.functional as F


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    from megatron.model.norm import rms_norm
    return rms_norm(x, weight, eps)


def _rotary(q: torch.Tensor, k: torch.Tensor, position_ids: torch.Tensor, inv_freq: torch.Tensor
            ) -> Tuple[torch.Tensor, torch.Tensor]:
    from megatron.model.rotary import apply_rotary
    freqs = position_ids[..., None].float() * inv_freq
    emb = torch.cat((freqs, freqs), dim=-1)
    cos, sin = emb.cos().to(q.dtype), emb.sin().to(q.dtype)
    return apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)


def _swiglu(h: torch.Tensor) -> torch.Tensor:
    gate, up = h.chunk(2, dim=-1)
    return F.silu(gate) * up


def _gelu(h: torch.Tensor) -> torch.Tensor:
    return F.gelu(h)


def compile_fn(fn: Callable) -> Callable:
    """`torch.compile(fn, dynamic=True)`; compiled on first call."""
    return torch.compile(fn, dynamic=True)


def compiled_rms_norm() -> Callable:
    """(x [..., H], weight [H], eps) -> [..., H]: the compiled plain RMSNorm."""
    return compile_fn(_rms_norm)


def compiled_rotary() -> Callable:
    """(q [B,S,nq,hd], k [B,S,nkv,hd], position_ids [B,S], inv_freq [rot/2]) -> (q', k'): cos/sin and the
    rotation of both in one compiled region."""
    return compile_fn(_rotary)


def compiled_activation(swiglu: bool) -> Callable:
    """h -> activation(h): SwiGLU ([.., 2F] -> [.., F]) or exact GeLU, compiled."""
    return compile_fn(_swiglu if swiglu else _gelu)
