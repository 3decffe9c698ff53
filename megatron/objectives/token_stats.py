"""Per-token statistics for the token-level (online RL) objectives, beside `SequenceStats`.

The offline objectives reduce the model's per-token log-probs to per-sequence sums (`SequenceStats`). Policy-gradient
losses need the tokens themselves: the ratio to the rollout policy, the KL to the reference and the advantage are
per token. `TokenStats` keeps them in the packed micro-batch layout of `megatron.data` (`[B,S]`, position t holds
the log-prob of `labels[b,t]`; `loss_mask` marks the scored response tokens, `seq_id` the sequence, -1 padding),
so the same micro-batch contract serves both families.

The helpers below move values between tokens and sequences inside that layout:

    seq_sum(x, batch)[n]      = sum_t x[t] * loss_mask[t]  over positions of sequence n          Float[N]
    seq_mean(x, batch)[n]     = seq_sum(x)[n] / max(scored tokens of n, 1)                       Float[N]
    per_token(v, batch)[b,t]  = v[seq_id[b,t]], 0 where seq_id is -1                             Float[B,S]
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Optional

import torch

from .stats import SequenceStats, _scatter_tokens, _stats_dtype, num_sequences


@dataclass
class TokenStats:
    """Per-token outputs of one model forward over a packed micro-batch.

    Attributes:
      logps:   Float[B,S], log-prob (nats) of `labels[b,t]` under the model; only scored positions matter.
      batch:   the micro-batch it was computed on (`loss_mask` Float[B,S], `seq_id` Long[B,S], `seq_last_pos`).
      entropy: optional Float[B,S], entropy (nats) of the model's next-token distribution at each position.
      values:  optional Float[B,S], a critic's value estimate at each position (PPO).
    """

    logps: torch.Tensor
    batch: Mapping[str, torch.Tensor]
    entropy: Optional[torch.Tensor] = None
    values: Optional[torch.Tensor] = None

    @property
    def mask(self) -> torch.Tensor:
        """`loss_mask` Float[B,S] on the device and (fp32+) dtype of `logps`; 0 at padding (seq_id -1)."""
        return scored_mask(self.batch, self.logps)

    @property
    def num_sequences(self) -> int:
        """N, the number of sequences in the micro-batch."""
        return num_sequences(self.batch)

    def sequence_stats(self) -> SequenceStats:
        """The per-sequence sums (`SequenceStats`: logp_sum Float[N], token_count Float[N]) of these tokens."""
        logp_sum, counts = _scatter_tokens(self.logps, self.batch, self.num_sequences, _stats_dtype(self.logps.dtype))
        return SequenceStats(logp_sum=logp_sum, token_count=counts)


def token_stats(token_logps: torch.Tensor, batch: Mapping[str, torch.Tensor],
                entropy: Optional[torch.Tensor] = None, values: Optional[torch.Tensor] = None) -> TokenStats:
    """Wrap a forward's per-token outputs Float[B,S] (log-probs, optional entropy and values) as `TokenStats`.

    Checks that every tensor has the micro-batch's [B,S] shape; keeps their dtype and autograd graph.
    """
    shape = tuple(batch["loss_mask"].shape)
    for name, t in (("token_logps", token_logps), ("entropy", entropy), ("values", values)):
        if t is not None and tuple(t.shape) != shape:
            raise ValueError(f"token_stats: {name} has shape {tuple(t.shape)} but the micro-batch is {shape} "
                             "(loss_mask); pass per-position values in the packed [B,S] layout")
    return TokenStats(logps=token_logps, batch=batch, entropy=entropy, values=values)


def scored_mask(batch: Mapping[str, torch.Tensor], like: torch.Tensor) -> torch.Tensor:
    """`loss_mask` Float[B,S] with padding (seq_id -1) zeroed, on the device of `like` in dtype fp32 or wider."""
    dtype = _stats_dtype(like.dtype)
    mask = batch["loss_mask"].to(device=like.device, dtype=dtype)
    return mask * (batch["seq_id"].to(like.device) >= 0).to(dtype)


def seq_sum(x: torch.Tensor, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """Sum of `x[B,S] * loss_mask` over each sequence's positions -> Float[N] (differentiable in x).

    Unscored positions (mask 0 or seq_id -1) are skipped, so non-finite values there never reach the result.
    """
    return _scatter_tokens(x, batch, num_sequences(batch), _stats_dtype(x.dtype))[0]


def seq_mean(x: torch.Tensor, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """Mean of `x[B,S]` over each sequence's scored tokens -> Float[N]; 0 for a sequence without scored tokens."""
    sums, counts = _scatter_tokens(x, batch, num_sequences(batch), _stats_dtype(x.dtype))
    return sums / counts.clamp(min=1.0)


def per_token(values: torch.Tensor, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """Broadcast per-sequence `values` Float[N] to the micro-batch's positions -> Float[B,S] (0 at padding).

    Differentiable in `values`.
    """
    seq_id = batch["seq_id"].to(values.device)
    if values.numel() == 0:  # no sequences: every position is padding
        return torch.zeros(seq_id.shape, dtype=values.dtype, device=values.device)
    idx = seq_id.clamp(min=0)
    return torch.where(seq_id >= 0, values[idx], torch.zeros((), dtype=values.dtype, device=values.device))
