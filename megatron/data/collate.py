"""Examples -> one micro-batch dict following the MICRO-BATCH CONTRACT (docs/ARCHITECTURE.md).

Sequences are numbered 0..N-1 in example order (example 0's sequences, then example 1's, ...), the
same numbering packed or not, so both layouts of the same examples are directly comparable:
  sft       sequence e is example e
  pairwise  chosen_idx[p] = 2p, rejected_idx[p] = 2p+1 (+ margin[p] when any record had one, 0 for the
            others; + score_chosen[p], score_rejected[p] when any record had score columns, NaN for the others)
  unpaired  target_idx[e] = 2e, kl_idx[e] = 2e+1, kto_label[e]
Extra keys: dataset_seq_index Long[N] (the sequence's position in the dataset's reference order, see
`indexed.write_reference_logps`) and ref_logps Float[N] when every sequence has a precomputed value.
"""
from __future__ import annotations

import math
from typing import Dict, Sequence

import numpy as np
import torch

from .dataset import Example
from .packing import plan_rows, row_width


def collate(examples: Sequence[Example], pack: bool, max_seq_len: int,
            pad_to_max_len: bool = False, width_multiple: int = 1) -> Dict[str, torch.Tensor]:
    """Lay out `examples` in rows (packed: best-fit of whole examples; unpacked: one sequence per row).

    Returns input_ids/labels/position_ids/segment_ids/seq_id Long[B,S], loss_mask Float[B,S],
    seq_last_pos Long[N] and the kind's index tensors. labels[t] is the next token of the same sequence
    (0 at its last token and in padding); loss_mask[t] = 1 iff that next token is a response token.
    width_multiple: S is rounded up to a multiple of it (the tensor size under sequence parallelism).
    """
    if not examples:
        raise ValueError("collate needs at least one example")
    kind = examples[0].kind
    seqs = [s for ex in examples for s in ex.sequences]
    first_seq = np.cumsum([0] + [len(ex.sequences) for ex in examples])  # example -> its first sequence number
    rows = plan_rows([[len(s.ids) for s in ex.sequences] for ex in examples], pack, max_seq_len)
    row_lens = [sum(len(examples[e].sequences[s].ids) for e, s in row) for row in rows]
    if max(row_lens) > max_seq_len:
        raise ValueError(f"a row needs {max(row_lens)} tokens, more than max_seq_len={max_seq_len}")
    B, S = len(rows), row_width(row_lens, max_seq_len, pad_to_max_len, width_multiple)

    input_ids = np.zeros((B, S), dtype=np.int64)
    labels = np.zeros((B, S), dtype=np.int64)
    loss_mask = np.zeros((B, S), dtype=np.float32)
    position_ids = np.zeros((B, S), dtype=np.int64)
    segment_ids = np.zeros((B, S), dtype=np.int64)
    seq_id = np.full((B, S), -1, dtype=np.int64)
    seq_last_pos = np.zeros(len(seqs), dtype=np.int64)
    for b, row in enumerate(rows):
        t = 0
        for segment, (e, s) in enumerate(row, start=1):
            k = int(first_seq[e]) + s
            ids, n, plen = seqs[k].ids, len(seqs[k].ids), seqs[k].prompt_len
            input_ids[b, t:t + n] = ids
            labels[b, t:t + n - 1] = ids[1:]
            # position j predicts token j+1, which is a response token when j+1 >= prompt_len
            if seqs[k].scored is None:
                loss_mask[b, t + max(plen - 1, 0):t + n - 1] = 1.0
            else:  # several scored spans (every assistant turn)
                loss_mask[b, t:t + n - 1] = seqs[k].scored[1:]
            position_ids[b, t:t + n] = np.arange(n)
            segment_ids[b, t:t + n] = segment
            seq_id[b, t:t + n] = k
            seq_last_pos[k] = b * S + t + n - 1
            t += n

    batch = {
        "input_ids": torch.from_numpy(input_ids),
        "labels": torch.from_numpy(labels),
        "loss_mask": torch.from_numpy(loss_mask),
        "position_ids": torch.from_numpy(position_ids),
        "segment_ids": torch.from_numpy(segment_ids),
        "seq_id": torch.from_numpy(seq_id),
        "seq_last_pos": torch.from_numpy(seq_last_pos),
        "dataset_seq_index": torch.tensor([s.dataset_index for s in seqs], dtype=torch.long),
    }
    if kind == "pairwise":
        batch["chosen_idx"] = torch.from_numpy(first_seq[:-1].astype(np.int64))
        batch["rejected_idx"] = torch.from_numpy(first_seq[:-1].astype(np.int64) + 1)
        margins = [ex.margin for ex in examples]
        if any(not math.isnan(m) for m in margins):
            batch["margin"] = torch.tensor([0.0 if math.isnan(m) else m for m in margins], dtype=torch.float32)
        scores = [[s.score for s in ex.sequences] for ex in examples]
        if any(not math.isnan(x) for pair in scores for x in pair):
            batch["score_chosen"] = torch.tensor([pair[0] for pair in scores], dtype=torch.float32)
            batch["score_rejected"] = torch.tensor([pair[1] for pair in scores], dtype=torch.float32)
    elif kind == "unpaired":
        batch["target_idx"] = torch.from_numpy(first_seq[:-1].astype(np.int64))
        batch["kl_idx"] = torch.from_numpy(first_seq[:-1].astype(np.int64) + 1)
        batch["kto_label"] = torch.tensor([ex.label for ex in examples], dtype=torch.float32)
    if all(s.ref_logp is not None for s in seqs):
        batch["ref_logps"] = torch.tensor([s.ref_logp for s in seqs], dtype=torch.float32)
    return batch


def sequence_ids_of_batch(batch: Dict[str, torch.Tensor]) -> torch.Tensor:
    """Long[N]: each batch sequence's position in the dataset's reference order (for ref log-prob tools)."""
    return batch["dataset_seq_index"]


def batch_padding_fraction(batch: Dict[str, torch.Tensor]) -> float:
    """Fraction of positions of `batch` that are padding (segment id 0)."""
    seg = batch["segment_ids"]
    return float((seg == 0).sum()) / max(seg.numel(), 1)
