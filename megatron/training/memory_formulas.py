"""Closed-form memory of one rank: model states (ZeRO) and activations (Korthikanti et al. 2022). Pure math.

Model states, per parameter held by the rank (Rajbhandari et al. 2020, "ZeRO", sec. 3 and 5):

    parameters  p bytes      (p = 4 for fp32, 2 for bf16/fp16)
    gradients   p bytes
    optimizer   K bytes      Adam m and v in fp32 (K = 8); with 16-bit parameters also the fp32 master copy (K = 12)

ZeRO divides over the data-parallel size dp: stage >= 1 the optimizer states, >= 2 also the gradients,
3 also the parameters.

Activations of one transformer layer for one micro-batch of b rows of s tokens, hidden h, a heads, tensor
size t (Korthikanti et al. 2022, "Reducing Activation Recomputation in Large Transformer Models", sec. 4,
eqs. 1-3, 16-bit activations and 1-byte dropout masks):

    no parallelism                 s b h (34 + 5 a s / h)
    tensor parallel                s b h (10 + 24 / t + 5 a s / (h t))
    tensor + sequence parallel     s b h (34 + 5 a s / h) / t
    full recomputation             2 s b h (the layer input only; / t with sequence parallelism)

The 5 a s / h term is the attention score, softmax and its dropout (a s^2 b values); a flash-attention
kernel never stores them, so it is left out when the attention backend is 'flash'. fp32 activations are
counted as twice the 16-bit figure (an upper bound: masks stay 1 byte).
"""
from __future__ import annotations

import math


def optimizer_bytes_per_param(param_bytes: int) -> int:
    """K: Adam's m and v in fp32, plus an fp32 master copy when the parameters are 16-bit."""
    return 8 if param_bytes >= 4 else 12


def model_state_bytes(num_params: int, param_bytes: int, zero_stage: int, dp: int) -> dict:
    """{'param_bytes', 'grad_bytes', 'optimizer_bytes'} of `num_params` parameters on one rank."""
    def shard(n: float, stage_needed: int) -> float:
        return n / dp if zero_stage >= stage_needed else n

    return {
        "param_bytes": int(math.ceil(shard(num_params * param_bytes, 3))),
        "grad_bytes": int(math.ceil(shard(num_params * param_bytes, 2))),
        "optimizer_bytes": int(math.ceil(shard(num_params * optimizer_bytes_per_param(param_bytes), 1))),
    }


def layer_activation_bytes(s: int, b: int, h: int, a: int, t: int, sequence_parallel: bool,
                           attention_scores: bool = True, act_bytes: int = 2) -> float:
    """Korthikanti et al. 2022 activation bytes of one transformer layer and micro-batch (no recomputation).

    attention_scores=False drops the 5 a s / h term (flash attention). act_bytes 4 doubles the 16-bit figure.
    """
    attn = 5.0 * a * s / h if attention_scores else 0.0
    if sequence_parallel and t > 1:
        per = s * b * h * (34.0 + attn) / t
    elif t > 1:
        per = s * b * h * (10.0 + 24.0 / t + attn / t)
    else:
        per = s * b * h * (34.0 + attn)
    return per * act_bytes / 2.0


def stage_activation_bytes(num_layers: int, s: int, b: int, h: int, a: int, t: int, sequence_parallel: bool,
                           checkpoint_layers: int = 0, attention_scores: bool = True, act_bytes: int = 2) -> float:
    """Activation bytes of `num_layers` layers for one micro-batch.

    checkpoint_layers = c > 0 (full recomputation of every c consecutive layers): each chunk keeps its input,
    2 s b h (/ t with sequence parallelism, scaled by act_bytes / 2), and the backward pass holds one chunk's
    recomputed activations at a time, so the peak is ceil(L / c) inputs + min(c, L) layers.
    """
    full = layer_activation_bytes(s, b, h, a, t, sequence_parallel, attention_scores, act_bytes)
    if checkpoint_layers <= 0 or num_layers == 0:
        return num_layers * full
    kept = 2.0 * s * b * h / (t if sequence_parallel and t > 1 else 1) * act_bytes / 2.0
    return math.ceil(num_layers / checkpoint_layers) * kept + min(checkpoint_layers, num_layers) * full


def logits_bytes(s: int, b: int, padded_vocab: int, t: int) -> float:
    """The output layer's fp32 logits for the loss, 4 s b v / t (Korthikanti et al. 2022, sec. 4.3)."""
    return 4.0 * s * b * padded_vocab / t
