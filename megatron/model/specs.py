"""The model as a list of DeepSpeed layer specs (for `PipelineModule`) and the mapping from a spec's index to
the canonical parameter prefix.

Order (index: spec -> canonical prefix):
    0:       embedding          -> 'embedding.'   (TiedLayerSpec key 'embed' when embeddings are tied)
    1..L:    block i = index-1  -> 'blocks.{i}.'
    L+1:     final norm         -> 'final_norm.'
    L+2:     head               -> 'lm_head.' | 'value_head.' | 'embedding.' (tied: the head reuses the
                                   embedding's `word_embeddings.weight`; DeepSpeed keeps it under
                                   'tied_modules.embed.')
"""
from __future__ import annotations

from typing import List

from megatron.mpu import ParallelState

from .stages import (BlockStage, EmbeddingStage, FinalNormStage, LMHeadStage, ValueHeadStage,
                     tied_lm_head_forward)

TIED_EMBEDDING_KEY = "embed"
TIED_WEIGHT_ATTR = "word_embeddings.weight"
CHECKPOINTABLE_LAYERS = ("BlockStage",)  # for PipelineModule(checkpointable_layers=...)


def _tied(cfg) -> bool:
    return cfg.model.tie_embeddings and not cfg.model.value_head


def layer_specs(cfg, ps: ParallelState) -> List["LayerSpec"]:
    """num_layers + 3 deepspeed.pipe specs: embedding, blocks, final norm, head (see module docstring)."""
    from deepspeed.pipe import LayerSpec, TiedLayerSpec  # lazy: importing deepspeed probes accelerators

    if _tied(cfg):
        specs = [TiedLayerSpec(TIED_EMBEDDING_KEY, EmbeddingStage, cfg, ps,
                                                tied_weight_attr=[TIED_WEIGHT_ATTR])]
    else:
        specs = [LayerSpec(EmbeddingStage, cfg, ps)]
    specs += [LayerSpec(BlockStage, cfg, ps) for _ in range(cfg.model.num_layers)]
    specs.append(LayerSpec(FinalNormStage, cfg, ps))
    if cfg.model.value_head:
        specs.append(LayerSpec(ValueHeadStage, cfg, ps))
    elif _tied(cfg):
        specs.append(TiedLayerSpec(TIED_EMBEDDING_KEY, EmbeddingStage, cfg, ps, forward_fn=tied_lm_head_forward,
                                   tied_weight_attr=[TIED_WEIGHT_ATTR]))
    else:
        specs.append(LayerSpec(LMHeadStage, cfg, ps))
    return specs


def canonical_prefix(layer_index: int, cfg) -> str:
    """Canonical state-dict prefix of the parameters of spec `layer_index` (0-based, as in layer_specs)."""
    L = cfg.model.num_layers
    if layer_index == 0:
        return "embedding."
    if 1 <= layer_index <= L:
        return f"blocks.{layer_index - 1}."
    if layer_index == L + 1:
        return "final_norm."
    if layer_index == L + 2:
        if cfg.model.value_head:
            return "value_head."
        return "embedding." if _tied(cfg) else "lm_head."
    raise IndexError(f"layer index {layer_index} is outside the {L + 3} layer specs")
