"""Per-sequence statistics that every objective consumes.

The model produces per-token log-probabilities `token_logps[B,S]` (nats, the log-prob of `labels[b,t]`)
and, for reward models, per-token values `[B,S]`. A micro-batch packs N sequences into B rows; `seq_id`
says which sequence each position belongs to (-1 for padding) and `loss_mask` which positions are scored.
`sequence_stats` reduces them to one `SequenceStats` per micro-batch:

    logp_sum[n]    = sum_t token_logps[t] * loss_mask[t]   over positions t with seq_id[t] == n   (nats)
    token_count[n] = sum_t loss_mask[t]                    over the same positions               (tokens)
    scores[n]      = values.flatten()[seq_last_pos[n]]                                          (reward units)

All reductions are differentiable with respect to `token_logps` and the values.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Optional

import torch


@dataclass
class SequenceStats:
    """Per-sequence sums for the N sequences of a micro-batch.

    Attributes:
      logp_sum:    Float[N] (fp32 or wider), summed log-probability of the scored tokens, in nats.
      token_count: Float[N], number of scored tokens (sum of loss_mask) of each sequence.
      scores:      Float[N] scalar score of each sequence (value head at the last token), or None.
    """

    logp_sum: torch.Tensor
    token_count: torch.Tensor
    scores: Optional[torch.Tensor] = None

    @property
    def num_sequences(self) -> int:
        """N, the number of sequences."""
        return int(self.logp_sum.shape[0])

    def mean_logp(self) -> torch.Tensor:
        """Length-normalised log-prob `logp_sum / token_count` -> Float[N] (nats per token).

        A sequence without scored tokens (count 0, sum 0) gets 0.
        """
        return self.logp_sum / self.token_count.clamp(min=1.0)


def _stats_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 at least: bf16/fp16 inputs are promoted, fp64 is kept."""
    return torch.promote_types(dtype, torch.float32)


def num_sequences(batch: Mapping[str, torch.Tensor]) -> int:
    """N for a micro-batch: `len(seq_last_pos)` when present, else `max(seq_id) + 1`."""
    if "seq_last_pos" in batch:
        return int(batch["seq_last_pos"].numel())
    seq_id = batch["seq_id"]
    return int(seq_id.max().item()) + 1 if seq_id.numel() else 0


def _scatter_tokens(values: torch.Tensor, batch: Mapping[str, torch.Tensor], n: int,
                    dtype: torch.dtype) -> tuple:
    """Sum `values[B,S] * loss_mask` and `loss_mask` per sequence -> (Float[n], Float[n]).

    Only positions with `seq_id >= 0` and a non-zero mask contribute, so non-finite values at
    unscored positions (e.g. padding) never reach the sums or the gradients.
    """
    device = values.device
    seq_id = batch["seq_id"].to(device).reshape(-1)
    mask = batch["loss_mask"].to(device=device, dtype=dtype).reshape(-1)
    if seq_id.numel() != values.numel():
        raise ValueError(f"token tensor has {values.numel()} elements but seq_id has {seq_id.numel()}; "
                         "both must be [B,S]")
    sel = (seq_id >= 0) & (mask != 0)
    idx = seq_id[sel]
    m = mask[sel]
    vals = values.reshape(-1)[sel].to(dtype) * m
    sums = torch.zeros(n, dtype=dtype, device=device).index_add(0, idx, vals)
    counts = torch.zeros(n, dtype=dtype, device=device).index_add(0, idx, m)
    return sums, counts


def token_counts(batch: Mapping[str, torch.Tensor], dtype: torch.dtype = torch.float32,
                 device: Optional[torch.device] = None) -> torch.Tensor:
    """Scored tokens per sequence: scatter-add of `loss_mask[B,S]` over `seq_id` -> Float[N]."""
    mask = batch["loss_mask"]
    device = device if device is not None else mask.device
    zeros = torch.zeros(mask.shape, dtype=dtype, device=device)
    return _scatter_tokens(zeros, batch, num_sequences(batch), dtype)[1]


def sequence_stats(token_logps: torch.Tensor, batch: Mapping[str, torch.Tensor],
                   scores_per_token: Optional[torch.Tensor] = None) -> SequenceStats:
    """Reduce per-token log-probs (and values) to per-sequence statistics.

    Args:
      token_logps: Float[B,S], log-prob (nats) of `labels[b,t]` under the model; any float dtype.
      batch: the micro-batch; uses `seq_id` Long[B,S] (-1 = padding), `loss_mask` Float[B,S] and
        `seq_last_pos` Long[N] (flat index b*S+t of each sequence's last token).
      scores_per_token: optional Float[B,S] value-head output; `scores[n]` is read at `seq_last_pos[n]`.

    Returns:
      SequenceStats with logp_sum Float[N], token_count Float[N] (fp32, or fp64 for fp64 input) and
      scores Float[N] or None. Differentiable with respect to `token_logps` and `scores_per_token`.
    """
    dtype = _stats_dtype(token_logps.dtype)
    n = num_sequences(batch)
    logp_sum, counts = _scatter_tokens(token_logps, batch, n, dtype)
    scores = None
    if scores_per_token is not None:
        if "seq_last_pos" not in batch:
            raise KeyError("scores need batch['seq_last_pos'] (flat index of each sequence's last token)")
        pos = batch["seq_last_pos"].to(scores_per_token.device)
        scores = scores_per_token.reshape(-1)[pos].to(_stats_dtype(scores_per_token.dtype))
    return SequenceStats(logp_sum=logp_sum, token_count=counts, scores=scores)


def precomputed_reference(batch: Mapping[str, torch.Tensor],
                          device: Optional[torch.device] = None) -> SequenceStats:
    """Reference statistics from precomputed log-prob sums in the batch.

    Args:
      batch: micro-batch with `ref_logps` Float[N] (reference log-prob sums per sequence, nats),
        `seq_id` Long[B,S] and `loss_mask` Float[B,S].
      device: where to put the result (default: the device of `ref_logps`).

    Returns:
      SequenceStats(logp_sum=ref_logps Float[N] fp32+, token_count=Float[N] from loss_mask (the same
      counts as the policy's), scores=None); no gradient.
    """
    if "ref_logps" not in batch:
        raise KeyError("batch has no 'ref_logps': reference.mode=precomputed needs a dataset with "
                       "precomputed reference log-probs")
    ref = batch["ref_logps"]
    device = device if device is not None else ref.device
    dtype = _stats_dtype(ref.dtype)
    logp_sum = ref.to(device=device, dtype=dtype).detach()
    counts = token_counts(batch, dtype=dtype, device=device)
    if counts.shape != logp_sum.shape:
        raise ValueError(f"ref_logps has shape {tuple(logp_sum.shape)} but the batch has {counts.shape[0]} sequences")
    return SequenceStats(logp_sum=logp_sum, token_count=counts, scores=None)
