"""DeepSpeed's PipelineEngine with a correct global gradient norm for plain fp32 (ZeRO-0) training.

Why: for fp32 without ZeRO, DeepSpeed clips with `runtime.utils.clip_grad_norm_(mpu=grid)`, which counts a
parameter that is not tensor-parallel only on model-parallel rank 0 of the (pipe x tensor) group, so the
replicated parameters of every later stage (all of them at tensor=1) drop out of the norm, and it keeps
no norm for logging. Here the norm is measured once the gradients are reduced (data-parallel all-reduce
and tied-embedding all-reduce are done): tensor-parallel shards on every TP rank, replicated parameters on
TP rank 0, each stage's own parameters (a tied copy marked `ds_pipe_replicated` only on its owner), summed
over the tensor and pipeline groups (megatron.engines.grad_norm.global_grad_norm). Clipping then uses
DeepSpeed's own rule `g *= min(1, max_norm / (norm + 1e-6))`, the rule of the unpipelined engine.
ZeRO-1 and mixed precision keep DeepSpeed's optimizer-side norm, which already handles pipelines.
"""
from __future__ import annotations

import torch
from deepspeed.runtime.pipe import schedule
from deepspeed.runtime.pipe.engine import PipelineEngine

from .grad_norm import global_grad_norm


class MegatronPipelineEngine(PipelineEngine):
    """PipelineEngine + the fp32 gradient norm above. Created by `adopt(engine, ps)` after
    `deepspeed.initialize` (which always builds a plain PipelineEngine for a PipelineModule)."""

    @classmethod
    def adopt(cls, engine: PipelineEngine, ps) -> "MegatronPipelineEngine":
        """Make `engine` (built by deepspeed.initialize) this class; it adds methods only, no state but `ps`."""
        engine.__class__ = cls
        engine.parallel_state = ps
        return engine

    def _owns_fp32_clipping(self) -> bool:
        return not (self.fp16_enabled() or self.bfloat16_enabled() or self.zero_optimization())

    def _exec_reduce_grads(self):
        super()._exec_reduce_grads()
        if self._owns_fp32_clipping():
            params = [p for p in self.module.parameters() if not getattr(p, "ds_pipe_replicated", False)]
            self._global_grad_norm = global_grad_norm(params, self.parallel_state)

    # The schedule dispatches through this table of functions, not through method lookup.
    _INSTRUCTION_MAP = {**PipelineEngine._INSTRUCTION_MAP, schedule.ReduceGrads: _exec_reduce_grads}

    def clip_fp32_gradients(self):
        """Clip to `gradient_clipping` with the norm measured in `_exec_reduce_grads`."""
        coef = min(1.0, float(self.gradient_clipping()) / (self._global_grad_norm + 1e-6))
        with torch.no_grad():
            for p in self.module.parameters():
                if p.grad is not None:
                    p.grad.mul_(coef)
