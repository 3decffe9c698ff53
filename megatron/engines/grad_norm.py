"""Global gradient L2 norm of a tensor/pipeline-parallel model, the same number one rank would see."""
from __future__ import annotations

from typing import Iterable

import torch
import torch.distributed as dist


def global_grad_norm(params: Iterable[torch.nn.Parameter], ps) -> float:
    """sqrt(sum of squared gradients) over the whole model.

    Parameters split across the TP group (flag `tensor_model_parallel`) contribute on every TP rank;
    replicated ones (norms, row-parallel biases) only on TP rank 0, so nothing is counted twice. The
    partial sums are added over the tensor and pipeline groups. Gradients must already be reduced over
    the data-parallel group (true at an accumulation boundary, after `engine.backward`).
    """
    # Per-tensor norms in fp32 (no float64 copy of every gradient), squared and summed in float64.
    norms = [torch.linalg.vector_norm(p.grad.detach(), dtype=torch.float32) for p in params
             if p.grad is not None and (getattr(p, "tensor_model_parallel", False) or ps.tp_rank == 0)]
    if norms:  # on the gradients' device, so NCCL can reduce it
        total = torch.stack(norms).double().pow(2).sum().reshape(1)
    else:
        device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else "cpu"
        total = torch.zeros(1, dtype=torch.float64, device=device)
    if dist.is_initialized():
        for size, group in ((ps.tp_size, ps.tp_group), (ps.pp_size, ps.pp_group)):
            if size > 1:
                dist.all_reduce(total, group=group)
    return float(total.sqrt())
