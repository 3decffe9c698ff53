"""Log-probabilities, cross-entropy and entropy over vocabulary-parallel logits, padded rows masked.

Each TP rank holds the logits of its vocabulary slice `[..., V/tp]` (rank r: global ids `[r*V/tp, (r+1)*V/tp)`).
Following Megatron (Shoeybi et al. 2019, sec. 3, "fusing the output embedding GEMM with the cross-entropy
loss"), the full vocabulary is never gathered: only per-token scalars cross the group. Each rank reduces its own
columns to (local max m_r, sum exp(x - m_r), sum exp(x - m_r)(x - m_r), its shifted target logit); one all-reduce
MAX of m_r and one all-reduce SUM of the rescaled scalars give the softmax statistics (`combine_stats`). The fp32
math (fp64 for fp64 inputs) runs chunk by chunk over the flattened tokens, so an fp32 copy of all the logits
never exists.

Padded vocabulary: the head has `padded_vocab` rows (a multiple of 128 * tensor) but only ids `< vocab_size` are
real. Every function here takes `vocab_size` and gives the padded ids zero probability (their logits count as
-inf): they take no softmax mass, no entropy and no gradient. `mask_padded_vocab` is the same rule for code
that needs the logits themselves (sampling, argmax).
"""
from __future__ import annotations

from typing import Any, NamedTuple, Optional, Tuple

import torch
import torch.distributed as dist

from megatron.mpu.mappings import group_size
from megatron.mpu.parallel_state import ParallelState

# Stands in for the max of a shard with no real column: finite, so (m_r - M) * 0 stays 0 (never -inf * 0 = nan).
_EMPTY_MAX = -1e30


def valid_vocab_columns(vocab_size: Optional[int], vocab_start: int, vocab_local: int) -> int:
    """How many of a shard's `vocab_local` columns (global ids `vocab_start ...`) are real ids (< vocab_size).

    vocab_size None means no padding (every column is real). Returns an int in [0, vocab_local].
    """
    if vocab_size is None:
        return vocab_local
    return max(0, min(vocab_local, vocab_size - vocab_start))


def mask_padded_vocab(logits_shard: torch.Tensor, vocab_size: Optional[int], vocab_start: int) -> torch.Tensor:
    """Logits with padded vocabulary columns set to -inf (zero probability), for sampling / argmax / softmax.

    logits_shard: `[..., V/tp]`, this rank's slice starting at global id `vocab_start` (`ps.tp_rank * V/tp`);
    vocab_size: the real vocabulary (`cfg.model.vocab_size`; None = nothing to mask). Returns the input itself
    when the shard holds no padding, else a masked copy (same shape and dtype; differentiable, zero gradient at
    the padded columns).
    """
    valid = valid_vocab_columns(vocab_size, vocab_start, logits_shard.shape[-1])
    if valid == logits_shard.shape[-1]:
        return logits_shard
    pad = torch.arange(logits_shard.shape[-1], device=logits_shard.device) >= valid
    return logits_shard.masked_fill(pad, float("-inf"))


def chunks(n: int, chunk_size: Optional[int]):
    """Slices covering range(n) in steps of `chunk_size` (one slice when None or <= 0)."""
    step = n if not chunk_size or chunk_size <= 0 else chunk_size
    return [slice(i, min(i + step, n)) for i in range(0, n, max(step, 1))]


class LocalStats(NamedTuple):
    """Per-token softmax statistics of one rank's real columns, fp32 `[n]` each (see `local_stats`)."""
    max: torch.Tensor
    sum_exp: torch.Tensor
    sum_exp_x: torch.Tensor
    target: torch.Tensor


def local_stats(x: torch.Tensor, local_target: torch.Tensor, in_range: torch.Tensor, with_entropy: bool) -> LocalStats:
    """Statistics of fp32 logits `x [n, v]` (this rank's real columns only; v may be 0).

    m = max_j x_j, s = sum_j exp(x_j - m), w = sum_j exp(x_j - m) (x_j - m) (zeros unless `with_entropy`),
    t = x[target] - m where `in_range` (the target is one of these columns, index `local_target`), else 0.
    `x` is overwritten (it is a scratch chunk).
    """
    n, v = x.shape
    if v == 0:
        zeros = x.new_zeros(n)
        return LocalStats(x.new_full((n,), _EMPTY_MAX), zeros, zeros, zeros)
    m = x.max(dim=-1).values
    x.sub_(m[:, None])
    t = x.gather(1, local_target[:, None]).squeeze(1) * in_range
    if with_entropy:
        e = torch.exp(x)
        w = (e * x).sum(dim=-1)
        s = e.sum(dim=-1)
    else:
        s = x.exp_().sum(dim=-1)  # in place: one fp32 chunk buffer
        w = torch.zeros_like(s)
    return LocalStats(m, s, w, t)


def math_dtype(dtype: torch.dtype) -> torch.dtype:
    """The softmax math dtype for inputs of `dtype`: fp32, or fp64 for fp64 inputs (never less than fp32)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def concat_stats(parts, device, dtype: torch.dtype = torch.float32) -> LocalStats:
    """The LocalStats of consecutive token chunks joined into one (empty `[0]` tensors when there are none)."""
    if not parts:
        z = torch.zeros(0, dtype=dtype, device=device)
        return LocalStats(z, z, z, z)
    return LocalStats(*(torch.cat(col) for col in zip(*parts)))


def combine_stats(st: LocalStats, in_range: torch.Tensor,
                  group: Any) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Global (over the TP group) statistics from every rank's `LocalStats` of the same tokens.

    With M = max_r m_r and d_r = m_r - M: S = sum_r s_r e^d_r, W = sum_r e^d_r (w_r + d_r s_r), T = t + d (owner
    rank only). Returns fp32 `[n]` each: lse = M + log S (log-partition), logp = T - log S (target log-prob) and
    entropy = log S - W / S (meaningful only when the stats were made `with_entropy`).
    """
    big_m = st.max.clone()
    if group_size(group) > 1:
        dist.all_reduce(big_m, op=dist.ReduceOp.MAX, group=group)
    d = st.max - big_m
    scale = d.exp()
    packed = torch.stack((st.sum_exp * scale, scale * (st.sum_exp_x + d * st.sum_exp), (st.target + d) * in_range))
    if group_size(group) > 1:
        dist.all_reduce(packed, group=group)
    s, w, t = packed
    log_s = s.log()
    return big_m + log_s, t - log_s, log_s - w / s


def target_columns(target: torch.Tensor, vocab_start: int, valid: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """(local column of each target, bool: the target is one of this rank's real columns). target: `[n]` long."""
    in_range = (target >= vocab_start) & (target < vocab_start + valid)
    return (target - vocab_start).masked_fill(~in_range, 0), in_range


def softmax_grad(x: torch.Tensor, lse: torch.Tensor, entropy: Optional[torch.Tensor], g_logp: Optional[torch.Tensor],
                 g_ent: Optional[torch.Tensor], local_target: torch.Tensor, in_range: torch.Tensor) -> torch.Tensor:
    """d(sum g_logp * logp + g_ent * entropy) / dx for fp32 logits `x [n, v]` (overwritten and returned).

    With log p = x - lse and p = exp(log p): d logp_t/dx_j = [j = t] - p_j, d H/dx_j = -p_j (log p_j + H).
    """
    if x.shape[1] == 0:  # a shard of padding only: no gradient
        return x
    x.sub_(lse[:, None])  # log p
    p = x.exp()
    if g_ent is not None:
        x.add_(entropy[:, None]).mul_(-g_ent[:, None])  # -g_ent (log p + H)
        if g_logp is not None:
            x.sub_(g_logp[:, None])
    elif g_logp is not None:
        x.copy_((-g_logp)[:, None].expand_as(x))  # negate [n], not [n, v]
    else:
        x.zero_()
    x.mul_(p)
    if g_logp is not None:
        rows = torch.arange(x.shape[0], device=x.device)
        x[rows, local_target] += g_logp * in_range
    return x


class _VocabParallelLogProbs(torch.autograd.Function):
    """(logits [n, V/tp], target [n]) -> (logp [n], entropy [n] or [0]); custom backward, chunked fp32 math."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, target: torch.Tensor, group: Any, vocab_start: int,
                vocab_size: Optional[int], chunk_size: Optional[int], with_entropy: bool):
        n, vocab_local = logits.shape
        valid = valid_vocab_columns(vocab_size, vocab_start, vocab_local)
        local_target, in_range = target_columns(target, vocab_start, valid)
        # .to(copy=True): local_stats works in place on its chunk, which must never alias fp32 logits
        acc = math_dtype(logits.dtype)
        parts = [local_stats(logits[s, :valid].to(acc, copy=True), local_target[s], in_range[s],
                             with_entropy) for s in chunks(n, chunk_size)]
        st = concat_stats(parts, logits.device, acc)
        lse, logp, entropy = combine_stats(st, in_range, group)
        if vocab_size is not None:  # a padded id has probability 0
            logp = logp.masked_fill(target >= vocab_size, float("-inf"))
        ctx.save_for_backward(logits, lse, entropy, local_target, in_range)
        ctx.chunk_size, ctx.valid, ctx.with_entropy = chunk_size, valid, with_entropy
        if not with_entropy:
            entropy = logp.new_zeros(0)
            ctx.mark_non_differentiable(entropy)
        return logp, entropy

    @staticmethod
    def backward(ctx, g_logp: Optional[torch.Tensor], g_ent: Optional[torch.Tensor]):
        logits, lse, entropy, local_target, in_range = ctx.saved_tensors
        valid = ctx.valid
        acc = math_dtype(logits.dtype)
        g_ent = g_ent.to(acc) if (ctx.with_entropy and g_ent is not None) else None
        g_logp = g_logp.to(acc) if g_logp is not None else None
        grad = torch.empty_like(logits)
        grad[:, valid:] = 0
        for s in chunks(logits.shape[0], ctx.chunk_size):
            x = logits[s, :valid].to(acc, copy=True)
            grad[s, :valid] = softmax_grad(x, lse[s], entropy[s], None if g_logp is None else g_logp[s],
                                           None if g_ent is None else g_ent[s], local_target[s], in_range[s])
        return grad, None, None, None, None, None, None


def _flat_call(logits_shard: torch.Tensor, target: torch.Tensor, ps: ParallelState, vocab_size: Optional[int],
               chunk_size: Optional[int], ignore_index: Optional[int], with_entropy: bool):
    if target.shape != logits_shard.shape[:-1]:
        raise ValueError(f"target shape {tuple(target.shape)} does not match logits {tuple(logits_shard.shape)}")
    vocab_start = ps.tp_rank * logits_shard.shape[-1]
    flat_t = target.reshape(-1)
    keep = None
    if ignore_index is not None:
        keep = flat_t != ignore_index
        flat_t = torch.where(keep, flat_t, torch.zeros_like(flat_t))
    logp, ent = _VocabParallelLogProbs.apply(logits_shard.reshape(-1, logits_shard.shape[-1]), flat_t, ps.tp_group,
                                             vocab_start, vocab_size, chunk_size, with_entropy)
    if keep is not None:  # ignored positions: exactly 0 (value and gradient), like F.cross_entropy
        logp = torch.where(keep, logp, torch.zeros_like(logp))
        ent = torch.where(keep, ent, torch.zeros_like(ent)) if with_entropy else ent
    return logp.view(target.shape), (ent.view(target.shape) if with_entropy else None)


def vocab_parallel_logprobs(logits_shard: torch.Tensor, target: torch.Tensor, ps: ParallelState,
                            chunk_size: Optional[int] = None, ignore_index: Optional[int] = None,
                            vocab_size: Optional[int] = None) -> torch.Tensor:
    """Per-token `log softmax(logits)[target]` over the full vocabulary, padded ids excluded.

    logits_shard: `[..., V/tp]`, any float dtype, this rank's vocabulary slice. target: `[...]` long, global ids
    in `[0, vocab_size)`, or `ignore_index` for positions nobody scores (their value and gradient are exactly 0).
    vocab_size: the real vocabulary (`cfg.model.vocab_size`); columns of ids >= vocab_size are padding and get
    probability 0 (None: every column is real). chunk_size: tokens per fp32 chunk (None = all at once).
    Returns `[...]` fp32 nats, identical on every rank of the TP group.
    """
    return _flat_call(logits_shard, target, ps, vocab_size, chunk_size, ignore_index, False)[0]


def vocab_parallel_cross_entropy(logits_shard: torch.Tensor, target: torch.Tensor, ps: ParallelState,
                                 chunk_size: Optional[int] = None, ignore_index: Optional[int] = None,
                                 vocab_size: Optional[int] = None) -> torch.Tensor:
    """Per-token cross-entropy `-log p(target)` `[...]` fp32 (= minus `vocab_parallel_logprobs`, same arguments)."""
    return -vocab_parallel_logprobs(logits_shard, target, ps, chunk_size, ignore_index, vocab_size)


def vocab_parallel_logprobs_entropy(logits_shard: torch.Tensor, target: torch.Tensor, ps: ParallelState,
                                    chunk_size: Optional[int] = None, ignore_index: Optional[int] = None,
                                    vocab_size: Optional[int] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """(log p(target), entropy of the token distribution), each `[...]` fp32 nats, both differentiable.

    Same arguments as `vocab_parallel_logprobs`; entropy = -sum_v p_v log p_v over the real ids (padding has p=0).
    """
    return _flat_call(logits_shard, target, ps, vocab_size, chunk_size, ignore_index, True)


def vocab_parallel_entropy(logits_shard: torch.Tensor, ps: ParallelState, chunk_size: Optional[int] = None,
                           vocab_size: Optional[int] = None) -> torch.Tensor:
    """Entropy `-sum_v p_v log p_v` of each token's distribution, `[...]` fp32 nats (padded ids have p = 0)."""
    target = torch.zeros(logits_shard.shape[:-1], dtype=torch.long, device=logits_shard.device)
    return _flat_call(logits_shard, target, ps, vocab_size, chunk_size, None, True)[1]


@torch.no_grad()
def vocab_parallel_log_softmax(logits_shard: torch.Tensor, ps: ParallelState,
                               vocab_size: Optional[int] = None) -> torch.Tensor:
    """This rank's slice of `log softmax` over the full vocabulary, `[..., V/tp]` fp32; padded ids give -inf.

    Not differentiable, and it materialises fp32 `[..., V/tp]`: for inspection, tests, generation scores.
    Training uses the chunked per-target functions above.
    """
    vocab_start = ps.tp_rank * logits_shard.shape[-1]
    x = mask_padded_vocab(logits_shard.to(math_dtype(logits_shard.dtype)), vocab_size, vocab_start)
    m = x.max(dim=-1, keepdim=True).values
    if group_size(ps.tp_group) > 1:
        dist.all_reduce(m, op=dist.ReduceOp.MAX, group=ps.tp_group)
    x = x - m
    s = x.exp().sum(dim=-1, keepdim=True)
    if group_size(ps.tp_group) > 1:
        dist.all_reduce(s, group=ps.tp_group)
    return x - s.log()
