"""PPO with a critic: GAE advantages, the clipped policy surrogate, and a clipped value loss for the critic.

Schulman et al. 2017, "Proximal Policy Optimization Algorithms" (arXiv:1707.06347); advantages by generalised
advantage estimation, Schulman et al. 2016 (arXiv:1506.02438); the RLHF setting (per-token KL to the reference in
the reward, the reward at the last token, whitened advantages) as in Ouyang et al. 2022 and TRL's PPOTrainer.

    policy:  the clipped surrogate of `pg_loss` on A_t = whiten(GAE(discount, lam))
    critic:  value_loss = vf_coef * agg( 1/2 max((V - G)^2, (V_old + clip(V - V_old, -value_clip, value_clip) - G)^2) )

with G the GAE returns (A + V_old, before whitening) and V_old the critic's values at rollout time. The critic is a
separate value-head model with its own DeepSpeed engine (`uses_critic`); the loop calls `loss` for the policy and
`value_loss` for the critic on the same micro-batches.
"""
from __future__ import annotations

from typing import Any, Dict, Mapping, Tuple, Union

import torch

from megatron.config import ConfigError

from .aggregation import agg_token_loss, global_mean
from .pg_loss import _masked, _token_field
from .registry import register_objective
from .rl_base import CLIP_KEYS, COMMON_KEYS, RLObjective
from .token_stats import TokenStats, scored_mask


@register_objective("ppo")
class PPOObjective(RLObjective):
    """PPO with a critic. Policy metrics: those of `pg_loss.policy_gradient_loss`; critic metrics: value_loss
    (before vf_coef), value_clip_fraction, values/mean, returns/mean."""

    estimator = "gae"
    kl_in_reward_default = True
    min_group = 1
    uses_critic = True
    allowed_keys = COMMON_KEYS + CLIP_KEYS + ("discount", "lam", "vf_coef", "value_clip")

    @classmethod
    def validate(cls, cfg: Any) -> None:
        """The RL checks plus discount and lam in [0, 1], vf_coef > 0, value_clip > 0 or null."""
        super().validate(cfg)
        obj = cfg.objective
        for key in ("discount", "lam"):
            if not 0.0 <= getattr(obj, key) <= 1.0:
                raise ConfigError(f"key 'objective.{key}': must be in [0, 1], got {getattr(obj, key)!r}")
        if not obj.vf_coef > 0:
            raise ConfigError(f"key 'objective.vf_coef': must be > 0, got {obj.vf_coef!r}")
        if obj.value_clip is not None and not obj.value_clip > 0:
            raise ConfigError(f"key 'objective.value_clip': must be > 0 (or null: no clipping), got {obj.value_clip!r}")

    def value_loss(self, values: Union[torch.Tensor, TokenStats],
                   batch: Mapping[str, torch.Tensor]) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        """Clipped value loss of one rollout micro-batch for the critic.

        Args: values Float[B,S] (the critic's forward now; or TokenStats with `.values`); batch with `values`
        Float[B,S] (the critic at rollout time), `returns` Float[B,S] (GAE returns) and the loss_mask/seq_id layout.
        Returns (vf_coef * aggregated loss, 0-dim share of the global-batch value; metrics).
        """
        if isinstance(values, TokenStats):
            if values.values is None:
                raise ValueError("value_loss: the critic's TokenStats has no values")
            values = values.values
        dtype = torch.promote_types(values.dtype, torch.float32)
        v = values.to(dtype)
        mask = scored_mask(batch, v)
        v = _masked(v, mask)
        old = _masked(_token_field(batch, "values", v), mask)
        ret = _masked(_token_field(batch, "returns", v), mask)
        err = (v - ret) ** 2
        clip = self.cfg.value_clip
        if clip is not None:
            v_clipped = old + (v - old).clamp(-clip, clip)
            err_clipped = (v_clipped - ret) ** 2
            per_token = 0.5 * torch.maximum(err, err_clipped)
            clipped = (err_clipped > err).to(dtype)
        else:
            per_token = 0.5 * err
            clipped = torch.zeros_like(err)
        mode = self.cfg.loss_agg.replace("_", "-")
        loss = agg_token_loss(per_token, batch, mode, self.cfg.loss_norm_len)
        n_tokens = mask.sum()
        tmean = lambda x: global_mean((x.detach() * mask).sum(), n_tokens, "tokens", batch)  # noqa: E731
        metrics = {"value_loss": loss.detach(), "value_clip_fraction": tmean(clipped), "values/mean": tmean(v),
                   "returns/mean": tmean(ret)}
        return self.cfg.vf_coef * loss, {k: t.detach().reshape(()) for k, t in metrics.items()}
