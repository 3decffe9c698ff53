"""Small helpers shared by the layers: the sequence-parallel group, the weight initialiser, hidden dropout."""
from __future__ import annotations

from typing import Any, Optional

import torch

from megatron.mpu import ParallelState, group_rank, group_size, normal_init


def sequence_parallel_group(cfg, ps: ParallelState) -> Optional[Any]:
    """The TP group when sequence parallelism is active (cfg.parallel.sequence_parallel and tp > 1), else None."""
    return ps.tp_group if cfg.parallel.sequence_parallel and ps.tp_size > 1 else None


def init_method(cfg):
    """Weight initialiser N(0, cfg.model.init_std^2) applied to full master weights (TP-invariant)."""
    return normal_init(cfg.model.init_std)


def hidden_dropout(x: torch.Tensor, p: float, training: bool, sp_group: Any = None) -> torch.Tensor:
    """Dropout on hidden states x [B, S, H] (or the sequence shard [B, S/tp, H] when `sp_group` is given).

    The keep-mask is always drawn for the FULL [B, S, H] from the default RNG (in sync across a TP group) and,
    under sequence parallelism, this rank's sequence slice is kept: so dropout is identical with and without
    sequence parallelism, and torch.utils.checkpoint's RNG restore makes recomputation reproduce it.
    """
    if not training or p == 0.0:
        return x
    size = group_size(sp_group) if sp_group is not None else 1
    full = (x.shape[0], x.shape[1] * size) + tuple(x.shape[2:])
    keep = torch.empty(full, device=x.device, dtype=x.dtype).bernoulli_(1.0 - p)
    if size > 1:
        keep = keep.chunk(size, dim=1)[group_rank(sp_group)]
    return x * keep / (1.0 - p)
