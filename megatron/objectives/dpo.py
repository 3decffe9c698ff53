"""Direct Preference Optimization and its loss variants.

With per-sequence log-prob sums pi (policy) and ref (reference) and a pair (c, r):

    h = (pi_c - ref_c) - (pi_r - ref_r)

loss_type (per pair, averaged over the global batch's pairs):
  sigmoid  -(1-eps) log sigmoid(beta h) - eps log sigmoid(-beta h)
           DPO, Rafailov et al. 2023 ("Direct Preference Optimization: Your Language Model is Secretly a
           Reward Model"); eps > 0 is conservative DPO / label smoothing (Mitchell 2023, "A note on DPO with
           noisy preferences").
  robust   (-(1-eps) log sigmoid(beta h) + eps log sigmoid(-beta h)) / (1 - 2 eps)
           unbiased loss under label noise, Chowdhury et al. 2024 ("Provably Robust DPO").
  hinge    relu(1 - beta h)
           SLiC, Zhao et al. 2023 ("SLiC-HF: Sequence Likelihood Calibration with Human Feedback").
  ipo      (h - 1/(2 beta))^2 with h from LENGTH-AVERAGED log-probs (logp_sum / token_count of policy and
           reference), Azar et al. 2023 ("A General Theoretical Paradigm to Understand Learning from Human
           Preferences"), averaged as TRL does.

reference_free: ref = 0 (no reference policy needed). nll_weight > 0 adds nll_weight * NLL(chosen), the
per-token mean NLL over all chosen tokens of the global batch: RPO, Pang et al. 2024 ("Iterative Reasoning Preference
Optimization"). Formulas and metric names follow TRL's DPOTrainer.
"""
from __future__ import annotations

from typing import Any, Dict, Mapping, Optional, Tuple

import torch
import torch.nn.functional as F

from megatron.config import ConfigError

from .aggregation import example_mean
from .base import Objective, chosen_nll, detached, index, preference_metrics, smoothed_sigmoid_loss
from .registry import register_objective
from .stats import SequenceStats

DPO_LOSS_TYPES = ("sigmoid", "ipo", "robust", "hinge")


def dpo_losses(h: torch.Tensor, beta: float, loss_type: str, label_smoothing: float = 0.0) -> torch.Tensor:
    """Per-pair DPO-family losses.

    Args:
      h: Float[P], (pi_c - ref_c) - (pi_r - ref_r) in nats (length-averaged for ipo).
      beta: inverse temperature (> 0); loss_type: one of DPO_LOSS_TYPES; label_smoothing: eps in [0, 0.5).
    Returns Float[P].
    """
    if loss_type == "sigmoid":
        return smoothed_sigmoid_loss(beta * h, label_smoothing)
    if loss_type == "robust":
        eps = label_smoothing
        return (-(1.0 - eps) * F.logsigmoid(beta * h) + eps * F.logsigmoid(-beta * h)) / (1.0 - 2.0 * eps)
    if loss_type == "hinge":
        return torch.relu(1.0 - beta * h)
    if loss_type == "ipo":
        return (h - 1.0 / (2.0 * beta)) ** 2
    raise ValueError(f"unknown DPO loss_type {loss_type!r}; one of {', '.join(DPO_LOSS_TYPES)}")


@register_objective("dpo")
class DPOObjective(Objective):
    """DPO family (sigmoid | ipo | robust | hinge), optional reference-free and RPO NLL term.

    Metrics: rewards/chosen (mean beta*(pi_c - ref_c)), rewards/rejected, rewards/accuracy,
    rewards/margin, logps/chosen, logps/rejected (mean policy logp_sum), nll (when nll_weight > 0).
    For ipo the rewards use the length-averaged log-probs that enter h.
    """

    batch_kind = "pairwise"
    allowed_keys = ("name", "beta", "loss_type", "label_smoothing", "reference_free", "nll_weight")

    @classmethod
    def needs_reference(cls, obj_cfg: Any) -> bool:
        """True unless `objective.reference_free`."""
        return not obj_cfg.reference_free

    @classmethod
    def validate(cls, cfg: Any) -> None:
        """Checks loss_type, beta > 0, label_smoothing in [0, 0.5) (sigmoid/robust only), nll_weight >= 0."""
        obj = cfg.objective
        if obj.loss_type not in DPO_LOSS_TYPES:
            from megatron.config.load import _suggest
            raise ConfigError(f"key 'objective.loss_type': {obj.loss_type!r} is not one of "
                              f"{', '.join(DPO_LOSS_TYPES)}{_suggest(str(obj.loss_type), DPO_LOSS_TYPES)}")
        super().validate(cfg)
        cls._check_beta(obj)
        cls._check_label_smoothing(obj)
        if obj.label_smoothing and obj.loss_type not in ("sigmoid", "robust"):
            raise ConfigError(f"key 'objective.label_smoothing': only loss_type sigmoid or robust use it, "
                              f"got {obj.label_smoothing} with loss_type={obj.loss_type}; set it to 0")
        cls._check_nonneg(obj, "nll_weight")

    def loss(self, policy: SequenceStats, reference: Optional[SequenceStats],
             batch: Mapping[str, torch.Tensor]) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        """policy/reference: SequenceStats Float[N]; batch chosen_idx/rejected_idx Long[P].

        Returns (0-dim loss: mean over pairs, plus nll_weight * chosen-token NLL; both global-batch means
        through `aggregation` when the loop passes GlobalCounts, metrics).
        """
        cfg = self.cfg
        c = index(batch, "chosen_idx", policy.logp_sum)
        r = index(batch, "rejected_idx", policy.logp_sum)
        average = cfg.loss_type == "ipo"
        pi = policy.mean_logp() if average else policy.logp_sum
        if cfg.reference_free:
            ref = torch.zeros_like(pi)
        else:
            reference = self._reference(reference)
            ref = (reference.mean_logp() if average else reference.logp_sum).detach().to(pi)
        chosen_ratio = pi[c] - ref[c]
        rejected_ratio = pi[r] - ref[r]
        h = chosen_ratio - rejected_ratio
        loss = example_mean(dpo_losses(h, cfg.beta, cfg.loss_type, cfg.label_smoothing), batch)
        metrics = {}
        if cfg.nll_weight:
            nll = chosen_nll(policy, c, batch)
            loss = loss + cfg.nll_weight * nll
            metrics["nll"] = nll
        metrics.update(preference_metrics(cfg.beta * chosen_ratio, cfg.beta * rejected_ratio, policy, c, r, batch))
        return loss, detached(metrics)
