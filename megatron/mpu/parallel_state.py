"""Process groups of the (pipeline, data, tensor) grid, held in a plain object passed explicitly.

`initialize_parallel(tensor, pipeline)` creates every group with `dist.new_group` (each rank calls
`new_group` for every group, in the same order, as torch.distributed requires) and returns this rank's
`ParallelState`. `ParallelState.single()` is the one-process state: all sizes 1, groups None.

Every group is a real process group when torch.distributed is initialised, even a group of one rank:
DeepSpeed treats `None` as the WORLD group, which would wrongly all-reduce gradients over TP ranks.
The rank layout is documented in `megatron.mpu.layout`.
"""
from __future__ import annotations

from typing import Any, List

import torch.distributed as dist

from megatron.mpu.layout import GridLayout, make_layout


class ParallelState:
    """This rank's coordinates and process groups in the parallel grid.

    Fields: `rank, world_size`; `tp_size, tp_rank, tp_group, tp_ranks`; `pp_size, pp_rank, pp_group,
    pp_ranks`; `dp_size, dp_rank, dp_group, dp_ranks`; `mp_size, mp_rank, mp_group, mp_ranks` (model
    parallel = tensor x pipeline, the ranks holding one full model replica); `is_first_stage`,
    `is_last_stage`. The `*_ranks` lists are the global ranks of this rank's groups, sorted.
    The `get_*` methods are the duck-typed `mpu` object DeepSpeed accepts in `deepspeed.initialize`.
    """

    def __init__(self, *, rank: int, world_size: int,
                 tp_rank: int, tp_ranks: List[int], tp_group: Any,
                 pp_rank: int, pp_ranks: List[int], pp_group: Any,
                 dp_rank: int, dp_ranks: List[int], dp_group: Any,
                 mp_rank: int, mp_ranks: List[int], mp_group: Any) -> None:
        self.rank = rank
        self.world_size = world_size
        self.tp_rank, self.tp_ranks, self.tp_group, self.tp_size = tp_rank, list(tp_ranks), tp_group, len(tp_ranks)
        self.pp_rank, self.pp_ranks, self.pp_group, self.pp_size = pp_rank, list(pp_ranks), pp_group, len(pp_ranks)
        self.dp_rank, self.dp_ranks, self.dp_group, self.dp_size = dp_rank, list(dp_ranks), dp_group, len(dp_ranks)
        self.mp_rank, self.mp_ranks, self.mp_group, self.mp_size = mp_rank, list(mp_ranks), mp_group, len(mp_ranks)

    @classmethod
    def single(cls) -> "ParallelState":
        """The state of a lone process: every size 1, every group None (no torch.distributed needed)."""
        return cls(rank=0, world_size=1, tp_rank=0, tp_ranks=[0], tp_group=None,
                   pp_rank=0, pp_ranks=[0], pp_group=None, dp_rank=0, dp_ranks=[0], dp_group=None,
                   mp_rank=0, mp_ranks=[0], mp_group=None)

    @property
    def is_first_stage(self) -> bool:
        """True on the first pipeline stage (it owns the embedding)."""
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        """True on the last pipeline stage (it owns the head and computes the loss)."""
        return self.pp_rank == self.pp_size - 1

    def __repr__(self) -> str:
        return (f"ParallelState(rank={self.rank}/{self.world_size}, tp={self.tp_rank}/{self.tp_size}, "
                f"pp={self.pp_rank}/{self.pp_size}, dp={self.dp_rank}/{self.dp_size})")

    # --- DeepSpeed / Megatron `mpu` duck type -------------------------------------------------------
    def get_model_parallel_rank(self) -> int:
        """Rank inside the model-parallel (tensor x pipeline) group."""
        return self.mp_rank

    def get_model_parallel_world_size(self) -> int:
        """Size of the model-parallel (tensor x pipeline) group."""
        return self.mp_size

    def get_model_parallel_group(self) -> Any:
        """The model-parallel (tensor x pipeline) process group."""
        return self.mp_group

    def get_data_parallel_rank(self) -> int:
        """Rank inside the data-parallel group."""
        return self.dp_rank

    def get_data_parallel_world_size(self) -> int:
        """Number of data-parallel replicas."""
        return self.dp_size

    def get_data_parallel_group(self) -> Any:
        """The data-parallel process group (gradients are averaged over it)."""
        return self.dp_group

    def get_tensor_model_parallel_rank(self) -> int:
        """Rank inside the tensor-parallel group."""
        return self.tp_rank

    def get_tensor_model_parallel_world_size(self) -> int:
        """Tensor-parallel size."""
        return self.tp_size

    def get_tensor_model_parallel_group(self) -> Any:
        """The tensor-parallel process group."""
        return self.tp_group

    def get_pipeline_model_parallel_rank(self) -> int:
        """Pipeline stage index of this rank."""
        return self.pp_rank

    def get_pipeline_model_parallel_world_size(self) -> int:
        """Number of pipeline stages."""
        return self.pp_size

    def get_pipeline_model_parallel_group(self) -> Any:
        """The pipeline process group (the ranks of one pipeline)."""
        return self.pp_group


def _create_groups(all_groups: List[List[int]], rank: int) -> tuple:
    """Create every group in `all_groups` (collectively, same order on every rank); return this rank's
    `(group, ranks)`."""
    mine = None
    for ranks in all_groups:
        group = dist.new_group(ranks=ranks)
        if rank in ranks:
            mine = (group, ranks)
    assert mine is not None, f"rank {rank} is in none of {all_groups}"
    return mine


def initialize_parallel(tensor: int, pipeline: int) -> ParallelState:
    """Build this rank's `ParallelState` for a grid of `tensor` x `pipeline` x data-parallel ranks.

    Must be called on every rank after `torch.distributed.init_process_group`. Raises ValueError when
    `tensor * pipeline` does not divide the world size, RuntimeError when torch.distributed is not
    initialised. The layout equals DeepSpeed's `PipeModelDataParallelTopology(pipeline, tensor, dp)`.
    """
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("initialize_parallel needs torch.distributed to be initialised; "
                           "use ParallelState.single() for one process")
    world_size, rank = dist.get_world_size(), dist.get_rank()
    layout: GridLayout = make_layout(world_size, tensor, pipeline)
    pp_rank, dp_rank, tp_rank = layout.coords(rank)
    tp_group, tp_ranks = _create_groups(layout.tp_groups(), rank)
    dp_group, dp_ranks = _create_groups(layout.dp_groups(), rank)
    pp_group, pp_ranks = _create_groups(layout.pp_groups(), rank)
    # The model-parallel group equals the TP group without pipelining and the PP group without TP;
    # reuse those rather than creating duplicates (the decision is the same on every rank).
    if layout.pp == 1:
        mp_group, mp_ranks = tp_group, tp_ranks
    elif layout.tp == 1:
        mp_group, mp_ranks = pp_group, pp_ranks
    else:
        mp_group, mp_ranks = _create_groups(layout.mp_groups(), rank)
    return ParallelState(rank=rank, world_size=world_size,
                         tp_rank=tp_rank, tp_ranks=tp_ranks, tp_group=tp_group,
                         pp_rank=pp_rank, pp_ranks=pp_ranks, pp_group=pp_group,
                         dp_rank=dp_rank, dp_ranks=dp_ranks, dp_group=dp_group,
                         mp_rank=mp_ranks.index(rank), mp_ranks=mp_ranks, mp_group=mp_group)
