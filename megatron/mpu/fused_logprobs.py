"""The LM head fused with the per-token log-prob (and entropy): `hidden @ W^T -> log softmax -> [target]` in
chunks of tokens, never holding the `[T, V/tp]` logits of all tokens.

Forward, per chunk of `chunk_size` tokens: logits = h_c W^T (this rank's vocabulary rows, real ids only), reduced
at once to four fp32 scalars per token (`cross_entropy.local_stats`) and dropped; one MAX and one SUM all-reduce
over the TP group then give log p(target) and the entropy for all tokens (`combine_stats`). Saved for backward:
the hidden states, the log-partition and entropy per token (`[T]`), not the logits.

Backward recomputes each chunk's logits (one extra GEMM, the price of the memory bound; the upstream gradient is
per token, so it cannot be folded into the forward as for a mean loss), forms dlogits in place and accumulates
dW += dlogits^T h_c (fp32) and dh_c = dlogits W. The input gradient is this rank's partial sum: as for any
column-parallel layer the caller passes `hidden` through `copy_to_tp_region` (or the sequence-parallel gather),
whose backward all-reduces it.

Peak extra memory: two fp32 `[chunk, V/tp]` buffers plus an fp32 `[V/tp, H]` weight-gradient accumulator,
whatever T is. Padded vocabulary rows (ids >= vocab_size) are skipped entirely: probability 0, gradient 0.
"""
from __future__ import annotations

from typing import Any, Optional, Tuple

import torch

from megatron.mpu.cross_entropy import (chunks, combine_stats, concat_stats, local_stats, math_dtype,
                                        softmax_grad, target_columns, valid_vocab_columns)
from megatron.mpu.parallel_state import ParallelState

# fp32 bytes one logits chunk may take when no chunk size is given (two such buffers live at a time).
DEFAULT_CHUNK_BYTES = 32 * 2**20


def default_chunk_tokens(vocab_local: int, budget_bytes: int = DEFAULT_CHUNK_BYTES) -> int:
    """Tokens per chunk so that one fp32 `[chunk, vocab_local]` buffer fits `budget_bytes` (at least 16)."""
    return max(16, budget_bytes // (4 * max(vocab_local, 1)))


class _FusedLinearLogProbs(torch.autograd.Function):
    """(hidden [T, H], weight [V/tp, H], target [T]) -> (logp [T] fp32, entropy [T] fp32 or [0])."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, target: torch.Tensor, group: Any, vocab_start: int,
                vocab_size: Optional[int], chunk_size: int, with_entropy: bool):
        valid = valid_vocab_columns(vocab_size, vocab_start, weight.shape[0])
        w = weight[:valid]
        local_target, in_range = target_columns(target, vocab_start, valid)
        acc = math_dtype(hidden.dtype)
        parts = []
        for s in chunks(hidden.shape[0], chunk_size):
            x = (hidden[s] @ w.t()).to(acc)  # the matmul in the input dtype, as the plain head does
            parts.append(local_stats(x, local_target[s], in_range[s], with_entropy))
            del x  # before the next chunk's GEMM: one chunk buffer alive, not two
        lse, logp, entropy = combine_stats(concat_stats(parts, hidden.device, acc), in_range, group)
        if vocab_size is not None:
            logp = logp.masked_fill(target >= vocab_size, float("-inf"))
        ctx.save_for_backward(hidden, weight, lse, entropy, local_target, in_range)
        ctx.chunk_size, ctx.valid, ctx.with_entropy = chunk_size, valid, with_entropy
        if not with_entropy:
            entropy = logp.new_zeros(0)
            ctx.mark_non_differentiable(entropy)
        return logp, entropy

    @staticmethod
    def backward(ctx, g_logp: Optional[torch.Tensor], g_ent: Optional[torch.Tensor]):
        hidden, weight, lse, entropy, local_target, in_range = ctx.saved_tensors
        valid = ctx.valid
        w = weight[:valid]
        acc = math_dtype(hidden.dtype)
        g_ent = g_ent.to(acc) if (ctx.with_entropy and g_ent is not None) else None
        g_logp = g_logp.to(acc) if g_logp is not None else None
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=acc, device=weight.device) if need_w else None
        for s in chunks(hidden.shape[0], ctx.chunk_size):
            x = (hidden[s] @ w.t()).to(acc)
            dx = softmax_grad(x, lse[s], entropy[s], None if g_logp is None else g_logp[s],
                              None if g_ent is None else g_ent[s], local_target[s], in_range[s]).to(hidden.dtype)
            if need_h:
                grad_h[s] = dx @ w
            if need_w:
                grad_w[:valid].addmm_(dx.t().to(acc), hidden[s].to(acc))
            del x, dx  # free this chunk's buffers before the next one is made
        return (grad_h, None if grad_w is None else grad_w.to(weight.dtype), None, None, None, None, None, None)


def fused_linear_logprobs(hidden: torch.Tensor, weight: torch.Tensor, target: torch.Tensor, ps: ParallelState,
                          vocab_size: Optional[int] = None, chunk_size: Optional[int] = None,
                          with_entropy: bool = False) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """log p(target) (and the entropy) of `softmax(hidden @ weight^T)` over the full vocabulary, chunked.

    hidden: `[..., H]` (already passed through the TP input mapping, identical on every TP rank);
    weight: `[V/tp, H]`, this rank's vocabulary rows (global ids `ps.tp_rank * V/tp ...`); target: `[...]` long;
    vocab_size: real vocabulary (ids >= it are padding with probability 0; None = no padding);
    chunk_size: tokens per chunk (None: `default_chunk_tokens`, ~32 MiB of fp32 logits per chunk).
    Returns (logp `[...]` fp32, entropy `[...]` fp32 or None), identical on every TP rank; the same values and
    gradients as `vocab_parallel_logprobs(_entropy)(F.linear(hidden, weight), target, ...)`.
    """
    if target.shape != hidden.shape[:-1]:
        raise ValueError(f"fused_linear_logprobs: target shape {tuple(target.shape)} does not match hidden "
                         f"{tuple(hidden.shape)}")
    chunk = chunk_size if chunk_size and chunk_size > 0 else default_chunk_tokens(weight.shape[0])
    logp, ent = _FusedLinearLogProbs.apply(hidden.reshape(-1, hidden.shape[-1]), weight, target.reshape(-1),
                                           ps.tp_group, ps.tp_rank * weight.shape[0], vocab_size, chunk,
                                           with_entropy)
    return logp.view(target.shape), (ent.view(target.shape) if with_entropy else None)
