"""Self-attention: fused QKV (column parallel), rotary, core attention backend, output projection (row parallel)."""
from __future__ import annotations

import torch
from torch import nn

from megatron.mpu import ColumnParallelLinear, ParallelState, RowParallelLinear, divide

from .attention_backends import core_attention
from .kernels.registry import resolve_kernels
from .kernels.rotary import rotary_kernel
from .layer_utils import init_method, sequence_parallel_group
from .rotary import RotaryEmbedding


class SelfAttention(nn.Module):
    """Causal self-attention over packed rows with grouped-query heads (GQA, arXiv:2305.13245).

    Parameters (per TP rank; nq = heads, nkv = kv heads, hd = head dim, H = hidden):
      qkv.weight [(nq + 2 nkv)/tp * hd, H] with rows [q heads | k heads | v heads] of this rank
      (ColumnParallelLinear chunks=[nq*hd, nkv*hd, nkv*hd]), qkv.bias with cfg.model.qkv_bias;
      dense.weight [H, nq/tp * hd], dense.bias [H] with cfg.model.linear_bias.
    forward(x [B, S, H] or [B, S/tp, H] under sequence parallelism, position_ids [B, S], segment_ids [B, S])
      -> [B, S, H] (or [B, S/tp, H]).
    """

    def __init__(self, cfg, ps: ParallelState):
        super().__init__()
        m, d = cfg.model, cfg.derived
        hd = d.head_dim
        self.num_heads = divide(m.num_attention_heads, ps.tp_size, "model.num_attention_heads")
        self.num_kv_heads = divide(d.num_kv_heads, ps.tp_size, "num_kv_heads")
        self.head_dim = hd
        plan = resolve_kernels(cfg)  # the kernel registry: attention backend and rotary implementation
        self.backend = plan.attention
        self._rotate = rotary_kernel(plan.rotary)
        sp = sequence_parallel_group(cfg, ps) is not None
        nq, nkv = m.num_attention_heads, d.num_kv_heads
        self.qkv = ColumnParallelLinear(m.hidden_size, (nq + 2 * nkv) * hd, ps, bias=m.qkv_bias,
                                        init_method=init_method(cfg), sequence_parallel=sp,
                                        chunks=[nq * hd, nkv * hd, nkv * hd])
        self.dense = RowParallelLinear(nq * hd, m.hidden_size, ps, bias=m.linear_bias, input_is_parallel=True,
                                       init_method=init_method(cfg), sequence_parallel=sp)
        self.rotary = RotaryEmbedding.from_config(cfg)

    def forward(self, x: torch.Tensor, position_ids: torch.Tensor, segment_ids: torch.Tensor,
                cache=None) -> torch.Tensor:
        """x [B, S(/tp), H], position_ids, segment_ids [B, S] -> [B, S(/tp), H].

        cache: generation only, this layer's KV cache (megatron.generation.kv_cache.LayerCache): it stores the
        new k, v and attends over the cached prefix (segment_ids unused)."""
        qkv = self.qkv(x)  # [B, S, (nq + 2 nkv)/tp * hd]: gathers the sequence under SP
        B, S = qkv.shape[:2]
        hd = self.head_dim
        q, k, v = qkv.split([self.num_heads * hd, self.num_kv_heads * hd, self.num_kv_heads * hd], dim=-1)
        q = q.reshape(B, S, self.num_heads, hd)
        k = k.reshape(B, S, self.num_kv_heads, hd)
        v = v.reshape(B, S, self.num_kv_heads, hd)
        q, k = self._rotate(self.rotary, q, k, position_ids)
        if cache is not None:
            out = cache.attend(q, k, v)  # [B, S, nq/tp, hd]
        else:
            out = core_attention(q, k, v, segment_ids, self.backend)  # [B, S, nq/tp, hd]
        return self.dense(out.reshape(B, S, self.num_heads * hd))
