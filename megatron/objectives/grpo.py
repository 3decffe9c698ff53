"""GRPO: group-relative policy optimisation, and the variants that are flags of it.

Shao et al. 2024, "DeepSeekMath: Pushing the Limits of Mathematical Reasoning in Open Language Models"
(arXiv:2402.03300): G completions per prompt, advantage (r - mean_group r) / std_group r on every token, the PPO
clipped ratio, and the KL to the reference in the LOSS with the k3 estimator. Flags (`objective.*`):
  scale_rewards   group (GRPO) | batch (std of the whole global batch) | none (Dr. GRPO: no division)
  loss_agg        seq_mean_token_mean (GRPO) | token_mean (DAPO) | seq_mean_token_sum_norm (Dr. GRPO)
  clip_high       > clip_low: DAPO's clip-higher, Yu et al. 2025 (arXiv:2503.14476)
  importance_level sequence: GSPO, Zheng et al. 2025 (arXiv:2507.18071), with loss_agg seq_mean_token_mean
  kl_coef, kl_estimator k1 | k2 | k3; kl_in_reward (default false)
DAPO's dynamic sampling and overlong penalty are rollout options (`rollout.dynamic_sampling`, `overlong_buffer`),
applied by the online loop with `advantages.varying_groups` and `megatron.rewards.overlong_penalty`.
Dr. GRPO: Liu et al. 2025, "Understanding R1-Zero-Like Training: A Critical Perspective" (arXiv:2503.20783).
"""
from __future__ import annotations

from .registry import register_objective
from .rl_base import CLIP_KEYS, COMMON_KEYS, RLObjective


@register_objective("grpo")
class GRPOObjective(RLObjective):
    """GRPO / DAPO / Dr. GRPO / GSPO (flags above). Metrics: those of `pg_loss.policy_gradient_loss`."""

    estimator = "grpo"
    kl_in_reward_default = False
    allowed_keys = COMMON_KEYS + CLIP_KEYS + ("scale_rewards",)
