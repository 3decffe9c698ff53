"""Cross-entropy and target log-probabilities over vocabulary-parallel logits.

Each TP rank holds the logits of its vocabulary slice `[B, S, V/tp]`. Following Megatron
(Shoeybi et al. 2019, sec. 3, "fusing the output embedding GEMM with the cross-entropy loss"), the full
vocabulary is never gathered: only per-token scalars cross the group -- the max logit (all-reduce MAX),
then the sum of exp(logit - max) and the target's shifted logit (one all-reduce SUM of both). The fp32
math runs chunk by chunk over the flattened B*S tokens when `chunk_size` is given, so an fp32 copy of the
whole bf16/fp16 logits tensor is never materialised (forward or backward).

The gradient w.r.t. this rank's shard is local: `(softmax - onehot(target)) * grad_loss`, using the
global max and sum; no communication in backward.
"""
from __future__ import annotations

from typing import Any, Optional

import torch
import torch.distributed as dist

from megatron.mpu.mappings import group_size
from megatron.mpu.parallel_state import ParallelState


def _chunks(n: int, chunk_size: Optional[int]):
    """Slices covering range(n) in steps of `chunk_size` (one slice when None)."""
    step = n if not chunk_size or chunk_size <= 0 else chunk_size
    return [slice(i, min(i + step, n)) for i in range(0, n, max(step, 1))]


class _VocabParallelCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits: torch.Tensor, target: torch.Tensor, group: Any, vocab_start: int,
                chunk_size: Optional[int]) -> torch.Tensor:
        vocab_local = logits.shape[-1]
        flat = logits.reshape(-1, vocab_local)
        tgt = target.reshape(-1)
        n = flat.shape[0]
        distributed = group_size(group) > 1

        # The max is exact in any float dtype, so it needs no fp32 copy.
        logit_max = flat.max(dim=-1).values.float() if n > 0 else flat.new_zeros(0, dtype=torch.float32)
        if distributed:
            dist.all_reduce(logit_max, op=dist.ReduceOp.MAX, group=group)

        in_range = (tgt >= vocab_start) & (tgt < vocab_start + vocab_local)
        local_tgt = (tgt - vocab_start).masked_fill(~in_range, 0)
        stats = torch.zeros(2, n, dtype=torch.float32, device=logits.device)  # [sum_exp; target logit]
        for s in _chunks(n, chunk_size):
            shifted = flat[s].float() - logit_max[s, None]
            stats[1, s] = shifted.gather(1, local_tgt[s, None]).squeeze(1) * in_range[s]
            stats[0, s] = shifted.exp_().sum(dim=-1)  # in place: one fp32 chunk buffer, not two
        if distributed:
            dist.all_reduce(stats, group=group)
        sum_exp, target_logit = stats[0], stats[1]
        loss = torch.log(sum_exp) - target_logit

        ctx.save_for_backward(logits, logit_max, sum_exp, local_tgt, in_range)
        ctx.chunk_size = chunk_size
        return loss.view(target.shape)

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor):
        logits, logit_max, sum_exp, local_tgt, in_range = ctx.saved_tensors
        vocab_local = logits.shape[-1]
        flat = logits.reshape(-1, vocab_local)
        g = grad_loss.reshape(-1).float()
        grad = torch.empty_like(flat)
        for s in _chunks(flat.shape[0], ctx.chunk_size):
            probs = (flat[s].float() - logit_max[s, None]).exp_().div_(sum_exp[s, None])
            rows = torch.arange(probs.shape[0], device=probs.device)
            probs[rows, local_tgt[s]] -= in_range[s].float()
            grad[s] = probs.mul_(g[s, None]).to(grad.dtype)
        return grad.view(logits.shape), None, None, None, None


def vocab_parallel_cross_entropy(logits_shard: torch.Tensor, target: torch.Tensor, ps: ParallelState,
                                 chunk_size: Optional[int] = None,
                                 ignore_index: Optional[int] = None) -> torch.Tensor:
    """Per-token cross-entropy `-log softmax(logits)[target]` over the full (padded) vocabulary.

    logits_shard: `[B, S, V/tp]`, any float dtype, this rank's vocabulary slice (rank r holds ids
    `[r*V/tp, (r+1)*V/tp)`). target: `[B, S]` long, global ids in `[0, V)`, or `ignore_index` for
    positions that are not scored (their loss and gradient are exactly 0, like F.cross_entropy's).
    chunk_size: tokens per fp32 chunk (None = all at once). Returns `[B, S]` fp32 (nats), identical on
    every rank of the TP group.
    """
    if target.shape != logits_shard.shape[:-1]:
        raise ValueError(f"target shape {tuple(target.shape)} does not match logits {tuple(logits_shard.shape)}")
    vocab_start = ps.tp_rank * logits_shard.shape[-1]
    if ignore_index is None:
        return _VocabParallelCrossEntropy.apply(logits_shard, target, ps.tp_group, vocab_start, chunk_size)
    keep = target != ignore_index
    loss = _VocabParallelCrossEntropy.apply(logits_shard, torch.where(keep, target, torch.zeros_like(target)),
                                            ps.tp_group, vocab_start, chunk_size)
    return torch.where(keep, loss, torch.zeros_like(loss))


def vocab_parallel_logprobs(logits_shard: torch.Tensor, target: torch.Tensor, ps: ParallelState,
                            chunk_size: Optional[int] = None, ignore_index: Optional[int] = None) -> torch.Tensor:
    """Per-token `log p(target)` `[B, S]` fp32 (= minus `vocab_parallel_cross_entropy`, same arguments)."""
    return -vocab_parallel_cross_entropy(logits_shard, target, ps, chunk_size, ignore_index)
