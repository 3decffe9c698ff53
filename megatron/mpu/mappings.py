"""Autograd-aware communication for tensor and sequence parallelism; the group is passed explicitly.

Tensor parallelism (Shoeybi et al. 2019, sec. 3, the `f` and `g` operators):
- `copy_to_tp_region`: forward identity, backward all-reduce (`f`, before a column-parallel matmul).
- `reduce_from_tp_region`: forward all-reduce, backward identity (`g`, after a row-parallel matmul).
- `scatter_to_tp_region` / `gather_from_tp_region`: split / all-gather along the LAST dim.

Sequence parallelism (Korthikanti et al. 2022, sec. 4.2.2), for activations laid out `[B, S, H]`,
splitting the SEQUENCE dimension, dim 1 by default (Megatron uses `[S, B, H]` and dim 0):
- `scatter_to_sequence_parallel_region`: keep this rank's S/tp slice; backward all-gather.
- `gather_from_sequence_parallel_region`: all-gather `[B, S/tp, H] -> [B, S, H]`; backward
  reduce-scatter (the consumer is tensor-parallel, each rank holds a partial input gradient) or, with
  `tensor_parallel_output_grad=False`, a plain split (the consumer is replicated).
- `reduce_scatter_to_sequence_parallel_region`: reduce-scatter `[B, S, H] -> [B, S/tp, H]`;
  backward all-gather (replaces the all-reduce `g`).

Every function is the identity when `group` is None or has one rank.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist


def group_size(group: Any) -> int:
    """Number of ranks in `group`; 1 when `group` is None (no communication)."""
    return 1 if group is None else dist.get_world_size(group)


def group_rank(group: Any) -> int:
    """This process's rank inside `group`; 0 when `group` is None."""
    return 0 if group is None else dist.get_rank(group)


def _all_reduce(x: torch.Tensor, group: Any) -> torch.Tensor:
    """Sum of `x` over the group, as a new tensor (the input is never modified)."""
    out = x.clone(memory_format=torch.contiguous_format)
    dist.all_reduce(out, group=group)
    return out


def _split(x: torch.Tensor, dim: int, group: Any) -> torch.Tensor:
    """This rank's contiguous 1/size slice of `x` along `dim`."""
    size = group_size(group)
    if x.shape[dim] % size != 0:
        raise ValueError(f"dimension {dim} of shape {tuple(x.shape)} is not divisible by the group size {size}")
    return x.chunk(size, dim=dim)[group_rank(group)].contiguous()


def _gather(x: torch.Tensor, dim: int, group: Any) -> torch.Tensor:
    """Concatenation along `dim` of every rank's `x` (rank order)."""
    x = x.contiguous()
    parts = [torch.empty_like(x) for _ in range(group_size(group))]
    dist.all_gather(parts, x, group=group)
    return torch.cat(parts, dim=dim)


def _reduce_scatter(x: torch.Tensor, dim: int, group: Any) -> torch.Tensor:
    """Sum over the group of `x`, of which this rank keeps its 1/size slice along `dim`."""
    size = group_size(group)
    if x.shape[dim] % size != 0:
        raise ValueError(f"dimension {dim} of shape {tuple(x.shape)} is not divisible by the group size {size}")
    inputs = [c.contiguous() for c in x.chunk(size, dim=dim)]
    out = torch.empty_like(inputs[0])
    dist.reduce_scatter(out, inputs, group=group)
    return out


class _CopyToTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x

    @staticmethod
    def backward(ctx, grad):
        return _all_reduce(grad, ctx.group), None


class _ReduceFromTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        return _all_reduce(x, group)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class _ScatterToTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _split(x, -1, group)

    @staticmethod
    def backward(ctx, grad):
        return _gather(grad, -1, ctx.group), None


class _GatherFromTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _gather(x, -1, group)

    @staticmethod
    def backward(ctx, grad):
        return _split(grad, -1, ctx.group), None


class _ScatterToSP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group, dim):
        ctx.group, ctx.dim = group, dim
        return _split(x, dim, group)

    @staticmethod
    def backward(ctx, grad):
        return _gather(grad, ctx.dim, ctx.group), None, None


class _GatherFromSP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group, dim, tensor_parallel_output_grad):
        ctx.group, ctx.dim, ctx.tp_grad = group, dim, tensor_parallel_output_grad
        return _gather(x, dim, group)

    @staticmethod
    def backward(ctx, grad):
        if ctx.tp_grad:
            return _reduce_scatter(grad, ctx.dim, ctx.group), None, None, None
        return _split(grad, ctx.dim, ctx.group), None, None, None


class _ReduceScatterToSP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group, dim):
        ctx.group, ctx.dim = group, dim
        return _reduce_scatter(x, dim, group)

    @staticmethod
    def backward(ctx, grad):
        return _gather(grad, ctx.dim, ctx.group), None, None


def copy_to_tp_region(x: torch.Tensor, group: Any) -> torch.Tensor:
    """Identity forward; all-reduce of the gradient over `group` in backward. Any shape."""
    return x if group_size(group) == 1 else _CopyToTP.apply(x, group)


def reduce_from_tp_region(x: torch.Tensor, group: Any) -> torch.Tensor:
    """All-reduce (sum) over `group` forward; identity backward. Any shape, returns a new tensor."""
    return x if group_size(group) == 1 else _ReduceFromTP.apply(x, group)


def scatter_to_tp_region(x: torch.Tensor, group: Any) -> torch.Tensor:
    """`[..., D] -> [..., D/tp]`: this rank's slice of the last dim; backward all-gathers it."""
    return x if group_size(group) == 1 else _ScatterToTP.apply(x, group)


def gather_from_tp_region(x: torch.Tensor, group: Any) -> torch.Tensor:
    """`[..., D/tp] -> [..., D]`: all-gather along the last dim (rank order); backward keeps the slice."""
    return x if group_size(group) == 1 else _GatherFromTP.apply(x, group)


def scatter_to_sequence_parallel_region(x: torch.Tensor, group: Any, dim: int = 1) -> torch.Tensor:
    """`[B, S, H] -> [B, S/tp, H]` (split along `dim`, the sequence dim); backward all-gathers."""
    return x if group_size(group) == 1 else _ScatterToSP.apply(x, group, dim)


def gather_from_sequence_parallel_region(x: torch.Tensor, group: Any, dim: int = 1,
                                         tensor_parallel_output_grad: bool = True) -> torch.Tensor:
    """`[B, S/tp, H] -> [B, S, H]`: all-gather along `dim` (the sequence dim).

    Backward: reduce-scatter when the result feeds tensor-parallel compute (default: each rank holds a
    partial gradient of the full sequence), a plain split when it feeds replicated compute.
    """
    if group_size(group) == 1:
        return x
    return _GatherFromSP.apply(x, group, dim, tensor_parallel_output_grad)


def reduce_scatter_to_sequence_parallel_region(x: torch.Tensor, group: Any, dim: int = 1) -> torch.Tensor:
    """`[B, S, H] -> [B, S/tp, H]`: sum over `group`, keep this rank's slice of `dim` (the sequence dim);
    backward all-gathers."""
    return x if group_size(group) == 1 else _ReduceScatterToSP.apply(x, group, dim)
