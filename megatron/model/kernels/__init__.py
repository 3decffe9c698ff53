"""Model kernels: one registry (`resolve_kernels`) naming each op's implementation, the fast paths
(fused autograd functions, compiled regions) and their plain-torch twins. See registry.py for the table.

The LM head + log-prob kernels live in megatron.mpu (cross_entropy.py, fused_logprobs.py): they are
vocab-parallel collectives, below the model in the import order.
"""
from .activation import fused_swiglu, swiglu
from .norm import fused_rms_norm
from .registry import KERNEL_PRESETS, OP_CHOICES, KernelPlan, describe_kernels, resolve_kernels
from .rotary import fused_rotary

__all__ = ["KERNEL_PRESETS", "OP_CHOICES", "KernelPlan", "describe_kernels", "resolve_kernels", "fused_rms_norm",
           "fused_rotary", "fused_swiglu", "swiglu"]
