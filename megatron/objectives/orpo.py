"""ORPO: monolithic preference optimisation with an odds-ratio penalty, reference-free.

Hong et al. 2024 ("ORPO: Monolithic Preference Optimization without Reference Model"), as TRL's
ORPOTrainer defines it, with avg = logp_sum / token_count (length-averaged log-probs):

    log_odds = (avg_c - avg_r) - (log(1 - exp(avg_c)) - log(1 - exp(avg_r)))
    loss     = NLL(chosen) - orpo_lambda * mean_p[log sigmoid(log_odds)]

NLL(chosen) is the per-token mean NLL over all chosen tokens; log(1 - exp(x)) is computed stably.
"""
from __future__ import annotations

from typing import Any, Dict, Mapping, Optional, Tuple

import torch
import torch.nn.functional as F

from .base import Objective, chosen_nll, detached, index, log1mexp, preference_metrics, safe_mean
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
        nll = chosen_nll(policy, c)
        loss = nll - cfg.orpo_lambda * safe_mean(ratio)
        metrics = {"nll": nll, "log_odds_ratio": safe_mean(ratio),
                   "log_odds_chosen": safe_mean(log_odds)}
        metrics.update(preference_metrics(cfg.beta * ac, cfg.beta * ar, policy, c, r))
        return loss, detached(metrics)
