"""Reward-aware preference optimisation (RPO), Nemotron-4 340B Technical Report (NVIDIA 2024, arXiv:2406.11704).

DPO only knows that y_c beats y_l; RPO also uses by how much, as judged by a reward model r*. The paper's
loss (section "Reward-aware Preference Optimization") for a prompt x and a pair (y_c, y_l):

    L_rpo(x, y_c, y_l) = D[ beta log pi(y_c|x)/pi_ref(y_c|x) - beta log pi(y_l|x)/pi_ref(y_l|x)
                            || eta (r*(x, y_c) - r*(x, y_l)) ]

    D[a || b] := sigma(b) log(sigma(b) / sigma(a)) + (1 - sigma(b)) log((1 - sigma(b)) / (1 - sigma(a)))

i.e. the implicit reward margin a = beta h, h = (pi_c - ref_c) - (pi_r - ref_r) (log-prob sums, nats, as
in DPO), is pulled towards the scaled reward margin b = eta (score_chosen - score_rejected). D is the KL
divergence between Bernoulli(sigmoid(b)) and Bernoulli(sigmoid(a)). `objective.loss_type` picks the
distance, with the names NeMo-Aligner uses for the same family (and Sun et al. 2025, "Reward-aware Preference
Optimization: A Unified Mathematical Framework for Model Alignment", arXiv:2502.00203):

  bwd_kl  KL(Ber(sigmoid(b)) || Ber(sigmoid(a)))   the paper's D[a || b] above (the Nemotron-4 loss)
  fwd_kl  KL(Ber(sigmoid(a)) || Ber(sigmoid(b)))   the same divergence with the arguments swapped
  sq      (a - b)^2                                squared distance

All three are 0 exactly when a = b. Their derivatives in a are sigmoid(a) - sigmoid(b) (bwd_kl),
sigmoid(a) sigmoid(-a) (a - b) (fwd_kl) and 2 (a - b) (sq). With b -> +inf bwd_kl becomes DPO's
-log sigmoid(a). Per-pair losses are averaged over the global batch's pairs, as in DPO.

The reward margin comes from the micro-batch: `batch['margin'][p]` = score_chosen - score_rejected of pair p
(the data pipeline fills it from the records' score columns; see docs/ARCHITECTURE.md). nll_weight > 0 adds
nll_weight * NLL(chosen) as in DPO.
"""
from __future__ import annotations

from typing import Any, Dict, Mapping, Optional, Tuple

import torch
import torch.nn.functional as F

from megatron.config import ConfigError

from .aggregation import example_mean
from .base import Objective, chosen_nll, detached, index, preference_metrics
from .registry import register_objective
from .stats import SequenceStats

RPO_LOSS_TYPES = ("bwd_kl", "fwd_kl", "sq")


def _bernoulli_kl(logit_p: torch.Tensor, logit_q: torch.Tensor) -> torch.Tensor:
    """KL(Ber(sigmoid(logit_p)) || Ber(sigmoid(logit_q))) elementwise, from log-sigmoids (stable for any logits).

    = sigmoid(p) (log sigmoid(p) - log sigmoid(q)) + sigmoid(-p) (log sigmoid(-p) - log sigmoid(-q)); Float[*], nats.
    """
    log_p, log_not_p = F.logsigmoid(logit_p), F.logsigmoid(-logit_p)
    log_q, log_not_q = F.logsigmoid(logit_q), F.logsigmoid(-logit_q)
    return log_p.exp() * (log_p - log_q) + log_not_p.exp() * (log_not_p - log_not_q)


def rpo_losses(policy_margin: torch.Tensor, target_margin: torch.Tensor, loss_type: str) -> torch.Tensor:
    """Per-pair RPO losses D[a || b].

    Args:
      policy_margin: a = beta * ((pi_c - ref_c) - (pi_r - ref_r)), Float[P] (the implicit reward margin).
      target_margin: b = eta * (score_chosen - score_rejected), Float[P] (the scaled reward-model margin).
      loss_type: one of RPO_LOSS_TYPES.
    Returns Float[P], nats (squared reward units for sq).
    """
    if loss_type == "bwd_kl":
        return _bernoulli_kl(target_margin, policy_margin)
    if loss_type == "fwd_kl":
        return _bernoulli_kl(policy_margin, target_margin)
    if loss_type == "sq":
        return (policy_margin - target_margin) ** 2
    raise ValueError(f"unknown RPO loss_type {loss_type!r}; one of {', '.join(RPO_LOSS_TYPES)}")


@register_objective("rpo")
class RPOObjective(Objective):
    """Reward-aware preference optimisation (bwd_kl | fwd_kl | sq) with a live or precomputed reference.

    Metrics: the DPO family's (rewards/chosen = mean beta*(pi_c - ref_c), rewards/rejected, rewards/accuracy,
    rewards/margin, logps/chosen, logps/rejected), target_margin (mean eta*(score_chosen - score_rejected),
    what rewards/margin is pulled towards) and nll when nll_weight > 0.
    """

    batch_kind = "pairwise"
    allowed_keys = ("name", "beta", "loss_type", "eta", "nll_weight")

    @classmethod
    def needs_reference(cls, obj_cfg: Any) -> bool:
        """Always: the implicit reward is a log-ratio against the reference policy."""
        return True

    @classmethod
    def validate(cls, cfg: Any) -> None:
        """loss_type in RPO_LOSS_TYPES, beta > 0, eta > 0, nll_weight >= 0."""
        obj = cfg.objective
        if obj.loss_type not in RPO_LOSS_TYPES:
            from megatron.config.load import _suggest
            default = " ('sigmoid' is the dpo default)" if obj.loss_type == "sigmoid" else ""
            raise ConfigError(f"key 'objective.loss_type': objective 'rpo' needs one of {', '.join(RPO_LOSS_TYPES)} "
                              f"(bwd_kl is the Nemotron-4 loss), got {obj.loss_type!r}{default}"
                              f"{_suggest(str(obj.loss_type), RPO_LOSS_TYPES)}; set objective.loss_type=bwd_kl")
        super().validate(cfg)
        cls._check_beta(obj)
        if not obj.eta > 0:
            raise ConfigError(f"key 'objective.eta': must be > 0, got {obj.eta!r}")
        cls._check_nonneg(obj, "nll_weight")

    def loss(self, policy: SequenceStats, reference: Optional[SequenceStats],
             batch: Mapping[str, torch.Tensor]) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        """policy/reference: SequenceStats Float[N]; batch chosen_idx/rejected_idx Long[P] and margin Float[P]
        (score_chosen - score_rejected). Returns (0-dim loss: mean over pairs, plus nll_weight * chosen-token
        NLL; both global-batch means through `aggregation` when the loop passes GlobalCounts, metrics)."""
        cfg = self.cfg
        if batch.get("margin") is None:
            raise ValueError("objective 'rpo' needs the reward margin of every pair (micro-batch key 'margin'): "
                             "give the pairwise records score_chosen/score_rejected (tools/select_data.py writes "
                             "them) or a 'margin' field (data.margin_field)")
        pi = policy.logp_sum
        c = index(batch, "chosen_idx", pi)
        r = index(batch, "rejected_idx", pi)
        ref = self._reference(reference).logp_sum.detach().to(pi)
        chosen_ratio = pi[c] - ref[c]
        rejected_ratio = pi[r] - ref[r]
        policy_margin = cfg.beta * (chosen_ratio - rejected_ratio)
        target_margin = cfg.eta * batch["margin"].to(device=pi.device, dtype=pi.dtype)
        loss = example_mean(rpo_losses(policy_margin, target_margin, cfg.loss_type), batch)
        metrics = {}
        if cfg.nll_weight:
            nll = chosen_nll(policy, c, batch)
            loss = loss + cfg.nll_weight * nll
            metrics["nll"] = nll
        metrics.update(preference_metrics(cfg.beta * chosen_ratio, cfg.beta * rejected_ratio, policy, c, r, batch))
        metrics["target_margin"] = example_mean(target_margin.detach(), batch)
        return loss, detached(metrics)
