"""Tensor-parallel foundation: process-group state, communication mappings, parallel layers,
vocab-parallel cross-entropy and RNG tracking. No module-level state: pass a `ParallelState`."""
from megatron.mpu.layout import GridLayout, make_layout
from megatron.mpu.parallel_state import ParallelState, initialize_parallel
from megatron.mpu.mappings import (copy_to_tp_region, gather_from_sequence_parallel_region,
                                   gather_from_tp_region, group_rank, group_size, reduce_from_tp_region,
                                   reduce_scatter_to_sequence_parallel_region, scatter_to_sequence_parallel_region,
                                   scatter_to_tp_region)
from megatron.mpu.partition import divide, shard_tensor, unshard_tensor
from megatron.mpu.layers import ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding, normal_init

__all__ = [
    "GridLayout", "make_layout", "ParallelState", "initialize_parallel",
    "copy_to_tp_region", "reduce_from_tp_region", "scatter_to_tp_region", "gather_from_tp_region",
    "scatter_to_sequence_parallel_region", "gather_from_sequence_parallel_region",
    "reduce_scatter_to_sequence_parallel_region", "group_size", "group_rank",
    "divide", "shard_tensor", "unshard_tensor",
    "ColumnParallelLinear", "RowParallelLinear", "VocabParallelEmbedding", "normal_init",
]
from megatron.mpu.cross_entropy import (mask_padded_vocab, valid_vocab_columns, vocab_parallel_cross_entropy,
                                        vocab_parallel_entropy, vocab_parallel_log_softmax, vocab_parallel_logprobs,
                                        vocab_parallel_logprobs_entropy)
from megatron.mpu.fused_logprobs import fused_linear_logprobs
from megatron.mpu.random import MODEL_PARALLEL_RNG, RNGTracker, model_parallel_seed

__all__ += ["vocab_parallel_cross_entropy", "vocab_parallel_logprobs", "vocab_parallel_logprobs_entropy",
            "vocab_parallel_entropy", "vocab_parallel_log_softmax", "mask_padded_vocab", "valid_vocab_columns",
            "fused_linear_logprobs", "MODEL_PARALLEL_RNG", "RNGTracker", "model_parallel_seed"]
