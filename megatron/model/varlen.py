"""Packed-row bookkeeping for variable-length attention kernels (flash-attn varlen).

A packed row holds k sequences as contiguous runs of equal nonzero `segment_ids` (1..k), then padding (0).
Varlen kernels want the real tokens concatenated, [T, heads, hd], plus `cu_seqlens` [N+1] int32 (the offset
of each sequence in that concatenation) and the longest length.
"""
from __future__ import annotations

from typing import Callable, NamedTuple

import torch


class VarlenIndex(NamedTuple):
    """token_index [T] long: flat b*S+t indices of real tokens in order; cu_seqlens [N+1] int32;
    max_seqlen: the longest sequence (python int)."""
    token_index: torch.Tensor
    cu_seqlens: torch.Tensor
    max_seqlen: int


def varlen_index(segment_ids: torch.Tensor) -> VarlenIndex:
    """segment_ids [B, S] -> VarlenIndex. A sequence starts at a real token that opens a row or whose
    segment id differs from the token before it."""
    B, S = segment_ids.shape
    flat = segment_ids.reshape(-1)
    valid = flat != 0
    starts = valid.clone()
    if flat.numel() > 1:
        same_as_prev = flat[1:] == flat[:-1]
        row_open = torch.zeros_like(valid)
        row_open[::S] = True
        starts[1:] &= ~same_as_prev | row_open[1:]
    token_index = valid.nonzero(as_tuple=False).squeeze(1)
    start_pos = starts[token_index].nonzero(as_tuple=False).squeeze(1)
    total = torch.tensor([token_index.numel()], device=segment_ids.device, dtype=start_pos.dtype)
    cu = torch.cat((start_pos, total)).to(torch.int32)
    max_len = int((cu[1:] - cu[:-1]).max().item()) if cu.numel() > 1 else 0
    return VarlenIndex(token_index, cu, max_len)


def varlen_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, segment_ids: torch.Tensor, scale: float,
                     kernel: Callable[..., torch.Tensor]) -> torch.Tensor:
    """Run a varlen causal kernel over the real tokens of packed rows and scatter back.

    q [B, S, nq, hd], k, v [B, S, nkv, hd]; `kernel(q[T,nq,hd], k[T,nkv,hd], v[T,nkv,hd], cu_seqlens_q,
    cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0, softmax_scale=scale, causal=True) -> [T, nq, hd]`
    (flash_attn_varlen_func's signature; it handles GQA itself). Returns [B, S, nq, hd], zeros at padding.
    """
    B, S, nq, hd = q.shape
    idx = varlen_index(segment_ids)
    flat = lambda t: t.reshape(B * S, t.shape[2], t.shape[3]).index_select(0, idx.token_index)
    out = kernel(flat(q), flat(k), flat(v), idx.cu_seqlens, idx.cu_seqlens, idx.max_seqlen, idx.max_seqlen,
                 dropout_p=0.0, softmax_scale=scale, causal=True)
    full = q.new_zeros(B * S, nq, out.shape[-1]).index_copy(0, idx.token_index, out.to(q.dtype))
    return full.reshape(B, S, nq, out.shape[-1])
