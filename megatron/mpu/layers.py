"""Tensor-parallel linear and embedding layers (Shoeybi et al. 2019, sec. 3).

Weights are `[out, in]` like `nn.Linear`. Initialisation is TP-invariant: every layer draws its FULL
master weight (fp32, CPU) from the current default torch RNG with `init_method` and keeps this rank's
shard, so models built after the same `torch.manual_seed` at tensor=1 and tensor=2 are identical, and
every rank of a TP group consumes the same random numbers (their default RNGs stay in sync).
`init_method(weight)` initialises a full `[out, in]` fp32 tensor in place; default normal(0, 0.02).
Biases start at zero. Each layer returns one tensor (no Megatron-style `(output, bias)` tuple).
"""
from __future__ import annotations

import functools
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from megatron.mpu.mappings import (copy_to_tp_region, gather_from_sequence_parallel_region,
                                   gather_from_tp_region, reduce_from_tp_region,
                                   reduce_scatter_to_sequence_parallel_region, scatter_to_tp_region)
from megatron.mpu.parallel_state import ParallelState
from megatron.mpu.partition import divide, resolve_chunks, shard_tensor, unshard_tensor

InitMethod = Callable[[torch.Tensor], None]


def normal_init(std: float = 0.02) -> InitMethod:
    """An `init_method` filling a tensor in place from N(0, std^2) with the default torch RNG."""
    return functools.partial(_normal_, std=std)


def _normal_(tensor: torch.Tensor, std: float) -> None:
    nn.init.normal_(tensor, mean=0.0, std=std)


def _master_shard(shape: tuple, init_method: Optional[InitMethod], rank: int, size: int, dim: int,
                  chunks: Optional[Sequence[int]], device, dtype) -> nn.Parameter:
    """Draw the full fp32 master weight of `shape` on CPU, keep this rank's shard along `dim`."""
    master = torch.empty(shape, dtype=torch.float32)
    (init_method or normal_init())(master)
    shard = shard_tensor(master, rank, size, dim=dim, chunks=chunks)
    return mark_tensor_parallel(nn.Parameter(shard.to(device=device, dtype=dtype or torch.float32)))


def mark_tensor_parallel(param: nn.Parameter) -> nn.Parameter:
    """Flag a parameter that is split across the TP group (each rank holds a different slice).

    DeepSpeed's gradient-norm code (`is_model_parallel_parameter`) counts flagged parameters on every
    TP rank and unflagged (replicated) ones only on model-parallel rank 0, so the global norm, and
    therefore gradient clipping, is the same as on one rank.
    """
    param.tensor_model_parallel = True
    return param


class ColumnParallelLinear(nn.Module):
    """`y = x W^T + b` with W `[out, in]` split along `out`: this rank holds `[out/tp, in]`.

    Input `[..., in]` (with `sequence_parallel`: `[B, S/tp, in]`, all-gathered along S before the
    matmul, reduce-scattered in backward, Korthikanti et al. 2022). Output `[..., out/tp]`, or
    `[..., out]` in the full layout with `gather_output=True`.

    Fused weights: `chunks=[c0, c1, ...]` (summing to `out`) says the full weight is the row
    concatenation of these blocks and each block is split evenly across the TP ranks; the per-rank
    weight (and bias) is the concatenation of this rank's piece of each block. E.g. a fused QKV with
    `chunks=[nq*hd, nkv*hd, nkv*hd]` holds `[q_r | k_r | v_r]` on rank r, a SwiGLU fc1 with
    `chunks=[F, F]` holds `[gate_r | up_r]`. `stride=k` is shorthand for `k` equal chunks.
    `megatron.mpu.partition.shard_tensor/unshard_tensor` convert between full and per-rank layouts.
    """

    def __init__(self, in_features: int, out_features: int, ps: ParallelState, bias: bool = True,
                 gather_output: bool = False, init_method: Optional[InitMethod] = None,
                 sequence_parallel: bool = False, stride: int = 1, chunks: Optional[Sequence[int]] = None,
                 dtype: Optional[torch.dtype] = None, device=None) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.tp_size, self.tp_group = ps.tp_size, ps.tp_group
        self.gather_output = gather_output
        self.sequence_parallel = sequence_parallel and ps.tp_size > 1
        self.chunks = resolve_chunks(out_features, chunks, stride)
        self.output_size_per_partition = divide(out_features, ps.tp_size, "out_features")
        self.weight = _master_shard((out_features, in_features), init_method, ps.tp_rank, ps.tp_size, 0,
                                    self.chunks, device, dtype)
        if bias:
            self.bias = mark_tensor_parallel(nn.Parameter(shard_tensor(
                torch.zeros(out_features), ps.tp_rank, ps.tp_size, 0, self.chunks).to(
                device=device, dtype=dtype or torch.float32)))
        else:
            self.register_parameter("bias", None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """`[..., in]` (or `[B, S/tp, in]` with SP) -> `[..., out/tp]` (or `[..., out]` gathered)."""
        if self.sequence_parallel:
            x = gather_from_sequence_parallel_region(x, self.tp_group, dim=1)
        else:
            x = copy_to_tp_region(x, self.tp_group)
        y = F.linear(x, self.weight, self.bias)
        if not self.gather_output or self.tp_size == 1:
            return y
        y = gather_from_tp_region(y, self.tp_group)  # rank-major: [blocks of rank 0 | blocks of rank 1 ...]
        if len(self.chunks) > 1:
            y = unshard_tensor(list(y.chunk(self.tp_size, dim=-1)), dim=-1, chunks=self.chunks)
        return y

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out={self.out_features} (per rank {self.output_size_per_partition}), "
                f"bias={self.bias is not None}, gather_output={self.gather_output}, "
                f"sequence_parallel={self.sequence_parallel}, chunks={self.chunks}")


class RowParallelLinear(nn.Module):
    """`y = x W^T + b` with W `[out, in]` split along `in`: this rank holds `[out, in/tp]`.

    Input `[..., in/tp]` (`input_is_parallel=True`) or `[..., in]` (split here). The partial products
    are all-reduced over the TP group -> `[..., out]`, or with `sequence_parallel` reduce-scattered along
    the sequence dim -> `[B, S/tp, out]`. The bias (replicated) is added after the reduction so it is
    counted once; under SP its gradient is all-reduced over the TP group (each rank sees S/tp tokens).
    """

    def __init__(self, in_features: int, out_features: int, ps: ParallelState, bias: bool = True,
                 input_is_parallel: bool = True, init_method: Optional[InitMethod] = None,
                 sequence_parallel: bool = False, dtype: Optional[torch.dtype] = None, device=None) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.tp_size, self.tp_group = ps.tp_size, ps.tp_group
        self.input_is_parallel = input_is_parallel
        self.sequence_parallel = sequence_parallel and ps.tp_size > 1
        self.input_size_per_partition = divide(in_features, ps.tp_size, "in_features")
        self.weight = _master_shard((out_features, in_features), init_method, ps.tp_rank, ps.tp_size, 1,
                                    None, device, dtype)
        if bias:
            self.bias = nn.Parameter(torch.zeros(out_features, device=device, dtype=dtype or torch.float32))
        else:
            self.register_parameter("bias", None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """`[..., in/tp]` (or `[..., in]`) -> `[..., out]`, or `[B, S/tp, out]` with SP."""
        if not self.input_is_parallel:
            x = scatter_to_tp_region(x, self.tp_group)
        y = F.linear(x, self.weight)
        if self.sequence_parallel:
            y = reduce_scatter_to_sequence_parallel_region(y, self.tp_group, dim=1)
            # Replicated bias applied to S/tp tokens per rank: sum its gradient over the TP group.
            return y + copy_to_tp_region(self.bias, self.tp_group) if self.bias is not None else y
        y = reduce_from_tp_region(y, self.tp_group)
        return y + self.bias if self.bias is not None else y

    def extra_repr(self) -> str:
        return (f"in={self.in_features} (per rank {self.input_size_per_partition}), out={self.out_features}, "
                f"bias={self.bias is not None}, input_is_parallel={self.input_is_parallel}, "
                f"sequence_parallel={self.sequence_parallel}")


class VocabParallelEmbedding(nn.Module):
    """Embedding table `[V, H]` split by rows: rank r holds rows `[r*V/tp, (r+1)*V/tp)` as `[V/tp, H]`.

    Token ids `[B, S]` (long) -> `[B, S, H]`: each rank looks up the ids in its range, zeros the others,
    and the partial results are all-reduced; with `sequence_parallel` they are reduce-scattered along S
    instead -> `[B, S/tp, H]`. `num_embeddings` (the padded vocabulary) must be divisible by tp.
    """

    def __init__(self, num_embeddings: int, embedding_dim: int, ps: ParallelState,
                 init_method: Optional[InitMethod] = None, sequence_parallel: bool = False,
                 dtype: Optional[torch.dtype] = None, device=None) -> None:
        super().__init__()
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.tp_size, self.tp_group = ps.tp_size, ps.tp_group
        self.sequence_parallel = sequence_parallel and ps.tp_size > 1
        per_rank = divide(num_embeddings, ps.tp_size, "num_embeddings")
        self.vocab_start_index, self.vocab_end_index = ps.tp_rank * per_rank, (ps.tp_rank + 1) * per_rank
        self.weight = _master_shard((num_embeddings, embedding_dim), init_method, ps.tp_rank, ps.tp_size, 0,
                                    None, device, dtype)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """`[B, S]` long -> `[B, S, H]` (or `[B, S/tp, H]` with sequence parallelism)."""
        if self.tp_size == 1:
            return F.embedding(input_ids, self.weight)
        outside = (input_ids < self.vocab_start_index) | (input_ids >= self.vocab_end_index)
        local_ids = (input_ids - self.vocab_start_index).masked_fill(outside, 0)
        out = F.embedding(local_ids, self.weight).masked_fill(outside.unsqueeze(-1), 0.0)
        if self.sequence_parallel:
            return reduce_scatter_to_sequence_parallel_region(out, self.tp_group, dim=1)
        return reduce_from_tp_region(out, self.tp_group)

    def extra_repr(self) -> str:
        return (f"{self.num_embeddings}, {self.embedding_dim}, rows [{self.vocab_start_index}, "
                f"{self.vocab_end_index}), sequence_parallel={self.sequence_parallel}")
