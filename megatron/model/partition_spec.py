"""How each canonical parameter is split across tensor-parallel ranks, for resharding and for tests.

`tp_partition(name, cfg)` returns `(dim, chunks)`: the split dimension (None = replicated) and, for fused
weights, the full block sizes (as `megatron.mpu.shard_tensor` takes them). With it,
`shard_tensor(full, rank, tp, dim, chunks)` gives rank's tensor and `unshard_tensor(shards, dim, chunks)`
the full one.
"""
from __future__ import annotations

from typing import List, Optional, Tuple


def tp_partition(name: str, cfg) -> Tuple[Optional[int], Optional[List[int]]]:
    """(dim, chunks) for canonical parameter `name` (e.g. 'blocks.3.attention.qkv.weight')."""
    m, d = cfg.model, cfg.derived
    if name in ("embedding.word_embeddings.weight", "lm_head.weight"):
        return 0, None
    if name.startswith("blocks."):
        leaf = name.split(".", 2)[2]  # e.g. 'attention.qkv.weight'
        if leaf.startswith("attention.qkv."):
            hd = d.head_dim
            return 0, [m.num_attention_heads * hd, d.num_kv_heads * hd, d.num_kv_heads * hd]
        if leaf.startswith("mlp.fc1."):
            return 0, ([d.ffn_hidden_size] * 2 if m.activation == "swiglu" else None)
        if leaf in ("attention.dense.weight", "mlp.fc2.weight"):
            return 1, None
        if leaf in ("attention.dense.bias", "mlp.fc2.bias") or "norm." in leaf:
            return None, None
        raise KeyError(f"{name!r} is not a canonical parameter name")
    if name.startswith(("final_norm.", "value_head.")):
        return None, None
    raise KeyError(f"{name!r} is not a canonical parameter name")
