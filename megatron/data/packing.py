"""Row layout of a micro-batch: which sequences share a row, and how much of the batch is padding.

Packed: examples (never single sequences, so a pair or a KTO completion with its KL sequence stay
together) go into as few rows of `max_seq_len` tokens as best-fit-decreasing needs, balanced so the
longest row is as short as possible. Unpacked: every sequence gets its own row (chosen and rejected
are separate rows of the same micro-batch). Rows are padded to the longest row of the micro-batch, or
to `max_seq_len` with `pad_to_max_len`.
"""
from __future__ import annotations

from typing import List, Sequence, Tuple


def best_fit_decreasing(lengths: Sequence[int], capacity: int) -> List[List[int]]:
    """Bins (lists of item indices, ascending) holding items of `lengths` within `capacity` each.

    Items are placed longest first, each into the fullest bin it still fits (ties: the earlier bin).
    Deterministic. Raises ValueError when an item is longer than `capacity`.
    """
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    items: List[List[int]] = []
    free: List[int] = []
    for i in order:
        n = lengths[i]
        if n > capacity:
            raise ValueError(f"item {i} has {n} tokens, more than the row length (max_seq_len) {capacity}")
        best, best_free = -1, capacity + 1
        for b, f in enumerate(free):
            if n <= f < best_free:
                best, best_free = b, f
        if best < 0:
            items.append([i])
            free.append(capacity - n)
        else:
            items[best].append(i)
            free[best] -= n
    return [sorted(b) for b in items]


def balanced_bins(lengths: Sequence[int], capacity: int) -> List[List[int]]:
    """As few bins as best-fit-decreasing needs at `capacity`, with the longest bin as short as possible.

    Rows are padded to the longest row of a micro-batch, so after fixing the row count R we look
    (binary search) for the smallest capacity at which best-fit-decreasing still needs only R bins.
    """
    bins = best_fit_decreasing(lengths, capacity)
    if not bins:
        return bins
    rows = len(bins)
    lo = max(max(lengths), -(-sum(lengths) // rows))
    hi = capacity
    while lo < hi:
        mid = (lo + hi) // 2
        trial = best_fit_decreasing(lengths, mid)
        if len(trial) <= rows:
            hi, bins = mid, trial
        else:
            lo = mid + 1
    return bins  # the last (smallest-capacity) arrangement found with `rows` bins


def plan_rows(example_seq_lengths: Sequence[Sequence[int]], pack: bool,
              max_seq_len: int) -> List[List[Tuple[int, int]]]:
    """Rows of a micro-batch as lists of (example position, sequence position within the example).

    example_seq_lengths[e][s] = tokens of sequence s of example e. Packed rows hold whole examples in
    ascending example order; unpacked rows hold one sequence each, in example order.
    """
    if not pack:
        return [[(e, s)] for e, seqs in enumerate(example_seq_lengths) for s in range(len(seqs))]
    totals = [sum(seqs) for seqs in example_seq_lengths]
    bins = balanced_bins(totals, max_seq_len)
    bins.sort(key=lambda b: b[0])  # rows in order of their first example, for readability
    return [[(e, s) for e in b for s in range(len(example_seq_lengths[e]))] for b in bins]


def row_width(row_lengths: Sequence[int], max_seq_len: int, pad_to_max_len: bool, multiple: int = 1) -> int:
    """Width S of the batch: max_seq_len with pad_to_max_len, else the longest row rounded up to
    `multiple` (sequence parallelism splits S over the tensor group; max_seq_len is a multiple already)."""
    if pad_to_max_len:
        return max_seq_len
    return min(max_seq_len, -(-max(row_lengths) // multiple) * multiple)


def padding_fraction(example_seq_lengths: Sequence[Sequence[int]], micro_batch_size: int, max_seq_len: int,
                     pack: bool, pad_to_max_len: bool = False) -> float:
    """Fraction of batch positions that are padding when the examples, in order, form micro-batches.

    example_seq_lengths: per example, its sequences' token counts. Consecutive groups of
    `micro_batch_size` examples are laid out as the collator does. Returns pad / (rows * width) in [0, 1).
    """
    pad = total = 0
    for start in range(0, len(example_seq_lengths), micro_batch_size):
        group = example_seq_lengths[start:start + micro_batch_size]
        rows = plan_rows(group, pack, max_seq_len)
        lengths = [sum(group[e][s] for e, s in row) for row in rows]
        width = row_width(lengths, max_seq_len, pad_to_max_len)
        total += width * len(rows)
        pad += width * len(rows) - sum(lengths)
    return pad / total if total else 0.0
