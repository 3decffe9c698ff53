"""Splitting full tensors into per-rank shards and merging them back (no communication).

A full weight may be the concatenation of several blocks that must each be split evenly across the
tensor-parallel ranks, e.g. a fused QKV weight whose full rows are `[q | k | v]`
(`chunks=[nq*hd, nkv*hd, nkv*hd]`): rank r then holds `[q_r | k_r | v_r]`, the r-th piece of every
block, so each rank owns whole attention heads (Shoeybi et al. 2019, sec. 3). `chunks=None` means one
block (a plain even split). These helpers are what the layers use to slice their master weights and what
checkpoint conversion can use to reshard.
"""
from __future__ import annotations

from typing import List, Optional, Sequence

import torch


def divide(numerator: int, denominator: int, what: str = "size") -> int:
    """`numerator // denominator`, raising ValueError (naming `what`) when it does not divide exactly."""
    if numerator % denominator != 0:
        raise ValueError(f"{what} {numerator} is not divisible by the tensor-parallel size {denominator}")
    return numerator // denominator


def resolve_chunks(full_size: int, chunks: Optional[Sequence[int]] = None, stride: int = 1) -> List[int]:
    """The block sizes along the split dimension: `chunks`, or `stride` equal blocks, or one block.

    Raises ValueError when the blocks do not add up to `full_size`.
    """
    if chunks is None:
        chunks = [divide(full_size, stride, "partitioned size")] * stride if stride > 1 else [full_size]
    chunks = [int(c) for c in chunks]
    if sum(chunks) != full_size:
        raise ValueError(f"chunks {chunks} add up to {sum(chunks)}, expected {full_size}")
    return chunks


def shard_tensor(full: torch.Tensor, rank: int, size: int, dim: int = 0,
                 chunks: Optional[Sequence[int]] = None) -> torch.Tensor:
    """This rank's shard of `full` along `dim`: the rank-th 1/size piece of each block in `chunks`.

    `full`: any shape with `full.shape[dim] == sum(chunks)`; every chunk must be divisible by `size`.
    Returns a contiguous tensor with `shape[dim] == full.shape[dim] // size`.
    """
    chunks = resolve_chunks(full.shape[dim], chunks)
    pieces = []
    for block in torch.split(full, chunks, dim=dim):
        per_rank = divide(block.shape[dim], size, "block")
        pieces.append(block.narrow(dim, rank * per_rank, per_rank))
    return torch.cat(pieces, dim=dim).contiguous()


def unshard_tensor(shards: Sequence[torch.Tensor], dim: int = 0,
                   chunks: Optional[Sequence[int]] = None) -> torch.Tensor:
    """Inverse of `shard_tensor`: the full tensor from the list of all ranks' shards (rank order).

    `chunks` are the FULL block sizes (as given to `shard_tensor`); None means one block.
    """
    size = len(shards)
    chunks = resolve_chunks(shards[0].shape[dim] * size, chunks)
    local = [divide(c, size, "block") for c in chunks]
    split = [torch.split(s, local, dim=dim) for s in shards]
    return torch.cat([split[r][b] for b in range(len(chunks)) for r in range(size)], dim=dim)
