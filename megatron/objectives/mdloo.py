"""MDLOO: mirror-descent policy optimisation with leave-one-out advantages (Apple's online RLHF algorithm).

Apple Intelligence Foundation Language Models, Gunter et al. 2024 (arXiv:2407.21075), section 5.2.2. Per prompt,
k completions; the reward is KL-regularised with the reference, and the advantage is leave-one-out:

    R_i = r_i - kl_coef * sum_t log(pi_old(y_t) / pi_ref(y_t))        (kl per token: `kl_estimator`, k1 by default
                                                                       in the report's sense; any k* is accepted)
    A_i = R_i - 1/(k-1) sum_{j != i} R_j

Instead of clipping the ratio, the update is regularised by the KL to the rollout policy, as Mirror Descent Policy
Optimization does (Tomar et al. 2020, arXiv:2005.09814):

    loss_t = -rho_t A_i + rollout_kl_coef * (rho_t log rho_t - rho_t + 1),   rho_t = pi(y_t) / pi_old(y_t)

(the second term estimates KL(pi || pi_old) from the rollout samples; see `pg_loss`). rollout_kl_coef defaults to
0.1 (our choice; the report gives no value).
"""
from __future__ import annotations

from typing import Any

from megatron.config import ConfigError

from .registry import register_objective
from .rl_base import COMMON_KEYS, RLObjective


@register_objective("mdloo")
class MDLOOObjective(RLObjective):
    """Leave-one-out advantages of the KL-regularised reward, unclipped ratio with a KL to the rollout policy.
    Metrics: those of `pg_loss.policy_gradient_loss` (with rollout_kl)."""

    estimator = "mdloo"
    clipped = False
    kl_in_reward_default = True
    allowed_keys = COMMON_KEYS + ("rollout_kl_coef",)

    @classmethod
    def validate(cls, cfg: Any) -> None:
        """The RL checks; the KL to the reference is part of MDLOO's reward (kl_in_reward cannot be false);
        rollout_kl_coef >= 0."""
        super().validate(cfg)
        obj = cfg.objective
        if obj.kl_in_reward is False:
            raise ConfigError("key 'objective.kl_in_reward': MDLOO's advantage is that of the KL-regularised "
                              "reward, so the KL is always in the reward; remove the key")
        if obj.rollout_kl_coef is not None and not obj.rollout_kl_coef >= 0:
            raise ConfigError(f"key 'objective.rollout_kl_coef': must be >= 0, got {obj.rollout_kl_coef!r}")
