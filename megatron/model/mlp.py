"""Feed-forward block: SwiGLU (Shazeer 2020, arXiv:2002.05202, as in Llama) or exact-erf GeLU (GPT-NeoX)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from megatron.mpu import ColumnParallelLinear, ParallelState, RowParallelLinear

from .kernels.activation import fused_swiglu, swiglu
from .kernels.registry import resolve_kernels
from .layer_utils import init_method, sequence_parallel_group


class MLP(nn.Module):
    """fc1 (column parallel) -> activation -> fc2 (row parallel). F = cfg.derived.ffn_hidden_size.

    swiglu: fc1.weight [2F/tp, H] with rows [gate | up] of this rank (chunks=[F, F]); out = fc2(silu(gate) * up).
    gelu:   fc1.weight [F/tp, H]; out = fc2(gelu_erf(fc1(x))).
    fc2.weight [H, F/tp]; biases on fc1/fc2 with cfg.model.linear_bias.
    forward: x [B, S, H] (or [B, S/tp, H] under sequence parallelism) -> same shape.
    """

    def __init__(self, cfg, ps: ParallelState):
        super().__init__()
        m, ffn = cfg.model, cfg.derived.ffn_hidden_size
        self.swiglu = m.activation == "swiglu"
        sp = sequence_parallel_group(cfg, ps) is not None
        self.fc1 = ColumnParallelLinear(m.hidden_size, 2 * ffn if self.swiglu else ffn, ps, bias=m.linear_bias,
                                        init_method=init_method(cfg), sequence_parallel=sp,
                                        chunks=[ffn, ffn] if self.swiglu else None)
        self.fc2 = RowParallelLinear(ffn, m.hidden_size, ps, bias=m.linear_bias, input_is_parallel=True,
                                     init_method=init_method(cfg), sequence_parallel=sp)
        self.kernel = resolve_kernels(cfg).mlp
        self._act = activation_kernel(self.swiglu, self.kernel)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, S(/tp), H] -> [B, S(/tp), H]."""
        return self.fc2(self._act(self.fc1(x)))


def activation_kernel(swiglu_act: bool, kernel: str):
    """h -> activation(h) for registry choice `kernel` (eager | fused | compiled): SwiGLU ([.., 2F] = [gate | up]
    -> silu(gate) * up [.., F]) or exact-erf GeLU (GPT-NeoX's "gelu"; one native kernel, the same in all)."""
    if kernel not in ("eager", "fused", "compiled"):
        raise ValueError(f"mlp kernel {kernel!r} is not one of eager, fused, compiled")
    if kernel == "compiled":
        from .kernels.compiled import compiled_activation
        return compiled_activation(swiglu_act)
    if not swiglu_act:
        return F.gelu
    return fused_swiglu if kernel == "fused" else swiglu
