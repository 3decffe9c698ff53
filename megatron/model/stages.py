"""Pipeline stage modules: each maps a tuple to a tuple (the head to a tensor), so the same list runs
unpipelined (`GPTModel`) or cut into DeepSpeed `PipelineModule` stages (`layer_specs`).

    EmbeddingStage  (input_ids, position_ids, segment_ids) -> (h, position_ids, segment_ids)
    BlockStage      (h, pos, seg) -> (h, pos, seg)
    FinalNormStage  (h, pos, seg) -> (h, pos, seg)
    LMHeadStage     (h, pos, seg) -> logits shard [B, S, Vp/tp]
    ValueHeadStage  (h, pos, seg) -> values [B, S] fp32
    tied_lm_head_forward(embedding_stage, (h, pos, seg)) -> logits shard (tied input/output embeddings)

h is [B, S, H], or the sequence shard [B, S/tp, H] under sequence parallelism (reduce-scattered by the
embedding, all-gathered again by the head). Each stage holds its parameters under the canonical names
relative to its own prefix (see docs/ARCHITECTURE.md).
"""
from __future__ import annotations

from typing import Tuple

import torch
import torch.nn.functional as F
from torch import nn

from megatron.mpu import (ColumnParallelLinear, ParallelState, VocabParallelEmbedding, copy_to_tp_region,
                          gather_from_sequence_parallel_region)

from .block import TransformerBlock
from .head import head_input, head_logprobs
from .kernels.registry import resolve_kernels
from .layer_utils import init_method, sequence_parallel_group
from .norm import Norm

Hidden = Tuple[torch.Tensor, torch.Tensor, torch.Tensor]


class EmbeddingStage(nn.Module):
    """`word_embeddings`: VocabParallelEmbedding [Vp/tp, H] of cfg.derived.padded_vocab_size.

    forward((input_ids [B, S] long, position_ids [B, S], segment_ids [B, S])) -> (h [B, S(/tp), H], pos, seg).
    Positions enter only through rotary in attention; there is no learned position table.
    """

    def __init__(self, cfg, ps: ParallelState):
        super().__init__()
        self.sp_group = sequence_parallel_group(cfg, ps)
        self.tp_group = ps.tp_group
        self.word_embeddings = VocabParallelEmbedding(cfg.derived.padded_vocab_size, cfg.model.hidden_size, ps,
                                                      init_method=init_method(cfg),
                                                      sequence_parallel=self.sp_group is not None)
        self.ps, self.vocab_size, self.head_kernel = ps, cfg.model.vocab_size, resolve_kernels(cfg).head

    def forward(self, inputs: Hidden) -> Hidden:
        """(ids, pos, seg) -> (h [B, S(/tp), H], pos, seg)."""
        input_ids, position_ids, segment_ids = inputs
        return self.word_embeddings(input_ids), position_ids, segment_ids

    def lm_logits(self, h: torch.Tensor) -> torch.Tensor:
        """Tied output embedding: h [B, S(/tp), H] -> logits shard [B, S, Vp/tp] = h @ word_embeddings.weight^T."""
        if self.sp_group is not None:
            h = gather_from_sequence_parallel_region(h, self.sp_group, dim=1, tensor_parallel_output_grad=True)
        else:
            h = copy_to_tp_region(h, self.tp_group)
        return F.linear(h, self.word_embeddings.weight)

    def lm_logprobs(self, h: torch.Tensor, targets: torch.Tensor, index=None, with_entropy: bool = False):
        """Tied head + log-prob (registry op `head`): h [B, S(/tp), H] (or [T, H] selected), targets [B, S] (or
        [T] at flat positions `index`) -> log p(targets) fp32 (and the entropy), padded ids masked."""
        return head_logprobs(head_input(h, self.ps, self.sp_group, index), self.word_embeddings.weight, targets,
                             self.ps, self.head_kernel, self.vocab_size, with_entropy)


class BlockStage(TransformerBlock):
    """A TransformerBlock on the stage tuple: (h, pos, seg) -> (h', pos, seg)."""

    def forward(self, inputs: Hidden, cache=None) -> Hidden:  # type: ignore[override]
        """(h [B, S(/tp), H], pos [B, S], seg [B, S]) -> (h', pos, seg). cache: generation only (LayerCache)."""
        h, position_ids, segment_ids = inputs
        return super().forward(h, position_ids, segment_ids, cache=cache), position_ids, segment_ids


class FinalNormStage(Norm):
    """The final norm (cfg.model.norm) with `weight` (and `bias`) held directly: (h, pos, seg) -> (norm(h), pos, seg)."""

    def __init__(self, cfg, ps: ParallelState):
        m = cfg.model
        super().__init__(m.hidden_size, m.norm, m.norm_eps, sequence_parallel_group(cfg, ps),
                         kernel=resolve_kernels(cfg).norm)

    def forward(self, inputs: Hidden) -> Hidden:  # type: ignore[override]
        """(h [B, S(/tp), H], pos, seg) -> (normalised h, pos, seg)."""
        h, position_ids, segment_ids = inputs
        return super().forward(h), position_ids, segment_ids


class LMHeadStage(ColumnParallelLinear):
    """Untied output projection `weight` [Vp/tp, H], no bias, output not gathered (vocab-parallel logits).

    forward((h [B, S(/tp), H], pos, seg)) -> logits shard [B, S, Vp/tp] (the sequence is gathered under SP);
    with `targets`, the head + log-prob op instead (see `forward`).
    """

    def __init__(self, cfg, ps: ParallelState):
        super().__init__(cfg.model.hidden_size, cfg.derived.padded_vocab_size, ps, bias=False, gather_output=False,
                         init_method=init_method(cfg), sequence_parallel=sequence_parallel_group(cfg, ps) is not None)
        self.ps, self.vocab_size, self.head_kernel = ps, cfg.model.vocab_size, resolve_kernels(cfg).head
        self.sp_group = ps.tp_group if self.sequence_parallel else None

    def forward(self, inputs: Hidden, targets=None, index=None, with_entropy: bool = False):  # type: ignore[override]
        """(h, pos, seg) -> logits shard [B, S, Vp/tp]. With targets ([B, S], or [T] at flat positions `index`):
        log p(targets) fp32 of the same shape (and the entropy with `with_entropy`), by the registry's `head`
        kernel, padded vocabulary ids masked; no logits are returned (the fused kernel never holds them all)."""
        if targets is None:
            return super().forward(inputs[0])
        return head_logprobs(head_input(inputs[0], self.ps, self.sp_group, index), self.weight, targets, self.ps,
                             self.head_kernel, self.vocab_size, with_entropy)


class ValueHeadStage(nn.Linear):
    """Scalar reward/value head: `weight` [1, H] ~ N(0, init_std^2), `bias` [1] = 0, replicated, fp32 math.

    forward((h [B, S(/tp), H], pos, seg)) -> values [B, S] fp32 (the sequence is gathered under SP).
    """

    def __init__(self, cfg, ps: ParallelState):
        super().__init__(cfg.model.hidden_size, 1, bias=True, dtype=torch.float32)
        self.sp_group = sequence_parallel_group(cfg, ps)
        with torch.no_grad():
            self.weight.normal_(0.0, cfg.model.init_std)
            self.bias.zero_()

    def forward(self, inputs: Hidden) -> torch.Tensor:  # type: ignore[override]
        """(h, pos, seg) -> [B, S] fp32."""
        h = inputs[0]
        if self.sp_group is not None:  # replicated consumer: backward keeps this rank's slice, no reduction
            h = gather_from_sequence_parallel_region(h, self.sp_group, dim=1, tensor_parallel_output_grad=False)
        return F.linear(h.float(), self.weight.float(), self.bias.float()).squeeze(-1)


def tied_lm_head_forward(embedding: EmbeddingStage, inputs: Hidden) -> torch.Tensor:
    """Head with tied embeddings (a TiedLayerSpec forward_fn): (h, pos, seg) -> logits shard [B, S, Vp/tp]."""
    return embedding.lm_logits(inputs[0])
