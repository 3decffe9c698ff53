"""One forward pass from a micro-batch to per-sequence statistics, shared by train, eval and the
reference pass. The objective only ever sees `SequenceStats`, never logits."""
from __future__ import annotations

from typing import Dict, Optional

import torch

from megatron.model import GPTModel
from megatron.mpu import vocab_parallel_logprobs
from megatron.objectives import SequenceStats, sequence_stats

# Tokens per chunk when turning vocab-sharded logits into fp32 log-probs (bounds the fp32 working set).
LOGPROB_CHUNK_TOKENS = 4096


def model_inputs(batch: Dict[str, torch.Tensor], device: torch.device):
    """(input_ids, position_ids, segment_ids) on `device`, each Long[B,S]."""
    return tuple(batch[k].to(device, non_blocking=True) for k in ("input_ids", "position_ids", "segment_ids"))


def batch_to(batch: Dict[str, torch.Tensor], device: torch.device) -> Dict[str, torch.Tensor]:
    """Every tensor of the micro-batch moved to `device` (other values kept)."""
    return {k: (v.to(device, non_blocking=True) if torch.is_tensor(v) else v) for k, v in batch.items()}


def forward_stats(model, batch: Dict[str, torch.Tensor], ps, value_head: bool) -> SequenceStats:
    """Run `model` on the micro-batch and reduce to per-sequence sums.

    Returns SequenceStats with logp_sum[N] (sum of log p(response token), nats), token_count[N] and, for a
    value-head model, scores[N] (the value at each sequence's last token).
    """
    if not value_head and isinstance(getattr(model, "module", model), GPTModel):
        # Only scored positions (loss_mask != 0) need log-probs: the model's head + log-prob op (kernel registry:
        # eager logits then chunked log-softmax, or fused in token chunks; padded vocabulary ids masked) runs on
        # those rows alone, skipping prompt tokens and padding.
        mask = batch["loss_mask"]
        index = (mask.reshape(-1) != 0).nonzero().squeeze(1)
        logps = model(batch["input_ids"], batch["position_ids"], batch["segment_ids"], logit_index=index,
                      labels=batch["labels"].reshape(-1).index_select(0, index))
        token_logps = logps.new_zeros(mask.numel()).index_copy(0, index, logps).view(mask.shape)
        return sequence_stats(token_logps, batch)
    out = model(batch["input_ids"], batch["position_ids"], batch["segment_ids"])
    if value_head:
        zeros = torch.zeros(batch["labels"].shape, dtype=torch.float32, device=out.device)
        return sequence_stats(zeros, batch, scores_per_token=out.float())
    token_logps = vocab_parallel_logprobs(out, batch["labels"], ps, chunk_size=LOGPROB_CHUNK_TOKENS)
    return sequence_stats(token_logps, batch)


@torch.no_grad()
def reference_stats(ref_model, batch: Dict[str, torch.Tensor], ps, value_head: bool) -> Optional[SequenceStats]:
    """Per-sequence statistics of the frozen reference (live mode), without building a graph."""
    if ref_model is None:
        return None
    return forward_stats(ref_model, batch, ps, value_head)
