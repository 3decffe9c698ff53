"""`compiled` implementations: the plain twins under `torch.compile` (inductor on CPU and GPU).

Shapes: before each call the token dimensions (rows and width, or tokens) are marked dynamic
(`torch._dynamo.maybe_mark_dynamic`), so the first compile is already generic in them and a new packed-row
width or row count reuses the code; head counts and hidden sizes stay static. (dynamic=True would make every
size symbolic, and dynamo's duck sizing then ties equal sizes together, e.g. rows == kv heads, recompiling
when they part.) Each function compiles once with and once without grad mode (policy and frozen reference).
Compilation costs seconds to a minute per function on a small CPU and saves nothing over the `fused` kernels
there, which is why `model.kernels: auto` does not pick these (docs/benchmarks.md).
"""
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


def _mark_tokens(t: torch.Tensor, feature_dims: int) -> None:
    """Mark every dim of `t` but the last `feature_dims` as dynamic (no error when a size is 0 or 1)."""
    for d in range(t.dim() - feature_dims):
        torch._dynamo.maybe_mark_dynamic(t, d)


def compile_fn(fn: Callable) -> Callable:
    """`torch.compile(fn)`; compiled on first call (callers mark the token dims dynamic first)."""
    return torch.compile(fn)


def compiled_rms_norm() -> Callable:
    """(x [..., H], weight [H], eps) -> [..., H]: the compiled plain RMSNorm."""
    fn = compile_fn(_rms_norm)

    def run(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        _mark_tokens(x, 1)
        return fn(x, weight, eps)
    return run


def compiled_rotary() -> Callable:
    """(q [B,S,nq,hd], k [B,S,nkv,hd], position_ids [B,S], inv_freq [rot/2]) -> (q', k'): cos/sin and the
    rotation of both in one compiled region."""
    fn = compile_fn(_rotary)

    def run(q, k, position_ids, inv_freq):
        for t in (q, k):
            _mark_tokens(t, 2)
        _mark_tokens(position_ids, 0)
        return fn(q, k, position_ids, inv_freq)
    return run


def compiled_activation(swiglu: bool) -> Callable:
    """h -> activation(h): SwiGLU ([.., 2F] -> [.., F]) or exact GeLU, compiled."""
    fn = compile_fn(_swiglu if swiglu else _gelu)

    def run(h: torch.Tensor) -> torch.Tensor:
        _mark_tokens(h, 1)
        return fn(h)
    return run
