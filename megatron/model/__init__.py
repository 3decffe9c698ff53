"""Decoder-only transformer core: norms, rotary, attention backends, blocks, the GPT model and its
pipeline layer specs. Parameter names follow the canonical table in docs/ARCHITECTURE.md."""
from .attention import SelfAttention
from .attention_backends import (BACKENDS, core_attention, eager_attention, flash_attention, packed_causal_mask,
                                 resolve_backend, sdpa_attention, segment_attention)
from .block import TransformerBlock
from .gpt import GPTModel, activation_checkpoint_func
from .mlp import MLP
from .norm import LayerNorm, Norm, RMSNorm, build_norm
from .partition_spec import tp_partition
from .rotary import RotaryEmbedding, apply_rotary, compute_inv_freq, rotate_half
from .specs import CHECKPOINTABLE_LAYERS, canonical_prefix, layer_specs
from .stages import (BlockStage, EmbeddingStage, FinalNormStage, LMHeadStage, ValueHeadStage,
                     tied_lm_head_forward)

__all__ = [
    "SelfAttention", "BACKENDS", "core_attention", "eager_attention", "flash_attention", "packed_causal_mask",
    "resolve_backend", "sdpa_attention", "segment_attention", "TransformerBlock", "GPTModel",
    "activation_checkpoint_func", "MLP",
    "LayerNorm", "Norm", "RMSNorm", "build_norm", "RotaryEmbedding", "apply_rotary", "compute_inv_freq",
    "rotate_half", "tp_partition", "CHECKPOINTABLE_LAYERS", "canonical_prefix", "layer_specs", "BlockStage", "EmbeddingStage",
    "FinalNormStage", "LMHeadStage", "ValueHeadStage", "tied_lm_head_forward",
]
