"""`compiled` implementations: the plain twins under `torch.compile` (inductor on CPU and GPU).

Shapes: torch's automatic dynamic shapes. The first call compiles for its sizes; the first call with other
sizes recompiles once with those dimensions symbolic (rows, width, tokens), after which any packed-row width
reuses the code. (dynamic=True from the start would also make the head counts symbolic, and dynamo's duck
sizing then ties equal sizes together, e.g. rows == kv heads, which recompiles when they part.) Each function
is compiled once with and once without grad mode (policy and frozen reference). Compilation costs seconds to
a minute per function on a small CPU and saves nothing over the `fused` kernels there, which is why
`model.kernels: auto` does not pick these (docs/benchmarks.md).
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
    """`torch.compile(fn)` (automatic dynamic shapes); compiled on first call."""
    return torch.compile(fn)


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
