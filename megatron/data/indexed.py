"""The on-disk indexed dataset: memory-mapped token ids plus a per-sequence index.

Files of a dataset with prefix P:
  P.bin        all sequences' token ids back to back; uint16 when vocab_size <= 65536, else uint32
  P.idx        numpy .npy structured array, one row per sequence, fields
                 offset (int64, in tokens), length (int32), prompt_len (int32: first scored token),
                 label (float32: unpaired desirability 1/0, else NaN), margin (float32: the pair's margin,
                 on both rows of a pair; NaN when absent), score (float32: this response's score from a
                 score_chosen / score_rejected column; NaN when absent; format 2)
  P.mask.bin   optional (meta `token_mask: true`, SFT with data.assistant_turns=all): uint8 per token of
               P.bin, 1 where the token is a scored response token. Without it, a sequence's scored
               tokens are the positions >= prompt_len
  P.meta.json  format_version, kind, seqs_per_example, num_examples, num_sequences, num_tokens, dtype,
               vocab_size, tokenizer_fingerprint, bos/eos/pad ids, max_seq_len, sequence_budget,
               max_example_len, token_mask, source, split, report (the preprocess report); written LAST,
               so a dataset without it is incomplete
  P.ref_logps.npy  optional precomputed reference log-prob sums, one per reference sequence (see
               `reference_sequence_count`); P.ref_logps.json records the KL seed for unpaired data
Examples are regular: example e owns sequences [e*k, e*k+k) with k = seqs_per_example (sft 1, pairwise
2 = chosen, rejected; unpaired 1 = the completion; its KL sequence is built when the data is opened).
Opening maps the files and reads the small JSON; there is no per-record Python work.
"""
from __future__ import annotations

import json
import math
import os
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)  # format 1: no score field, no token mask
IDX_DTYPE = np.dtype([("offset", "<i8"), ("length", "<i4"), ("prompt_len", "<i4"),
                      ("label", "<f4"), ("margin", "<f4"), ("score", "<f4")])


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id fits (vocab_size <= 65536), else uint32."""
    return np.dtype(np.uint16) if vocab_size <= 65536 else np.dtype(np.uint32)


def _replace(tmp: str, final: str) -> None:
    os.replace(tmp, final)  # atomic on POSIX: readers see the old file or the complete new one


class IndexedDatasetWriter:
    """Append examples, then `finalize(meta)`; files appear under their final names only at the end."""

    def __init__(self, prefix: str, vocab_size: int, kind: str, seqs_per_example: int):
        self.prefix = prefix
        self.dtype = token_dtype(vocab_size)
        self.kind = kind
        self.seqs_per_example = seqs_per_example
        self.vocab_size = vocab_size
        os.makedirs(os.path.dirname(os.path.abspath(prefix)), exist_ok=True)
        self._bin = open(prefix + ".bin.tmp", "wb")
        self._mask = None  # P.mask.bin.tmp, opened by the first sequence with explicit scored spans
        self.rows: List[Tuple[int, int, int, float, float, float]] = []
        self._offset = 0
        self.max_example_len = 0

    def add_example(self, sequences: Sequence, label: Optional[bool] = None, margin: Optional[float] = None,
                    scores: Optional[Sequence[float]] = None) -> None:
        """Write one example: `sequences` has exactly seqs_per_example entries, each (ids, prompt_len) or
        (ids, prompt_len, spans) with spans None or [(start, end)] of scored token positions. scores: one
        per sequence (pairwise: score_chosen, score_rejected) or None."""
        if len(sequences) != self.seqs_per_example:
            raise ValueError(f"a {self.kind} example has {self.seqs_per_example} sequences, got {len(sequences)}")
        lab = math.nan if label is None else float(label)
        mar = math.nan if margin is None else float(margin)
        total = 0
        for k, seq in enumerate(sequences):
            ids, prompt_len = seq[0], seq[1]
            spans = seq[2] if len(seq) > 2 else None
            arr = np.asarray(ids, dtype=np.int64)
            if arr.size and (arr.min() < 0 or arr.max() >= self.vocab_size):
                raise ValueError(f"token id out of range [0, {self.vocab_size})")
            self._bin.write(arr.astype(self.dtype).tobytes())
            self._write_mask(arr.size, int(prompt_len), spans)
            score = math.nan if scores is None else float(scores[k])
            self.rows.append((self._offset, arr.size, int(prompt_len), lab, mar, score))
            self._offset += arr.size
            total += arr.size
        self.max_example_len = max(self.max_example_len, total)

    def _write_mask(self, n: int, prompt_len: int, spans) -> None:
        """Keep P.mask.bin in step with P.bin once any sequence has explicit spans (earlier ones back-filled)."""
        if spans is None and self._mask is None:
            return
        if self._mask is None:
            self._mask = open(self.prefix + ".mask.bin.tmp", "wb")
            for off, length, plen, *_ in self.rows:  # the sequences so far: scored from prompt_len on
                self._mask.write(self._tail_mask(length, plen).tobytes())
        if spans is None:
            mask = self._tail_mask(n, prompt_len)
        else:
            mask = np.zeros(n, dtype=np.uint8)
            for a, b in spans:
                mask[a:b] = 1
        self._mask.write(mask.tobytes())

    @staticmethod
    def _tail_mask(n: int, prompt_len: int) -> np.ndarray:
        mask = np.zeros(n, dtype=np.uint8)
        mask[prompt_len:] = 1
        return mask

    @property
    def num_examples(self) -> int:
        """Examples written so far."""
        return len(self.rows) // self.seqs_per_example

    def finalize(self, meta: Dict) -> Dict:
        """Write P.idx and P.meta.json (with `meta` merged in) and move the files into place; returns the meta."""
        self._bin.close()
        if self._mask is not None:
            self._mask.close()
        idx = np.array(self.rows, dtype=IDX_DTYPE) if self.rows else np.zeros(0, dtype=IDX_DTYPE)
        with open(self.prefix + ".idx.tmp", "wb") as fh:
            np.save(fh, idx)
        full = dict(meta)
        full.update(format_version=FORMAT_VERSION, kind=self.kind, seqs_per_example=self.seqs_per_example,
                    num_examples=self.num_examples, num_sequences=len(self.rows), num_tokens=self._offset,
                    dtype=self.dtype.name, vocab_size=self.vocab_size, max_example_len=self.max_example_len,
                    token_mask=self._mask is not None)
        with open(self.prefix + ".meta.json.tmp", "w", encoding="utf-8") as fh:
            json.dump(full, fh, indent=1)
        _replace(self.prefix + ".bin.tmp", self.prefix + ".bin")
        if self._mask is not None:
            _replace(self.prefix + ".mask.bin.tmp", self.prefix + ".mask.bin")
        _replace(self.prefix + ".idx.tmp", self.prefix + ".idx")
        _replace(self.prefix + ".meta.json.tmp", self.prefix + ".meta.json")
        return full

    def abort(self) -> None:
        """Close and delete the temporary files."""
        self._bin.close()
        if self._mask is not None:
            self._mask.close()
        for suffix in (".bin.tmp", ".mask.bin.tmp", ".idx.tmp", ".meta.json.tmp"):
            if os.path.exists(self.prefix + suffix):
                os.remove(self.prefix + suffix)


def read_meta(prefix: str) -> Dict:
    """The P.meta.json of an indexed dataset."""
    with open(prefix + ".meta.json", "r", encoding="utf-8") as fh:
        return json.load(fh)


class IndexedDataset:
    """Read-only view of an indexed dataset (np.memmap of P.bin, mmapped P.idx)."""

    def __init__(self, prefix: str):
        self.prefix = prefix
        self.meta = read_meta(prefix)
        if self.meta.get("format_version") not in READABLE_VERSIONS:
            raise ValueError(f"{prefix}: indexed format version {self.meta.get('format_version')}, this code "
                             f"reads {', '.join(map(str, READABLE_VERSIONS))}; preprocess the data again")
        self.kind: str = self.meta["kind"]
        self.seqs_per_example: int = self.meta["seqs_per_example"]
        self.num_examples: int = self.meta["num_examples"]
        self.num_sequences: int = self.meta["num_sequences"]
        dtype = np.dtype(self.meta["dtype"])
        self.tokens = (np.memmap(prefix + ".bin", dtype=dtype, mode="r") if self.meta["num_tokens"] > 0
                       else np.zeros(0, dtype=dtype))  # np.memmap refuses empty files
        self.index = np.load(prefix + ".idx", mmap_mode="r")
        if self.index.shape[0] != self.num_sequences:
            raise ValueError(f"{prefix}.idx has {self.index.shape[0]} rows, meta says {self.num_sequences}")
        self.token_mask = None  # UInt8[num_tokens] scored-token flags, when the dataset has P.mask.bin
        if self.meta.get("token_mask") and self.meta["num_tokens"] > 0:
            self.token_mask = np.memmap(prefix + ".mask.bin", dtype=np.uint8, mode="r")

    @property
    def lengths(self) -> np.ndarray:
        """Int32[num_sequences] tokens per sequence (memory-mapped)."""
        return self.index["length"]

    @property
    def prompt_lens(self) -> np.ndarray:
        """Int32[num_sequences] prompt tokens per sequence (memory-mapped)."""
        return self.index["prompt_len"]

    def sequence(self, i: int) -> Tuple[np.ndarray, int]:
        """(ids Int64[length], prompt_len) of sequence `i`."""
        row = self.index[i]
        off, n = int(row["offset"]), int(row["length"])
        return np.asarray(self.tokens[off:off + n], dtype=np.int64), int(row["prompt_len"])

    def scored(self, i: int) -> Optional[np.ndarray]:
        """Bool[length] of sequence `i`: True at scored response tokens, or None when they are simply the
        positions >= prompt_len (no P.mask.bin)."""
        if self.token_mask is None:
            return None
        row = self.index[i]
        off, n = int(row["offset"]), int(row["length"])
        return np.asarray(self.token_mask[off:off + n]) > 0

    def example_sequences(self, e: int) -> range:
        """Indices of the sequences of example `e`."""
        k = self.seqs_per_example
        return range(e * k, e * k + k)

    def label(self, e: int) -> float:
        """Unpaired desirability of example `e` (1.0 / 0.0; NaN for other kinds)."""
        return float(self.index[e * self.seqs_per_example]["label"])

    def margin(self, e: int) -> float:
        """Pair margin of example `e` (NaN when the record had none)."""
        return float(self.index[e * self.seqs_per_example]["margin"])

    def score(self, i: int) -> float:
        """Score of sequence `i` (pairwise: its score_chosen / score_rejected column; NaN when absent)."""
        if "score" not in self.index.dtype.names:  # format 1
            return math.nan
        return float(self.index[i]["score"])


def reference_sequence_count(meta: Dict) -> int:
    """Length of P.ref_logps.npy: stored sequences, plus one KL sequence per example for unpaired data."""
    return meta["num_sequences"] + (meta["num_examples"] if meta["kind"] == "unpaired" else 0)


def write_reference_logps(prefix: str, values, kl_seed: Optional[int] = None) -> str:
    """Save precomputed reference log-prob sums for the dataset at `prefix`; returns the .npy path.

    values: Float[reference_sequence_count(meta)], float32 or float64, in dataset sequence order
    (`batch['dataset_seq_index']` gives each batch sequence's position). Unpaired data also covers the KL
    sequences (positions num_sequences + e for example e), which depend on the seed: pass `kl_seed`
    (= train.seed of the run that built the batches). Written to a temp file and renamed.
    """
    meta = read_meta(prefix)
    arr = np.asarray(values)
    if arr.dtype not in (np.float32, np.float64):
        arr = arr.astype(np.float64)
    expected = reference_sequence_count(meta)
    if arr.shape != (expected,):
        raise ValueError(f"reference log-probs for {prefix} need shape ({expected},), got {arr.shape}")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"reference log-probs for {prefix} contain non-finite values")
    if meta["kind"] == "unpaired":
        if kl_seed is None:
            raise ValueError("unpaired data: pass kl_seed (train.seed) since the KL sequences depend on it")
        with open(prefix + ".ref_logps.json.tmp", "w", encoding="utf-8") as fh:
            json.dump({"kl_seed": int(kl_seed)}, fh)
        _replace(prefix + ".ref_logps.json.tmp", prefix + ".ref_logps.json")
    path = prefix + ".ref_logps.npy"
    with open(path + ".tmp", "wb") as fh:
        np.save(fh, arr)
    _replace(path + ".tmp", path)
    return path
