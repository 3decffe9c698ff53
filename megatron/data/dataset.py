"""Examples from an indexed dataset: the unit the sampler draws and the collator lays out.

An `Example` holds its sequences (token ids, prompt length, position in the dataset's reference
order) plus label/margin and, when `P.ref_logps.npy` exists, the reference log-prob of each sequence.
Unpaired (KTO) examples get a KL sequence: the example's prompt followed by the completion of a
different record, partner = the next record in a cyclic order given by a permutation seeded with
`kl_seed` (so any batch size, even 1, has its KL term). KL sequences are cut to the dataset's
per-sequence budget, and their reference positions are num_sequences + e.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from typing import List, Optional, Sequence

import numpy as np

from megatron.config import ConfigError

from .indexed import IndexedDataset, reference_sequence_count


@dataclass
class SequenceData:
    """One sequence: ids Int64[L], loss on response positions >= prompt_len (or, when `scored` Bool[L] is
    given, on the positions it marks), `dataset_index` in ref order; `score` its record score (pairwise
    score_chosen / score_rejected columns, NaN when absent)."""
    ids: np.ndarray
    prompt_len: int
    dataset_index: int
    ref_logp: Optional[float] = None
    scored: Optional[np.ndarray] = None
    score: float = math.nan


@dataclass
class Example:
    """One training example: sft [seq], pairwise [chosen, rejected], unpaired [completion, KL]."""
    index: int
    kind: str
    sequences: List[SequenceData]
    label: float = math.nan   # unpaired: 1.0 desirable / 0.0 undesirable
    margin: float = math.nan  # pairwise: optional margin

    @property
    def num_tokens(self) -> int:
        """Tokens over all sequences (the room it takes in a packed row)."""
        return sum(len(s.ids) for s in self.sequences)


def kl_partners(n: int, seed: int) -> np.ndarray:
    """Int64[n] partner of each record: the next one in a cyclic order from a seeded permutation.

    partner[i] != i whenever n >= 2 (a derangement); n == 1 pairs the record with itself.
    """
    perm = np.random.default_rng(seed).permutation(n)
    partner = np.empty(n, dtype=np.int64)
    partner[perm] = np.roll(perm, -1)
    return partner


def sequence_lengths(kind: str, seqs_per_example: int, lengths, prompt_lens, budget: int,
                     kl_seed: int) -> np.ndarray:
    """Int64[E, k'] tokens of each example's sequences (unpaired: completion and KL sequence)."""
    lengths = np.asarray(lengths, dtype=np.int64)
    if kind == "unpaired":
        prompts = np.asarray(prompt_lens, dtype=np.int64)
        kl_len = np.minimum(prompts + (lengths - prompts)[kl_partners(len(lengths), kl_seed)], budget)
        return np.stack([lengths, kl_len], axis=1)
    return lengths.reshape(-1, seqs_per_example)


class ExampleDataset:
    """Examples of an `IndexedDataset` for training with rows of `max_seq_len` tokens."""

    def __init__(self, indexed: IndexedDataset, max_seq_len: int, kl_seed: int = 0):
        self.indexed = indexed
        self.kind = indexed.kind
        self.prefix = indexed.prefix
        self.kl_seed = kl_seed
        meta = indexed.meta
        self.max_seq_len = max_seq_len
        if self.kind == "unpaired":
            self.kl_partner = kl_partners(len(self), kl_seed)
        self.seq_lengths = sequence_lengths(self.kind, indexed.seqs_per_example, indexed.lengths,
                                            indexed.prompt_lens, meta["sequence_budget"], kl_seed)
        self.example_lengths = self.seq_lengths.sum(axis=1)  # Int64[E]
        longest = int(self.example_lengths.max()) if len(self) else 0
        if longest > max_seq_len:
            raise ConfigError(f"key 'model.max_seq_len': {max_seq_len} is shorter than the longest example "
                              f"({longest} tokens) of {self.prefix}, preprocessed for rows of "
                              f"{meta['max_seq_len']}; preprocess it again with this max_seq_len")
        self.ref_logps = self._load_reference()

    def __len__(self) -> int:
        return self.indexed.num_examples

    def _load_reference(self) -> Optional[np.ndarray]:
        path = self.prefix + ".ref_logps.npy"
        if not os.path.exists(path):
            return None
        ref = np.load(path, mmap_mode="r")
        expected = reference_sequence_count(self.indexed.meta)
        if ref.shape != (expected,):
            raise ValueError(f"{path} has shape {ref.shape}, the dataset needs ({expected},); recompute it")
        if self.kind == "unpaired":
            with open(self.prefix + ".ref_logps.json", encoding="utf-8") as fh:
                seed = json.load(fh)["kl_seed"]
            if seed != self.kl_seed:
                raise ConfigError(f"key 'train.seed': {path} was computed with KL pairs of seed {seed}, this run "
                                  f"uses {self.kl_seed}; set train.seed={seed} or recompute the reference")
        return ref

    def _sequence(self, ids: np.ndarray, prompt_len: int, dataset_index: int) -> SequenceData:
        ref = float(self.ref_logps[dataset_index]) if self.ref_logps is not None else None
        if dataset_index >= self.indexed.num_sequences:  # a KTO KL sequence, built on open
            return SequenceData(ids, prompt_len, dataset_index, ref)
        return SequenceData(ids, prompt_len, dataset_index, ref, scored=self.indexed.scored(dataset_index),
                            score=self.indexed.score(dataset_index))

    def __getitem__(self, e: int) -> Example:
        if not 0 <= e < len(self):
            raise IndexError(f"example {e} out of range [0, {len(self)})")
        ix = self.indexed
        seqs = []
        for s in ix.example_sequences(e):
            ids, plen = ix.sequence(s)
            seqs.append(self._sequence(ids, plen, s))
        if self.kind == "unpaired":
            ids, plen = seqs[0].ids, seqs[0].prompt_len
            other, other_plen = ix.sequence(int(self.kl_partner[e]))
            kl = np.concatenate([ids[:plen], other[other_plen:]])[: int(self.seq_lengths[e, 1])]
            seqs.append(self._sequence(kl, plen, ix.num_sequences + e))
        return Example(e, self.kind, seqs, label=ix.label(e), margin=ix.margin(e))

    def example_seq_lengths(self, indices: Sequence[int]) -> List[List[int]]:
        """Per example in `indices`, its sequences' token counts (no token reads)."""
        return [[int(x) for x in self.seq_lengths[i]] for i in indices]
