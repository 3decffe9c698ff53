"""Deterministic, resumable, data-parallel sampling of examples.

The sample stream is the concatenation of epoch permutations: position p is example
perm(epoch = p // n)[p % n], where perm(epoch) is seeded with seed + epoch (identity without shuffle).
A step takes the next `global_batch_size` positions; data-parallel rank r takes its contiguous slice
of global_batch_size / dp_size and splits it into grad_accum micro-batches of micro_batch_size. Resuming
from `consumed_samples` (a global count) restarts exactly at the next position, mid-epoch included.
"""
from __future__ import annotations

from typing import Dict, Iterator, List

import numpy as np

from megatron.config import ConfigError


class MicroBatchSampler:
    """Yields lists of example indices, one list per micro-batch of this rank, forever."""

    def __init__(self, num_examples: int, global_batch_size: int, micro_batch_size: int, dp_rank: int,
                 dp_size: int, seed: int, shuffle: bool = True, consumed_samples: int = 0):
        if num_examples < 1:
            raise ValueError("the dataset has no examples")
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank {dp_rank} outside [0, {dp_size})")
        if global_batch_size % (micro_batch_size * dp_size):
            raise ConfigError(f"train.global_batch_size={global_batch_size} is not divisible by "
                              f"train.micro_batch_size * data_parallel = {micro_batch_size} * {dp_size}")
        if consumed_samples < 0:
            raise ValueError(f"consumed_samples must be >= 0, got {consumed_samples}")
        self.num_examples = num_examples
        self.global_batch_size = global_batch_size
        self.micro_batch_size = micro_batch_size
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self.seed, self.shuffle = seed, shuffle
        self.consumed_samples = consumed_samples  # global positions of completed steps
        self.grad_accum = global_batch_size // (micro_batch_size * dp_size)
        self._perm_epoch = -1
        self._perm = np.arange(0)

    def permutation(self, epoch: int) -> np.ndarray:
        """Int64[n] example order of `epoch` (identity when not shuffling)."""
        if epoch != self._perm_epoch:
            self._perm = (np.random.default_rng(self.seed + epoch).permutation(self.num_examples) if self.shuffle
                          else np.arange(self.num_examples))
            self._perm_epoch = epoch
        return self._perm

    def samples(self, start: int, count: int) -> List[int]:
        """Example indices at global stream positions [start, start + count)."""
        out = []
        for p in range(start, start + count):
            out.append(int(self.permutation(p // self.num_examples)[p % self.num_examples]))
        return out

    def global_batch(self, consumed_samples: int) -> List[int]:
        """The global batch (all ranks) of the step starting at `consumed_samples`."""
        return self.samples(consumed_samples, self.global_batch_size)

    def step_micro_batches(self, consumed_samples: int) -> List[List[int]]:
        """This rank's grad_accum micro-batches of the step starting at `consumed_samples`."""
        local = self.global_batch_size // self.dp_size
        mine = self.samples(consumed_samples + self.dp_rank * local, local)
        m = self.micro_batch_size
        return [mine[i:i + m] for i in range(0, local, m)]

    def __iter__(self) -> Iterator[List[int]]:
        while True:
            micro = self.step_micro_batches(self.consumed_samples)
            for i, mb in enumerate(micro):
                if i == len(micro) - 1:
                    # the step is complete once its last micro-batch is handed out
                    self.consumed_samples += self.global_batch_size
                yield mb

    def state_dict(self) -> Dict[str, int]:
        """{'consumed_samples': global positions consumed by completed steps}."""
        return {"consumed_samples": self.consumed_samples}
