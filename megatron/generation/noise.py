"""Counter-based random numbers for sampling: one uniform per (seed, prompt index, sample index, step).

A sample's randomness is a pure function of its key, never of a generator's position in a stream, so the same
sample comes out at any batch size, batch order or tensor-parallel size, and a resumed or re-sharded run
draws the same numbers. The hash is MurmurHash3's 32-bit finaliser (Appleby 2008) applied in a chain over the
key words, in numpy uint64 (modular arithmetic by definition; the rows are few, so numpy's per-call cost is
what matters, not throughput).
"""
from __future__ import annotations

import numpy as np
import torch

_M32 = np.uint64(0xFFFFFFFF)


def fmix32(h: np.ndarray) -> np.ndarray:
    """MurmurHash3 fmix32 on uint64 arrays holding values in [0, 2^32); same shape, same range."""
    h = h ^ (h >> np.uint64(16))
    h = (h * np.uint64(0x85EBCA6B)) & _M32
    h = h ^ (h >> np.uint64(13))
    h = (h * np.uint64(0xC2B2AE35)) & _M32
    return h ^ (h >> np.uint64(16))


def _absorb(h: np.ndarray, word: np.ndarray) -> np.ndarray:
    """Mix one more 32-bit key word into the running hash h."""
    return fmix32(((h ^ (word & _M32)) + np.uint64(0x9E3779B9)) & _M32)


def _words(x: torch.Tensor) -> np.ndarray:
    """A non-negative Long tensor as uint64 (the int64 bit pattern)."""
    return x.detach().cpu().long().numpy().astype(np.uint64)


def sample_uniforms(seed: int, prompt_index: torch.Tensor, sample_index: torch.Tensor,
                    step: torch.Tensor) -> torch.Tensor:
    """Uniforms in (0, 1), float64 [B], one per row: u = H(seed, prompt_index[b], sample_index[b], step[b]).

    prompt_index, sample_index, step: Long tensors of shape [B] (or broadcastable), non-negative. 53 random
    bits per value; CPU tensor.
    """
    prompt, sample, t = np.broadcast_arrays(_words(prompt_index), _words(sample_index), _words(step))
    seed = int(seed) & 0xFFFFFFFFFFFFFFFF
    with np.errstate(over="ignore"):  # uint64 products wrap by design; only their low 32 bits are kept
        h = fmix32(np.full(prompt.shape, seed & 0xFFFFFFFF, dtype=np.uint64))
        h = _absorb(h, np.full(prompt.shape, seed >> 32, dtype=np.uint64))
        for word in (prompt, prompt >> np.uint64(32), sample, t):
            h = _absorb(h, word)
        hi = fmix32(h ^ np.uint64(0x68E31DA4))  # two independent 32-bit draws from the key -> 53 bits
        lo = fmix32(h ^ np.uint64(0xB5297A4D)) >> np.uint64(11)
        bits = (hi << np.uint64(21)) + lo
    return torch.from_numpy((bits.astype(np.float64) + 0.5) / float(2 ** 53))
