"""The micro-batch contract dict <-> DeepSpeed's pipeline micro-batch `(inputs_tuple, labels_tuple)`.

DeepSpeed's pipeline engine feeds `inputs` to the first stage and hands `labels` to the loss function on
the last stage (it never sends labels between stages, so any tensors may travel there). The labels tuple
holds the contract tensors the objective needs, in the fixed order `LABEL_KEYS`, preceded by a Long[K]
presence mask so optional keys (`margin`, `ref_logps`, the kind-specific index tensors) round-trip:

    inputs = (input_ids Long[B,S], position_ids Long[B,S], segment_ids Long[B,S])
    labels = (present Long[K], *[batch[k] for k in LABEL_KEYS if k in batch])
"""
from __future__ import annotations

from typing import Dict, Tuple

import torch

INPUT_KEYS = ("input_ids", "position_ids", "segment_ids")
# Everything of the micro-batch contract the loss side reads (sequence_stats, objectives, precomputed reference).
LABEL_KEYS = ("labels", "loss_mask", "seq_id", "seq_last_pos", "segment_ids",
              "chosen_idx", "rejected_idx", "margin", "target_idx", "kl_idx", "kto_label", "ref_logps")

PipeMicroBatch = Tuple[Tuple[torch.Tensor, ...], Tuple[torch.Tensor, ...]]


def to_pipe_micro_batch(batch: Dict[str, torch.Tensor]) -> PipeMicroBatch:
    """Contract dict -> (inputs, labels) as described in the module docstring."""
    inputs = tuple(batch[k] for k in INPUT_KEYS)
    present = torch.tensor([1 if k in batch else 0 for k in LABEL_KEYS], dtype=torch.long)
    labels = (present,) + tuple(batch[k] for k in LABEL_KEYS if k in batch)
    return inputs, labels


def from_pipe_labels(labels: Tuple[torch.Tensor, ...]) -> Dict[str, torch.Tensor]:
    """The labels tuple (as the last stage's loss_fn receives it) -> the contract dict of those keys."""
    present, *tensors = labels
    keys = [k for k, p in zip(LABEL_KEYS, present.tolist()) if p]
    if len(keys) != len(tensors):
        raise ValueError(f"pipeline labels tuple holds {len(tensors)} tensors but its presence mask names {keys}")
    return dict(zip(keys, tensors))
