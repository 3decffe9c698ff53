"""KTO: Kahneman-Tversky optimisation on unpaired desirable / undesirable examples.

Ethayarajh et al. 2024 ("KTO: Model Alignment as Prospect Theoretic Optimization"), as TRL's KTOTrainer
defines it. Each example e has a target sequence t_e, a mismatched-completion sequence k_e (for the KL
estimate, supplied by the data layer) and a label (1 desirable, 0 undesirable):

    r_e = pi(t_e) - ref(t_e)                                        (summed log-probs, nats)
    z0  = max(0, mean over ALL KL sequences of the global micro-batch of pi(k) - ref(k))   (detached)
    loss_e = desirable_weight   * (1 - sigmoid(beta (r_e - z0)))   if desirable
             undesirable_weight * (1 - sigmoid(beta (z0 - r_e)))   otherwise
    loss = sum_e loss_e / E   (E = examples in this micro-batch)

z0's sum and count are all-reduced over the data-parallel group, so z0 does not depend on how the
global micro-batch was split across ranks; with equal micro-batch sizes the mean of the per-rank losses is
the global mean.
"""
from __future__ import annotations

from typing import Any, Dict, Mapping, Optional, Tuple

import torch
import torch.distributed as dist

from megatron.config import ConfigError

from .aggregation import example_mean
from .base import Objective, detached, index, safe_mean
from .registry import register_objective
from .stats import SequenceStats

# the KTO paper's recommended range for desirable_weight*n_d / (undesirable_weight*n_u)
KTO_RATIO_LOW = 1.0
KTO_RATIO_HIGH = 4.0 / 3.0


def kto_class_weight_warning(num_desirable: int, num_undesirable: int, desirable_weight: float,
                             undesirable_weight: float) -> Optional[str]:
    """Warn when the class weighting is outside the KTO paper's recommendation (Ethayarajh et al. 2024, eq. 9).

    The paper recommends (desirable_weight * n_d) / (undesirable_weight * n_u) in [1, 4/3].
    Args: example counts n_d, n_u (ints) and the two weights (floats > 0).
    Returns None when inside the range, else a text saying which value to set.
    """
    if num_desirable <= 0 or num_undesirable <= 0:
        missing = "desirable" if num_desirable <= 0 else "undesirable"
        return (f"KTO: the training data has no {missing} examples ({num_desirable} desirable, "
                f"{num_undesirable} undesirable); KTO needs both kinds")
    ratio = desirable_weight * num_desirable / (undesirable_weight * num_undesirable)
    if KTO_RATIO_LOW <= ratio <= KTO_RATIO_HIGH:
        return None
    # keep one weight and move the other into the range; the target is the middle of [1, 4/3]
    target = (KTO_RATIO_LOW + KTO_RATIO_HIGH) / 2.0
    dw_lo = KTO_RATIO_LOW * undesirable_weight * num_undesirable / num_desirable
    dw_hi = KTO_RATIO_HIGH * undesirable_weight * num_undesirable / num_desirable
    uw_lo = desirable_weight * num_desirable / (KTO_RATIO_HIGH * num_undesirable)
    uw_hi = desirable_weight * num_desirable / (KTO_RATIO_LOW * num_undesirable)
    if ratio < KTO_RATIO_LOW:
        advice = (f"set objective.desirable_weight={target * undesirable_weight * num_undesirable / num_desirable:.4g} "
                  f"(anything in [{dw_lo:.4g}, {dw_hi:.4g}]) or lower objective.undesirable_weight to "
                  f"{desirable_weight * num_desirable / (target * num_undesirable):.4g} (in [{uw_lo:.4g}, {uw_hi:.4g}])")
    else:
        advice = (f"set objective.undesirable_weight={desirable_weight * num_desirable / (target * num_undesirable):.4g} "
                  f"(anything in [{uw_lo:.4g}, {uw_hi:.4g}]) or lower objective.desirable_weight to "
                  f"{target * undesirable_weight * num_undesirable / num_desirable:.4g} (in [{dw_lo:.4g}, {dw_hi:.4g}])")
    return (f"KTO: desirable_weight*n_desirable / (undesirable_weight*n_undesirable) = {desirable_weight:g}*"
            f"{num_desirable} / ({undesirable_weight:g}*{num_undesirable}) = {ratio:.4g} is outside the range "
            f"[1, 4/3] that the KTO paper recommends; {advice}")


@register_objective("kto")
class KTOObjective(Objective):
    """KTO with a data-parallel KL baseline z0.

    Metrics: kl (z0), rewards/chosen and rewards/rejected (mean beta*r over desirable /
    undesirable examples, 0 when there are none; TRL's convention), rewards/margin (their difference),
    rewards/accuracy (fraction of examples whose implicit reward r = pi - ref has the label's sign: > 0 when
    desirable, < 0 when undesirable; r == 0, e.g. the untrained policy that is its own reference, counts 1/2),
    logps/chosen, logps/rejected (mean policy logp_sum of desirable / undesirable targets),
    count/chosen, count/rejected (examples of each kind in the micro-batch).
    """

    batch_kind = "unpaired"
    allowed_keys = ("name", "beta", "desirable_weight", "undesirable_weight")

    @classmethod
    def needs_reference(cls, obj_cfg: Any) -> bool:
        """Always True: r and z0 are log-ratios against the reference."""
        return True

    @classmethod
    def validate(cls, cfg: Any) -> None:
        """beta > 0, desirable_weight > 0, undesirable_weight > 0."""
        super().validate(cfg)
        obj = cfg.objective
        cls._check_beta(obj)
        for key in ("desirable_weight", "undesirable_weight"):
            if not getattr(obj, key) > 0:
                raise ConfigError(f"key 'objective.{key}': must be > 0, got {getattr(obj, key)!r}")

    def kl_baseline(self, kl_terms: torch.Tensor) -> torch.Tensor:
        """z0 from the local KL log-ratios Float[K] (detached): global mean over the data-parallel group,
        clamped at 0 -> 0-dim tensor (nats). Every data-parallel rank must call it (collective).
        """
        kl_terms = kl_terms.detach()
        total = torch.stack([kl_terms.sum(), torch.tensor(float(kl_terms.numel()), dtype=kl_terms.dtype,
                                                           device=kl_terms.device)])
        ps = self.ps
        if ps is not None and getattr(ps, "dp_size", 1) > 1:
            dist.all_reduce(total, op=dist.ReduceOp.SUM, group=ps.dp_group)
        return (total[0] / total[1].clamp(min=1.0)).clamp(min=0.0)

    def loss(self, policy: SequenceStats, reference: Optional[SequenceStats],
             batch: Mapping[str, torch.Tensor]) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        """policy/reference SequenceStats Float[N]; batch target_idx, kl_idx Long[E], kto_label Float[E].

        Returns (0-dim loss = sum of per-example losses / E, metrics).
        """
        cfg = self.cfg
        reference = self._reference(reference)
        pi = policy.logp_sum
        ref = reference.logp_sum.detach().to(pi)
        t = index(batch, "target_idx", pi)
        k = index(batch, "kl_idx", pi)
        desirable = batch["kto_label"].to(pi.device) > 0.5
        r = pi[t] - ref[t]
        z0 = self.kl_baseline(pi[k] - ref[k])
        chosen_losses = cfg.desirable_weight * (1.0 - torch.sigmoid(cfg.beta * (r - z0)))
        rejected_losses = cfg.undesirable_weight * (1.0 - torch.sigmoid(cfg.beta * (z0 - r)))
        per_example = torch.where(desirable, chosen_losses, rejected_losses)
        loss = safe_mean(per_example)
        rewards = cfg.beta * r.detach()
        logps = pi[t].detach()
        chosen_reward = safe_mean(rewards[desirable])
        rejected_reward = safe_mean(rewards[~desirable])
        agrees = torch.where(desirable, torch.sign(r.detach()), -torch.sign(r.detach()))  # +1 / 0 / -1
        return loss, detached({
            "kl": z0,
            "rewards/chosen": chosen_reward,
            "rewards/rejected": rejected_reward,
            "rewards/margin": chosen_reward - rejected_reward,
            "rewards/accuracy": example_mean((agrees + 1.0) / 2.0, batch),
            "logps/chosen": safe_mean(logps[desirable]),
            "logps/rejected": safe_mean(logps[~desirable]),
            "count/chosen": desirable.sum().to(pi.dtype),
            "count/rejected": (~desirable).sum().to(pi.dtype),
        })
