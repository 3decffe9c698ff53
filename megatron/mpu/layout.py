"""Pure-Python rank layout of the (pipeline, data, tensor) process grid.

The layout is the one of DeepSpeed's `PipeModelDataParallelTopology(num_pp, num_mp, num_dp)`
(axes `pipe, data, model`, row-major, tensor/model fastest):

    rank = pp_rank * (dp * tp) + dp_rank * tp + tp_rank

Keeping tensor-parallel ranks adjacent puts the most communication-heavy group (TP all-reduces in
every layer, Shoeybi et al. 2019, sec. 3) on neighbouring devices, i.e. inside one node.
No torch.distributed here, so the layout can be tested without processes.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Tuple


@dataclass(frozen=True)
class GridLayout:
    """Sizes of the three parallel axes; `world_size = pp * dp * tp`."""
    tp: int
    pp: int
    dp: int

    @property
    def world_size(self) -> int:
        """Total number of ranks in the grid."""
        return self.tp * self.pp * self.dp

    def coords(self, rank: int) -> Tuple[int, int, int]:
        """`(pp_rank, dp_rank, tp_rank)` of a global rank."""
        if not 0 <= rank < self.world_size:
            raise ValueError(f"rank {rank} outside a grid of {self.world_size} ranks")
        return rank // (self.dp * self.tp), (rank // self.tp) % self.dp, rank % self.tp

    def rank_of(self, pp_rank: int, dp_rank: int, tp_rank: int) -> int:
        """Global rank at the given coordinates."""
        return pp_rank * (self.dp * self.tp) + dp_rank * self.tp + tp_rank

    def tp_groups(self) -> List[List[int]]:
        """All tensor-parallel groups (same pp and dp coordinate), in creation order."""
        return [[self.rank_of(p, d, t) for t in range(self.tp)] for p in range(self.pp) for d in range(self.dp)]

    def dp_groups(self) -> List[List[int]]:
        """All data-parallel groups (same pp and tp coordinate), in creation order."""
        return [[self.rank_of(p, d, t) for d in range(self.dp)] for p in range(self.pp) for t in range(self.tp)]

    def pp_groups(self) -> List[List[int]]:
        """All pipeline groups (same dp and tp coordinate), in creation order."""
        return [[self.rank_of(p, d, t) for p in range(self.pp)] for d in range(self.dp) for t in range(self.tp)]

    def mp_groups(self) -> List[List[int]]:
        """All model-parallel groups (tensor x pipeline: same dp coordinate), in creation order."""
        return [sorted(self.rank_of(p, d, t) for p in range(self.pp) for t in range(self.tp)) for d in range(self.dp)]


def make_layout(world_size: int, tensor: int, pipeline: int) -> GridLayout:
    """Grid for `world_size` ranks with the given tensor and pipeline sizes; data parallel fills the rest.

    Raises ValueError when the sizes are not positive or `tensor * pipeline` does not divide `world_size`.
    """
    if tensor < 1 or pipeline < 1:
        raise ValueError(f"tensor ({tensor}) and pipeline ({pipeline}) parallel sizes must be >= 1")
    if world_size % (tensor * pipeline) != 0:
        raise ValueError(f"world size {world_size} is not divisible by tensor ({tensor}) x pipeline "
                         f"({pipeline}) = {tensor * pipeline}")
    return GridLayout(tp=tensor, pp=pipeline, dp=world_size // (tensor * pipeline))
