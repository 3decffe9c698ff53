"""Pairwise reward model: Bradley-Terry loss on scalar scores.

Bradley-Terry preference model as used for RLHF reward models (Ouyang et al. 2022, "Training language
models to follow instructions with human feedback"), with an optional per-pair margin (Llama 2, Touvron
et al. 2023) and the reward-centering auxiliary term of Eisenstein et al. 2023 ("Helping or herding?
Reward model ensembles mitigate but do not eliminate reward hacking"), as TRL's RewardTrainer defines:

    loss = mean_p[-log sigmoid(r_c - r_r - m_p)] + center_weight * mean_p[(r_c + r_r)^2]
    m_p  = objective.margin + batch['margin'][p]   (batch margin optional)
"""
from __future__ import annotations

from typing import Any, Dict, Mapping, Optional, Tuple

import torch
import torch.nn.functional as F

from .base import Objective, detached, index, safe_mean
from .registry import register_objective
from .stats import SequenceStats


@register_objective("rm")
class RewardModelObjective(Objective):
    """Bradley-Terry reward-model loss on `SequenceStats.scores` (value head at each sequence's last token).

    Metrics: accuracy (fraction r_c > r_r), chosen_score, rejected_score (means), margin (mean r_c - r_r).
    """

    batch_kind = "pairwise"
    uses_value_head = True
    allowed_keys = ("name", "margin", "center_weight")

    @classmethod
    def validate(cls, cfg: Any) -> None:
        """Also sets `model.value_head = True` (a reward model is the trunk with a scalar head)."""
        cfg.model.value_head = True
        super().validate(cfg)
        cls._check_nonneg(cfg.objective, "center_weight")

    def loss(self, policy: SequenceStats, reference: Optional[SequenceStats],
             batch: Mapping[str, torch.Tensor]) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        """policy.scores Float[N]; batch chosen_idx/rejected_idx Long[P], optional margin Float[P].

        Returns (0-dim loss, metrics). reference is unused.
        """
        if policy.scores is None:
            raise ValueError("objective 'rm' needs SequenceStats.scores (model with a value head)")
        scores = policy.scores
        c = index(batch, "chosen_idx", scores)
        r = index(batch, "rejected_idx", scores)
        rc, rr = scores[c], scores[r]
        margin = torch.full_like(rc, float(self.cfg.margin))
        if batch.get("margin") is not None:
            margin = margin + batch["margin"].to(device=rc.device, dtype=rc.dtype)
        diff = rc - rr
        loss = safe_mean(-F.logsigmoid(diff - margin))
        if self.cfg.center_weight:
            loss = loss + self.cfg.center_weight * safe_mean((rc + rr) ** 2)
        d = diff.detach()
        return loss, detached({
            "accuracy": safe_mean((d > 0).to(d.dtype)),
            "chosen_score": safe_mean(rc.detach()),
            "rejected_score": safe_mean(rr.detach()),
            "margin": safe_mean(d),
        })
