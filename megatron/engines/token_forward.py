"""Per-token forwards for the online loop: log-probs (and entropies) of a policy or reference, values of a critic
or reward model, in the packed micro-batch layout ([B,S], position t scores `labels[b,t]`).

Only scored positions (`loss_mask != 0`) run the LM head: the model's head + log-prob op (vocab-parallel, padded
vocabulary ids masked, fused or chunked by the kernel registry) gets those rows alone, and the results are put back
into [B,S] with zeros elsewhere, as `forward.forward_stats` does for sequence sums.
"""
from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch


def scored_index(batch: Dict[str, torch.Tensor]) -> torch.Tensor:
    """Long[T]: flat positions b*S+t of the scored tokens (loss_mask != 0), ascending."""
    return (batch["loss_mask"].reshape(-1) != 0).nonzero().squeeze(1)


def _scatter(values: torch.Tensor, index: torch.Tensor, shape) -> torch.Tensor:
    """Float[T] at flat positions `index` -> Float[shape], zeros elsewhere (differentiable in values)."""
    n = 1
    for s in shape:
        n *= int(s)
    return values.new_zeros(n).index_copy(0, index, values).view(*shape)


def token_logps(model, batch: Dict[str, torch.Tensor], with_entropy: bool = False
                ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Log-probs of the labels (and the entropy of the next-token distribution) at the scored positions.

    model: a GPTModel with an LM head or a DeepSpeed engine around one (tensor-parallel shards: every TP peer
    gets the same values). Returns (logps Float32[B,S] nats, entropy Float32[B,S] nats or None), 0 at unscored
    positions; differentiable when grad is enabled.
    """
    shape = batch["loss_mask"].shape
    index = scored_index(batch)
    labels = batch["labels"].reshape(-1).index_select(0, index)
    out = model(batch["input_ids"], batch["position_ids"], batch["segment_ids"], logit_index=index, labels=labels,
                with_entropy=with_entropy)
    logps, entropy = out if with_entropy else (out, None)
    return _scatter(logps.float(), index, shape), (_scatter(entropy.float(), index, shape) if with_entropy else None)


def token_values(model, batch: Dict[str, torch.Tensor]) -> torch.Tensor:
    """A value-head model's output at every position -> Float32[B,S] (a critic's V at the state that emits
    labels[b,t]; a reward model's score at a sequence's last token). Differentiable when grad is enabled."""
    return model(batch["input_ids"], batch["position_ids"], batch["segment_ids"]).float()
