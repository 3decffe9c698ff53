"""Generation on the training model's shards: a preallocated KV cache with explicit lengths, vocab-parallel
sampling keyed by (seed, prompt index, sample index), and `generate()` (ragged prompts, n samples, stops).
See docs/ARCHITECTURE.md, `megatron/generation/`."""
from .generate import Completion, PromptTooLong, generate
from .kv_cache import KVCache, LayerCache
from .noise import sample_uniforms
from .replica import generation_model
from .sampling import SamplingParams, sample_next

__all__ = ["Completion", "PromptTooLong", "generate", "KVCache", "LayerCache", "sample_uniforms",
           "generation_model", "SamplingParams", "sample_next"]
