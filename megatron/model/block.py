"""One pre-norm decoder block, sequential (Llama) or parallel-residual (GPT-NeoX / GPT-J)."""
from __future__ import annotations

import torch
from torch import nn

from megatron.mpu import ParallelState

from .attention import SelfAttention
from .layer_utils import hidden_dropout, sequence_parallel_group
from .mlp import MLP
from .norm import build_norm


class TransformerBlock(nn.Module):
    """input_norm -> attention -> (+x); post_attention_norm -> MLP -> (+).

    sequential:        h = x + drop(attn(ln1(x)));  out = h + drop(mlp(ln2(h)))
    parallel_residual: out = x + drop(attn(ln1(x))) + drop(mlp(ln2(x)))
    Submodules (canonical names): input_norm, attention, post_attention_norm, mlp.
    forward(x [B, S, H] (or [B, S/tp, H] with sequence parallelism), position_ids [B, S], segment_ids [B, S])
      -> same shape as x.
    """

    def __init__(self, cfg, ps: ParallelState):
        super().__init__()
        self.sp_group = sequence_parallel_group(cfg, ps)
        self.parallel_residual = cfg.model.parallel_residual
        self.dropout = cfg.model.dropout
        self.input_norm = build_norm(cfg, self.sp_group)
        self.attention = SelfAttention(cfg, ps)
        self.post_attention_norm = build_norm(cfg, self.sp_group)
        self.mlp = MLP(cfg, ps)

    def _drop(self, x: torch.Tensor) -> torch.Tensor:
        return hidden_dropout(x, self.dropout, self.training, self.sp_group)

    def forward(self, x: torch.Tensor, position_ids: torch.Tensor, segment_ids: torch.Tensor,
                cache=None) -> torch.Tensor:
        """x [B, S(/tp), H] -> [B, S(/tp), H]. cache: generation only, this layer's KV cache (see SelfAttention)."""
        attn = self._drop(self.attention(self.input_norm(x), position_ids, segment_ids, cache=cache))
        if self.parallel_residual:
            return x + attn + self._drop(self.mlp(self.post_attention_norm(x)))
        h = x + attn
        return h + self._drop(self.mlp(self.post_attention_norm(h)))
