"""REINFORCE++: REINFORCE with PPO's tricks and global advantage normalisation, no critic.

Hu 2025, "REINFORCE++: A Simple and Efficient Approach for Aligning Large Language Models" (arXiv:2501.03262).
Per token t of a completion with reward R, with the KL in the reward (the default):

    r_t = -kl_coef * kl_t + [t is the last token] R,    G_t = sum_{s >= t} discount^(s-t) r_s
    A_t = (G_t - mean) / std        mean and std over every scored token of the global batch

`objective.group_baseline: true` is REINFORCE++-baseline (the paper's later version): R is replaced by R minus
the mean reward of its prompt's completions before the returns; the KL is then usually moved into the loss
(`objective.kl_in_reward: false`, kl_estimator k2 or k3). The loss is the clipped policy gradient of `pg_loss`.
"""
from __future__ import annotations

from typing import Any

from megatron.config import ConfigError

from .registry import register_objective
from .rl_base import CLIP_KEYS, COMMON_KEYS, RLObjective


@register_objective("reinforce_pp")
class ReinforcePPObjective(RLObjective):
    """REINFORCE++ (and -baseline). Metrics: those of `pg_loss.policy_gradient_loss`."""

    estimator = "reinforce_pp"
    kl_in_reward_default = True
    allowed_keys = COMMON_KEYS + CLIP_KEYS + ("group_baseline", "discount")

    @classmethod
    def group_size_needed(cls, obj_cfg: Any) -> int:
        """2 with the group baseline, else 1 (the global whitening is the only baseline)."""
        return 2 if obj_cfg.group_baseline else 1

    @classmethod
    def validate(cls, cfg: Any) -> None:
        """The RL checks plus discount in [0, 1]."""
        super().validate(cfg)
        d = cfg.objective.discount
        if not 0.0 <= d <= 1.0:
            raise ConfigError(f"key 'objective.discount': must be in [0, 1], got {d!r}")
