"""SimPO: simple preference optimisation with a length-normalised, reference-free reward.

Meng et al. 2024 ("SimPO: Simple Preference Optimization with a Reference-Free Reward"), as TRL's
CPOTrainer (loss_type simpo) defines it, with avg = logp_sum / token_count:

    loss = mean_p[-(1-eps) log sigmoid(beta (avg_c - avg_r) - gamma) - eps log sigmoid(-(...))]
           (+ nll_weight * NLL(chosen), the CPO-SimPO variant)

gamma is the paper's target reward margin; eps is label smoothing (Mitchell 2023).
"""
from __future__ import annotations

from typing import Any, Dict, Mapping, Optional, Tuple

import torch

from .aggregation import example_mean
from .base import Objective, chosen_nll, detached, index, preference_metrics, smoothed_sigmoid_loss
from .registry import register_objective
from .stats import SequenceStats


@register_objective("simpo")
class SimPOObjective(Objective):
    """SimPO (reference-free). Metrics as DPO's, with rewards = beta * avg logp; nll when nll_weight > 0."""

    batch_kind = "pairwise"
    allowed_keys = ("name", "beta", "gamma", "label_smoothing", "nll_weight")

    @classmethod
    def validate(cls, cfg: Any) -> None:
        """beta > 0, label_smoothing in [0, 0.5), nll_weight >= 0; no reference (it would be unused)."""
        super().validate(cfg)
        cls._check_beta(cfg.objective)
        cls._check_label_smoothing(cfg.objective)
        cls._check_nonneg(cfg.objective, "nll_weight")

    def loss(self, policy: SequenceStats, reference: Optional[SequenceStats],
             batch: Mapping[str, torch.Tensor]) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        """policy SequenceStats Float[N]; batch chosen_idx/rejected_idx Long[P]; reference ignored.

        Returns (0-dim loss averaged over pairs, metrics).
        """
        cfg = self.cfg
        avg = policy.mean_logp()
        c = index(batch, "chosen_idx", avg)
        r = index(batch, "rejected_idx", avg)
        logits = cfg.beta * (avg[c] - avg[r]) - cfg.gamma
        loss = example_mean(smoothed_sigmoid_loss(logits, cfg.label_smoothing), batch)
        metrics = {}
        if cfg.nll_weight:
            nll = chosen_nll(policy, c, batch)
            loss = loss + cfg.nll_weight * nll
            metrics["nll"] = nll
        metrics.update(preference_metrics(cfg.beta * avg[c], cfg.beta * avg[r], policy, c, r, batch))
        return loss, detached(metrics)
