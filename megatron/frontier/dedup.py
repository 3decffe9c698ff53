"""Exact and near-duplicate detection: normalised-text keys, word n-gram Jaccard, MinHash LSH candidates.

Near duplicates: two texts whose sets of word n-grams (of `normalise_text`) have Jaccard similarity >=
threshold. Comparing every pair is quadratic, so `NearDuplicateIndex` finds candidates with MinHash
locality-sensitive hashing (Broder 1997; the banding of Leskovec, Rajaraman & Ullman, "Mining of Massive
Datasets", ch. 3): `num_perm` min-hashes cut into `bands` bands of r = num_perm / bands rows; texts sharing
a band are candidates, and the EXACT Jaccard of the candidates decides. A pair at similarity J becomes a
candidate with probability 1 - (1 - J^r)^bands (128 = 32 bands x 4 rows: 0.99985 at J = 0.7, 0.87 at J = 0.5), so
a missed duplicate is possible but rare above the threshold; nothing below the threshold is ever dropped.
Hashes are seeded (blake2b, fixed permutations): the same input always gives the same result.
"""
from __future__ import annotations

import hashlib
from typing import Dict, FrozenSet, List, Optional

import numpy as np

from .rules import normalise_text

_PRIME = (1 << 31) - 1  # hash values < 2^31, so a * x + b fits in uint64


def exact_key(text: str) -> str:
    """Key under which two texts are exact duplicates: the normalised text (case and whitespace ignored)."""
    return normalise_text(text)


def shingles(text: str, n: int) -> FrozenSet[str]:
    """Set of word n-grams of `normalise_text(text)`; a text of fewer than n words is one shingle (itself)."""
    words = normalise_text(text).split(" ")
    if len(words) < n:
        return frozenset([" ".join(words)])
    return frozenset(" ".join(words[i:i + n]) for i in range(len(words) - n + 1))


def jaccard(a: FrozenSet[str], b: FrozenSet[str]) -> float:
    """|a & b| / |a | b| (1.0 for two empty sets)."""
    if not a and not b:
        return 1.0
    return len(a & b) / len(a | b)


def _hash32(s: str) -> int:
    return int.from_bytes(hashlib.blake2b(s.encode("utf-8"), digest_size=8).digest(), "little") % _PRIME


class MinHasher:
    """`num_perm` seeded universal hashes h_k(x) = (a_k x + b_k) mod (2^31 - 1); signature = min over shingles."""

    def __init__(self, num_perm: int = 128, seed: int = 0):
        rng = np.random.default_rng(seed)
        self.a = rng.integers(1, _PRIME, size=num_perm, dtype=np.uint64)
        self.b = rng.integers(0, _PRIME, size=num_perm, dtype=np.uint64)

    def signature(self, grams: FrozenSet[str]) -> np.ndarray:
        """uint64[num_perm] MinHash signature of a shingle set."""
        x = np.fromiter((_hash32(g) for g in grams), dtype=np.uint64, count=len(grams))  # min: order-free
        return ((self.a[:, None] * x[None, :] + self.b[:, None]) % _PRIME).min(axis=1)


class NearDuplicateIndex:
    """Kept texts; `find` returns the id of a kept text at Jaccard >= threshold (LSH candidates, exact check)."""

    def __init__(self, threshold: float, ngram: int = 3, num_perm: int = 128, bands: int = 32, seed: int = 0):
        """threshold in (0, 1]; ngram >= 1 words; num_perm divisible by bands."""
        if not 0.0 < threshold <= 1.0:
            raise ValueError(f"--near-dup-threshold must be in (0, 1], got {threshold!r}")
        if ngram < 1:
            raise ValueError(f"--ngram must be >= 1, got {ngram!r}")
        if num_perm % bands:
            raise ValueError(f"num_perm ({num_perm}) must be a multiple of bands ({bands})")
        self.threshold, self.ngram, self.bands, self.rows = threshold, ngram, bands, num_perm // bands
        self.hasher = MinHasher(num_perm, seed)
        self.buckets: List[Dict[bytes, List[int]]] = [{} for _ in range(bands)]
        self.grams: Dict[int, FrozenSet[str]] = {}

    def _band_keys(self, sig: np.ndarray) -> List[bytes]:
        return [sig[i * self.rows:(i + 1) * self.rows].tobytes() for i in range(self.bands)]

    def find(self, text: str) -> Optional[int]:
        """Id of the earliest-added kept text whose n-gram Jaccard with `text` is >= threshold, else None."""
        return self._find(*self._prepare(text))

    def add(self, item_id: int, text: str) -> None:
        """Keep `text` under `item_id` (ids must be unique)."""
        self._add(item_id, *self._prepare(text))

    def find_or_add(self, item_id: int, text: str) -> Optional[int]:
        """`find(text)`; when nothing matches, `add(item_id, text)` and return None (hashes computed once)."""
        grams, keys = self._prepare(text)
        match = self._find(grams, keys)
        if match is None:
            self._add(item_id, grams, keys)
        return match

    def _prepare(self, text: str):
        grams = shingles(text, self.ngram)
        return grams, self._band_keys(self.hasher.signature(grams))

    def _find(self, grams: FrozenSet[str], keys: List[bytes]) -> Optional[int]:
        candidates = sorted({i for band, key in enumerate(keys) for i in self.buckets[band].get(key, ())})
        return next((i for i in candidates if jaccard(grams, self.grams[i]) >= self.threshold), None)

    def _add(self, item_id: int, grams: FrozenSet[str], keys: List[bytes]) -> None:
        self.grams[item_id] = grams
        for band, key in enumerate(keys):
            self.buckets[band].setdefault(key, []).append(item_id)
