"""Supervised fine-tuning: token-level negative log-likelihood of the response tokens."""
from __future__ import annotations

import math
from typing import Dict, Mapping, Optional, Tuple

import torch

from .aggregation import GLOBAL_COUNTS, global_mean
from .base import Objective, detached
from .registry import register_objective
from .stats import SequenceStats


@register_objective("sft")
class SFTObjective(Objective):
    """Mean NLL over every scored token of the GLOBAL batch (standard maximum likelihood).

    loss = -sum_n logp_sum[n] / (scored tokens of the global batch)   (nats per token; this micro-batch's
    share through `aggregation.global_mean`, so any split of the step gives the full-batch loss and gradient)

    Metrics: nll (= the loss), tokens (scored tokens of the global batch; of this batch without global
    counts); `summarize_metrics` adds ppl = exp(mean nll).
    """

    batch_kind = "single"
    allowed_keys = ("name",)

    def loss(self, policy: SequenceStats, reference: Optional[SequenceStats],
             batch: Mapping[str, torch.Tensor]) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        """policy: SequenceStats over N sequences; reference unused. Returns (0-dim loss in nats/token, metrics)."""
        tokens = policy.token_count.sum()
        nll = global_mean(-policy.logp_sum.sum(), tokens, "tokens", batch)
        counts = batch.get(GLOBAL_COUNTS)
        if counts is not None:
            tokens = torch.tensor(counts.count("tokens"), dtype=tokens.dtype)
        return nll, detached({"nll": nll, "tokens": tokens})

    def summarize_metrics(self, metrics: Dict[str, float]) -> Dict[str, float]:
        """Adds ppl = exp(nll) from the step's mean NLL (a mean of per-micro-batch exps would not be a ppl)."""
        if "nll" in metrics:
            metrics = {**metrics, "ppl": math.exp(min(metrics["nll"], 700.0))}
        return metrics
