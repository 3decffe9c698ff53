"""The unpipelined decoder-only model: the stage modules of `stages.py` chained in one nn.Module."""
from __future__ import annotations

from typing import List, Optional

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from megatron.mpu import ParallelState

from .kernels.registry import resolve_kernels
from .layer_utils import sequence_parallel_group
from .unpad import PADDING_FREE_ATTENTION, unpad_plan
from .stages import (BlockStage, EmbeddingStage, FinalNormStage, Hidden, LMHeadStage, ValueHeadStage,
                     tied_lm_head_forward)


def activation_checkpoint_func(function, *args):
    """Non-reentrant activation checkpointing (torch.utils.checkpoint, use_reentrant=False); usable as
    DeepSpeed PipelineModule's `activation_checkpoint_func`. Recomputes `function(*args)` in backward."""
    return checkpoint(function, *args, use_reentrant=False)


def _run_blocks(blocks: List[BlockStage]):
    def run(h: torch.Tensor, position_ids: torch.Tensor, segment_ids: torch.Tensor) -> Hidden:
        x = (h, position_ids, segment_ids)
        for block in blocks:
            x = block(x)
        return x
    return run


class GPTModel(nn.Module):
    """Decoder-only transformer (Llama / GPT-NeoX / Qwen2 families, by config switches).

    Attributes, in build (and therefore initialisation) order: `embedding` (EmbeddingStage), `blocks`
    (nn.ModuleList of BlockStage), `final_norm` (FinalNormStage), then `lm_head` (LMHeadStage; absent with
    cfg.model.tie_embeddings) or `value_head` (ValueHeadStage, with cfg.model.value_head). `state_dict()`
    keys are exactly the canonical names of docs/ARCHITECTURE.md. Built after the same torch.manual_seed,
    the model is the same at any tensor-parallel size (each rank holding its shards). With `layer_seed`, the
    RNG is re-seeded `layer_seed + i` before the i-th layer spec (embedding 0, blocks 1..L, final norm L+1,
    head L+2), matching DeepSpeed's PipelineModule(seed_layers=True, base_seed=layer_seed,
    seed_fn=torch.manual_seed) at any pipeline split (its 'parameters' partitioning builds layers to count
    them, which otherwise consumes the RNG stream); the RNG is left seeded as after the last layer.

    forward(input_ids [B, S] long, position_ids [B, S] long, segment_ids [B, S] long)
      -> logits shard [B, S, padded_vocab/tp] (vocab-parallel, not gathered), or values [B, S] fp32.
    With cfg.parallel.activation_checkpointing, every cfg.parallel.checkpoint_num_layers consecutive blocks form
    one checkpointed chunk (recomputed in backward) while the model is in training mode.
    """

    def __init__(self, cfg, ps: ParallelState, layer_seed: Optional[int] = None):
        super().__init__()
        m, p = cfg.model, cfg.parallel
        self.tie_embeddings = m.tie_embeddings and not m.value_head
        # a segment-restricted attention backend lets the blocks skip padding (megatron/model/unpad.py)
        # Not with dropout: its masks follow the activation's shape, so dropping padding would change which
        # elements are dropped, and runs of one model with and without sequence parallelism (which keeps the
        # padded layout) would then differ.
        self.padding_free = (resolve_kernels(cfg).attention in PADDING_FREE_ATTENTION
                             and sequence_parallel_group(cfg, ps) is None and not m.dropout)
        self.checkpoint_chunk = p.checkpoint_num_layers if p.activation_checkpointing else 0

        def seeded(index: int):
            # Same as PipelineModule(seed_layers=True, base_seed=layer_seed, seed_fn=torch.manual_seed), which
            # seeds before building spec `index`: init then does not depend on how the layers are staged.
            if layer_seed is not None:
                torch.manual_seed(layer_seed + index)

        seeded(0)
        self.embedding = EmbeddingStage(cfg, ps)
        blocks = []
        for i in range(m.num_layers):
            seeded(1 + i)
            blocks.append(BlockStage(cfg, ps))
        self.blocks = nn.ModuleList(blocks)
        seeded(m.num_layers + 1)
        self.final_norm = FinalNormStage(cfg, ps)
        seeded(m.num_layers + 2)
        if m.value_head:
            self.value_head = ValueHeadStage(cfg, ps)
        elif not self.tie_embeddings:
            self.lm_head = LMHeadStage(cfg, ps)

    def head(self, x: Hidden) -> torch.Tensor:
        """(h, pos, seg) after the final norm -> logits shard [B, S, Vp/tp] or values [B, S]."""
        if hasattr(self, "value_head"):
            return self.value_head(x)
        if self.tie_embeddings:
            return tied_lm_head_forward(self.embedding, x)
        return self.lm_head(x)

    def head_logprobs(self, x: Hidden, labels: torch.Tensor, logit_index: Optional[torch.Tensor] = None,
                      with_entropy: bool = False):
        """(h, pos, seg) after the final norm, labels [B, S] (or [T] at logit_index) -> log p(labels) fp32
        (and the entropy). The untied head runs through lm_head's own call (its hooks fire, e.g. ZeRO-3)."""
        if hasattr(self, "value_head"):
            raise ValueError("GPTModel.forward(labels=...): this model has a value head, not an LM head")
        if self.tie_embeddings:
            return self.embedding.lm_logprobs(x[0], labels, logit_index, with_entropy)
        return self.lm_head(x, targets=labels, index=logit_index, with_entropy=with_entropy)

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor, segment_ids: torch.Tensor,
                logit_index: Optional[torch.Tensor] = None, cache=None, labels: Optional[torch.Tensor] = None,
                with_entropy: bool = False):
        """[B, S] ids, positions, segments -> logits shard [B, S, Vp/tp] (or values [B, S] fp32).

        logit_index: optional Long[T] flat positions b*S+t; the head then runs on those positions only and
        returns [T, Vp/tp] (or [T]): no logits for positions nobody scores (prompt tokens, padding).
        cache: generation only, a megatron.generation.KVCache between its begin() and commit(): every block
        stores its new keys/values there and attends over the cached prefix (segment_ids unused, may be None).
        labels: target ids [B, S] (or [T] with logit_index): returns log p(labels) fp32 of that shape instead of
        logits (with `with_entropy`, (logp, entropy)), by the kernel registry's `head` op (fused: never all the
        logits at once); padded vocabulary ids have probability 0.
        """
        if cache is not None:
            return self._forward_cached(input_ids, position_ids, logit_index, cache)
        unpad = unpad_plan(segment_ids) if self.padding_free else None  # blocks on the real tokens only
        if unpad is not None:
            layout = (position_ids, segment_ids)
            input_ids, position_ids, segment_ids = unpad.compress(input_ids, position_ids, segment_ids)
        x = self.embedding((input_ids, position_ids, segment_ids))
        step = self.checkpoint_chunk if (self.checkpoint_chunk and self.training) else len(self.blocks)
        blocks = list(self.blocks)
        for start in range(0, len(blocks), max(step, 1)):
            run = _run_blocks(blocks[start:start + step])
            x = activation_checkpoint_func(run, *x) if self.checkpoint_chunk and self.training else run(*x)
        x = self.final_norm(x)
        if unpad is not None:  # back to [B, S, H], zeros at padding
            x = (unpad.restore(x[0], None), *layout)
        if labels is not None:
            return self.head_logprobs(x, labels, logit_index, with_entropy)
        if logit_index is None:
            return self.head(x)
        if self.embedding.sp_group is not None:  # h is a sequence shard; the head gathers it first
            out = self.head(x)
            return out.reshape(-1, *out.shape[2:]).index_select(0, logit_index)
        h = x[0]
        return self.head((h.reshape(-1, h.shape[-1]).index_select(0, logit_index), x[1], x[2]))

    def _forward_cached(self, input_ids: torch.Tensor, position_ids: torch.Tensor,
                        logit_index: Optional[torch.Tensor], cache) -> torch.Tensor:
        """Incremental decoding: block i reads and extends cache.layer(i). Shapes as in forward."""
        x = self.embedding((input_ids, position_ids, None))
        for i, block in enumerate(self.blocks):
            x = block(x, cache=cache.layer(i))
        x = self.final_norm(x)
        if logit_index is None:
            return self.head(x)
        h = x[0]
        return self.head((h.reshape(-1, h.shape[-1]).index_select(0, logit_index), x[1], x[2]))
