"""RLOO: REINFORCE with a leave-one-out baseline.

Ahmadian et al. 2024, "Back to Basics: Revisiting REINFORCE Style Optimization for Learning from Human Feedback in
LLMs" (arXiv:2402.14740), after Kool et al. 2019 ("Buy 4 REINFORCE samples, get a baseline for free"). k
completions per prompt; the advantage of completion i is its reward minus the mean reward of the other k-1:

    A_i = R_i - 1/(k-1) sum_{j != i} R_j,   R_i = r_i - kl_coef * sum_t kl_t   (the KL is in the reward)

and every token of i gets A_i. The loss is the clipped policy gradient of `pg_loss` (with one update per rollout,
rollout.epochs = minibatches = 1, the ratio is 1 and it is exactly REINFORCE's -A log pi), as TRL's RLOOTrainer.
"""
from __future__ import annotations

from .registry import register_objective
from .rl_base import CLIP_KEYS, COMMON_KEYS, RLObjective


@register_objective("rloo")
class RLOOObjective(RLObjective):
    """Leave-one-out advantages, KL in the reward by default. Metrics: those of `pg_loss.policy_gradient_loss`."""

    estimator = "rloo"
    kl_in_reward_default = True
    allowed_keys = COMMON_KEYS + CLIP_KEYS
