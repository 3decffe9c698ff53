"""RMSNorm fast path: one autograd node that saves only the input and the per-token 1/rms, with the
gradient written out by hand (the plain twin `megatron.model.norm.rms_norm` records ~6 nodes and keeps 3-4
activation-sized tensors for backward). Numerics follow Hugging Face Llama: statistics in fp32, the normalised
value cast to the input dtype before the weight multiply.

LayerNorm has no separate fast path: `torch.nn.functional.layer_norm` is already one native kernel with its
own backward, so the plain twin is the fast path.
"""
from __future__ import annotations

import torch


class _FusedRMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        x32 = x.float()
        rstd = torch.rsqrt(x32.square().mean(-1, keepdim=True).add_(eps))  # [..., 1] fp32
        normed = x32 * rstd
        ctx.save_for_backward(x, weight, rstd)
        if x.dtype == torch.float32 and weight.dtype == torch.float32:
            return normed.mul_(weight)  # in place: one activation-sized allocation
        return weight * normed.to(x.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, weight, rstd = ctx.saved_tensors
        normed = x.float() * rstd  # recomputed: cheaper than keeping it
        grad_w = None
        if ctx.needs_input_grad[1]:
            # y = weight * normed.to(dtype): the weight sees the rounded normalised value
            grad_w = (grad * normed.to(x.dtype)).reshape(-1, x.shape[-1]).sum(0, dtype=torch.float32)
            grad_w = grad_w.to(weight.dtype)
        grad_x = None
        if ctx.needs_input_grad[0]:
            gn = (grad * weight).float()  # d/d normed
            dot = (gn * normed).mean(-1, keepdim=True)
            # d normed_i / d x_j = rstd (delta_ij - normed_i normed_j / H)
            grad_x = gn.sub_(normed.mul_(dot)).mul_(rstd).to(x.dtype)
        return grad_x, grad_w, None


def fused_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm `weight * (x / sqrt(mean(x^2) + eps)).to(x.dtype)`; x `[..., H]`, weight `[H]` -> `[..., H]`.

    The same values and gradients as `megatron.model.norm.rms_norm` (its plain twin)."""
    return _FusedRMSNorm.apply(x, weight, eps)
