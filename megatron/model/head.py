"""The LM head + per-token log-prob op (registry op `head`): from final hidden states and target ids straight to
log p(target) (and the entropy), vocab-parallel, padded vocabulary rows masked.

    eager  logits = h W^T ([T, Vp/tp] in the compute dtype), then the chunked vocab-parallel log-prob
    fused  megatron.mpu.fused_linear_logprobs: the GEMM and the log-softmax per chunk of tokens, recomputed
           in backward; never more than one chunk of logits

Both see the same input mapping as the plain head (ColumnParallelLinear): under sequence parallelism the
sequence is all-gathered first (reduce-scattered in backward), otherwise `copy_to_tp_region` (all-reduce in
backward); selected positions (`index`) are taken after that gather.
"""
from __future__ import annotations

from typing import Any, Optional, Tuple, Union

import torch
import torch.nn.functional as F

from megatron.mpu import (ParallelState, copy_to_tp_region, fused_linear_logprobs,
                          gather_from_sequence_parallel_region, vocab_parallel_logprobs,
                          vocab_parallel_logprobs_entropy)

# Tokens per fp32 chunk of the eager path's log-softmax (bounds its fp32 working set, as before the registry).
EAGER_CHUNK_TOKENS = 4096


def head_input(h: torch.Tensor, ps: ParallelState, sp_group: Any, index: Optional[torch.Tensor]) -> torch.Tensor:
    """The head's input on every TP rank: h [B, S(/tp), H] (or [T, H] already selected when not under SP) ->
    [B, S, H], or [T, H] rows `index` (flat b*S+t) of it."""
    if sp_group is not None:
        h = gather_from_sequence_parallel_region(h, sp_group, dim=1, tensor_parallel_output_grad=True)
        return h if index is None else h.reshape(-1, h.shape[-1]).index_select(0, index)
    if index is not None and h.dim() == 3:
        h = h.reshape(-1, h.shape[-1]).index_select(0, index)
    return copy_to_tp_region(h, ps.tp_group)


def head_logprobs(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, ps: ParallelState, kernel: str,
                  vocab_size: int, with_entropy: bool = False, chunk_size: Optional[int] = None
                  ) -> Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]:
    """log p(targets) under softmax(h W^T) over the real vocabulary, by registry choice `kernel`.

    h: [..., H] after `head_input`; weight: [Vp/tp, H] this rank's rows; targets: [...] long global ids
    (< vocab_size). Returns fp32 [...] (nats), or (logp, entropy) with `with_entropy`; identical on every TP rank.
    chunk_size: tokens per chunk (None: EAGER_CHUNK_TOKENS for eager, ~32 MiB of fp32 logits for fused).
    """
    if kernel == "fused":
        logp, ent = fused_linear_logprobs(h, weight, targets, ps, vocab_size, chunk_size, with_entropy)
    elif kernel == "eager":
        logits = F.linear(h, weight)
        chunk = chunk_size or EAGER_CHUNK_TOKENS
        if with_entropy:
            logp, ent = vocab_parallel_logprobs_entropy(logits, targets, ps, chunk, vocab_size=vocab_size)
        else:
            logp, ent = vocab_parallel_logprobs(logits, targets, ps, chunk, vocab_size=vocab_size), None
    else:
        raise ValueError(f"head kernel {kernel!r} is not one of eager, fused")
    return (logp, ent) if with_entropy else logp
