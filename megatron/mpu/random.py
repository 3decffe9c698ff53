"""Named, forkable RNG states (Megatron's CUDA RNG tracker, for CPU and CUDA).

Dropout inside tensor-parallel regions (on activations split across ranks) must differ per TP rank,
while dropout on replicated activations, and initialisation, must be identical across the TP group
(Shoeybi et al. 2019, sec. 3). The tracker keeps extra generator states by name; `fork(name)` swaps one
in as the default generator state for the duration of a block and swaps the original back afterwards,
so the default RNG stream is unaffected. Saving/restoring the tracker (`get_states/set_states`) makes
recomputation under activation checkpointing and resumed runs reproducible.

A tracked state holds the CPU default generator and, when CUDA is available, the current CUDA device's
generator (both are swapped, so `fork` works whichever device the tensors live on).
"""
from __future__ import annotations

import contextlib
from typing import Dict, Iterator, Optional

import torch

from megatron.mpu.parallel_state import ParallelState

MODEL_PARALLEL_RNG = "model-parallel"

# Offset between the data seed and the model-parallel seeds (the value Megatron-LM uses).
_MODEL_PARALLEL_SEED_OFFSET = 2718

RNGState = Dict[str, Optional[torch.Tensor]]


def _cuda_on() -> bool:
    return torch.cuda.is_available()


def _capture() -> RNGState:
    """The current default generator states `{'cpu': ByteTensor, 'cuda': ByteTensor | None}`."""
    return {"cpu": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state() if _cuda_on() else None}


def _restore(state: RNGState) -> None:
    torch.set_rng_state(state["cpu"])
    if state.get("cuda") is not None and _cuda_on():
        torch.cuda.set_rng_state(state["cuda"])


class RNGTracker:
    """Named RNG states; `add(name, seed)`, `with fork(name): ...`, `get_states()`, `set_states()`."""

    def __init__(self) -> None:
        self._states: Dict[str, RNGState] = {}
        self._seeds: Dict[str, int] = {}

    def names(self):
        """The names of the tracked states."""
        return list(self._states)

    def add(self, name: str, seed: int) -> None:
        """Track a new state `name` seeded with `seed`; the default generators are left untouched.

        Raises ValueError if `name` is already tracked or `seed` is already used by another state.
        """
        if name in self._states:
            raise ValueError(f"RNG state {name!r} already exists")
        if seed in self._seeds.values():
            raise ValueError(f"seed {seed} is already used by another RNG state")
        original = _capture()
        try:
            # Only the generators we track: torch.manual_seed would also reseed every other CUDA device.
            torch.default_generator.manual_seed(seed)
            if _cuda_on():
                torch.cuda.manual_seed(seed)
            self._states[name] = _capture()
            self._seeds[name] = seed
        finally:
            _restore(original)

    @contextlib.contextmanager
    def fork(self, name: str = MODEL_PARALLEL_RNG) -> Iterator[None]:
        """Run the block with state `name` as the default RNG; advance it and restore the default after."""
        if name not in self._states:
            raise KeyError(f"RNG state {name!r} is not tracked (have {self.names()})")
        original = _capture()
        _restore(self._states[name])
        try:
            yield
        finally:
            self._states[name] = _capture()
            _restore(original)

    def get_states(self) -> Dict[str, RNGState]:
        """A copy of all tracked states (for checkpoints): `{name: {'cpu': ..., 'cuda': ... | None}}`."""
        return {n: {k: (v.clone() if v is not None else None) for k, v in s.items()} for n, s in self._states.items()}

    def set_states(self, states: Dict[str, RNGState]) -> None:
        """Replace all tracked states by `states` (as returned by `get_states`)."""
        self._states = {n: {k: (v.clone() if v is not None else None) for k, v in s.items()}
                        for n, s in states.items()}


def model_parallel_seed(seed: int, ps: ParallelState) -> RNGTracker:
    """A tracker with state `'model-parallel'` seeded `seed + 2718 + tp_rank` (different per TP rank).

    The default RNG is NOT touched: the caller seeds it identically on every rank of a TP group (e.g.
    `torch.manual_seed(seed)`) so that initialisation and dropout outside TP regions agree across it.
    """
    tracker = RNGTracker()
    tracker.add(MODEL_PARALLEL_RNG, seed + _MODEL_PARALLEL_SEED_OFFSET + ps.tp_rank)
    return tracker
