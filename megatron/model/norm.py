"""Normalisation layers: RMSNorm (Zhang & Sennrich 2019, as in Llama) and LayerNorm (Ba et al. 2016).

Both are one class, `Norm`, whose `kind` decides the math, so a stage module can inherit from it and keep the
canonical parameter names `weight` (and `bias` for layernorm) directly on itself.
"""
from __future__ import annotations

from typing import Any, Optional

import torch
from torch import nn
import torch.nn.functional as F

from megatron.mpu import copy_to_tp_region

from .kernels.norm import fused_rms_norm
from .kernels.registry import resolve_kernels

NORM_KINDS = ("rmsnorm", "layernorm")


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm with Hugging Face Llama's numerics.

    x: [..., H] any float dtype; weight: [H]. The variance is taken in fp32 and the normalised value is cast back
    to x's dtype *before* the weight multiply (as `LlamaRMSNorm` does). Returns [..., H] in x's dtype (or the
    promoted dtype of weight and x).
    """
    dtype = x.dtype
    x32 = x.float()
    variance = x32.pow(2).mean(-1, keepdim=True)
    return weight * (x32 * torch.rsqrt(variance + eps)).to(dtype)


def layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], eps: float) -> torch.Tensor:
    """LayerNorm over the last dim. x: [..., H]; weight, bias: [H]. Computed in fp32, returned in x's dtype."""
    dtype = x.dtype
    w = weight.float()
    b = bias.float() if bias is not None else None
    return F.layer_norm(x.float(), (x.shape[-1],), w, b, eps).to(dtype)


class Norm(nn.Module):
    """RMSNorm or LayerNorm over the hidden dim.

    Parameters: `weight` [H] (ones) and, for layernorm only, `bias` [H] (zeros). forward: x [..., H] -> [..., H].
    Under sequence parallelism (`sp_group` = the tensor-parallel group) the input is a sequence shard
    [B, S/tp, H] while the parameters are replicated, so each rank sees only part of their gradient; the
    parameters pass through `copy_to_tp_region` (identity forward, all-reduce backward) to sum it over the group.
    """

    def __init__(self, hidden_size: int, kind: str = "rmsnorm", eps: float = 1e-5, sp_group: Any = None,
                 kernel: str = "eager"):
        super().__init__()
        if kind not in NORM_KINDS:
            raise ValueError(f"norm kind {kind!r} is not one of {', '.join(NORM_KINDS)}")
        self.kind = kind
        self.eps = eps
        self.kernel = kernel
        # RMSNorm's implementation (megatron.model.kernels registry); LayerNorm is torch's native kernel in all.
        self._rms = rms_norm_kernel(kernel)
        self.weight = nn.Parameter(torch.ones(hidden_size))
        if kind == "layernorm":
            self.bias = nn.Parameter(torch.zeros(hidden_size))
        else:
            self.register_parameter("bias", None)
        self.sp_group = sp_group

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [..., H] -> [..., H], same dtype as x."""
        weight, bias = self.weight, self.bias
        if self.sp_group is not None:
            weight = copy_to_tp_region(weight, self.sp_group)
            bias = copy_to_tp_region(bias, self.sp_group) if bias is not None else None
        if self.kind == "rmsnorm":
            return self._rms(x, weight, self.eps)
        return layer_norm(x, weight, bias, self.eps)

    def extra_repr(self) -> str:
        return f"{self.kind}, hidden={self.weight.shape[0]}, eps={self.eps}, kernel={self.kernel}"


class RMSNorm(Norm):
    """RMSNorm: weight * x / sqrt(mean(x^2) + eps). x: [..., H] -> [..., H]."""

    def __init__(self, hidden_size: int, eps: float = 1e-5, sp_group: Any = None):
        super().__init__(hidden_size, "rmsnorm", eps, sp_group)


class LayerNorm(Norm):
    """LayerNorm with bias: weight * (x - mean) / sqrt(var + eps) + bias. x: [..., H] -> [..., H]."""

    def __init__(self, hidden_size: int, eps: float = 1e-5, sp_group: Any = None):
        super().__init__(hidden_size, "layernorm", eps, sp_group)


def rms_norm_kernel(kernel: str):
    """The RMSNorm function `(x, weight, eps) -> y` of registry choice `kernel` (eager | fused | compiled)."""
    if kernel == "eager":
        return rms_norm
    if kernel == "fused":
        return fused_rms_norm
    if kernel == "compiled":
        from .kernels.compiled import compiled_rms_norm
        return compiled_rms_norm()
    raise ValueError(f"norm kernel {kernel!r} is not one of eager, fused, compiled")


def build_norm(cfg, sp_group: Any = None) -> Norm:
    """The norm chosen by `cfg.model.norm` with eps `cfg.model.norm_eps` over `cfg.model.hidden_size`, implemented
    as the kernel registry says; `sp_group`: the TP group when sequence parallelism is on, else None."""
    m = cfg.model
    return Norm(m.hidden_size, m.norm, m.norm_eps, sp_group, kernel=resolve_kernels(cfg).norm)
