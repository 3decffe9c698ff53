"""ORPO: monolithic preference optimisation with an odds-ratio penalty, reference-free.

Hong et al. 2024 ("ORPO: Monolithic Preference Optimization without Reference Model"), as TRL's
ORPOTrainer defines it, with avg = logp_sum / token_count (length-averaged log-probs):

    log_odds = (avg_c - avg_r) - (log(1 - exp(avg_c)) - log(1 - exp(avg_r)))
    loss     = NLL(chosen) - orpo_lambda * mean_p[log sigmoid(log_odds)]

NLL(chosen) is the per-token mean NLL over all chosen tokens of the global batch and mean_p the mean over its
pairs (`aggregation`); log(1 - exp(x)) is computed stably.
"""
from __future__ import annotations

from typing import Any, Dict, Mapping, Optional, Tuple

import torch
import torch.nn.functional as F

from .aggregation import example_mean
from .base import Objective, chosen_nll, detached, index, log1mexp, preference_metrics
from .registry import register_objective
from .stats import SequenceStats


@register_objective("orpo")
class ORPOObjective(Objective):
    """ORPO. Metrics: nll, log_odds_ratio (mean log sigmoid(log_odds), TRL's name), log_odds_chosen
    (mean log_odds), and DPO's rewards/* and logps/* with rewards = beta * avg logp (beta only scales
    the reported rewards; orpo_lambda weights the loss).
    """

    batch_kind = "pairwise"
    allowed_keys = ("name", "beta", "orpo_lambda")

    @classmethod
    def validate(cls, cfg: Any) -> None:
        """beta > 0 (reward scale), orpo_lambda >= 0; no reference (it would be unused)."""
        super().validate(cfg)
        cls._check_beta(cfg.objective)
        cls._check_nonneg(cfg.objective, "orpo_lambda")

    def loss(self, policy: SequenceStats, reference: Optional[SequenceStats],
             batch: Mapping[str, torch.Tensor]) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        """policy SequenceStats Float[N]; batch chosen_idx/rejected_idx Long[P]; reference ignored.

        Returns (0-dim loss, metrics).
        """
        cfg = self.cfg
        avg = policy.mean_logp()
        c = index(batch, "chosen_idx", avg)
        r = index(batch, "rejected_idx", avg)
        ac, ar = avg[c], avg[r]
        log_odds = (ac - ar) - (log1mexp(ac) - log1mexp(ar))
        ratio = F.logsigmoid(log_odds)
        nll = chosen_nll(policy, c, batch)
        mean_ratio = example_mean(ratio, batch)
        loss = nll - cfg.orpo_lambda * mean_ratio
        metrics = {"nll": nll, "log_odds_ratio": mean_ratio,
                   "log_odds_chosen": example_mean(log_odds.detach(), batch)}
        metrics.update(preference_metrics(cfg.beta * ac, cfg.beta * ar, policy, c, r, batch))
        return loss, detached(metrics)
