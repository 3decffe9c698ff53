"""Supervised fine-tuning: token-level negative log-likelihood of the response tokens."""
from __future__ import annotations

from typing import Dict, Mapping, Optional, Tuple

import torch

from .base import Objective, detached
from .registry import register_objective
from .stats import SequenceStats


@register_objective("sft")
class SFTObjective(Objective):
    """Mean NLL over every scored token of the micro-batch (standard maximum likelihood).

    loss = -sum_n logp_sum[n] / sum_n token_count[n]   (nats per token)

    Metrics: nll (= the loss), ppl = exp(nll), tokens (scored tokens in the micro-batch).
    """

    batch_kind = "single"
    allowed_keys = ("name",)

    def loss(self, policy: SequenceStats, reference: Optional[SequenceStats],
             batch: Mapping[str, torch.Tensor]) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        """policy: SequenceStats over N sequences; reference unused. Returns (0-dim loss in nats/token, metrics)."""
        tokens = policy.token_count.sum()
        nll = -policy.logp_sum.sum() / tokens.clamp(min=1.0)
        return nll, detached({"nll": nll, "ppl": torch.exp(nll.detach()), "tokens": tokens})
