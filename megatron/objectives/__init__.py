"""Loss registry: sft, rm (reward model), dpo (sigmoid/ipo/robust/hinge, RPO), simpo, orpo, kto,
rpo (Nemotron-4 reward-aware preference optimisation: bwd_kl/fwd_kl/sq), and the online RL objectives grpo,
rloo, reinforce_pp, ppo, mdloo (batch_kind 'rollout': token-level, `TokenStats`, advantages.py + pg_loss.py).

Importing this package registers every objective. The training loop builds one with
`build_objective(cfg, ps)`, reduces the model's per-token outputs with `sequence_stats` (and
`precomputed_reference` for reference.mode=precomputed) and calls `objective.loss(policy, reference, batch)`.
"""
from .registry import build_objective, get_objective_class, register_objective, registered_objectives
from .stats import SequenceStats, num_sequences, precomputed_reference, sequence_stats, token_counts
from .base import Objective
from .resolve import resolve_objective
from . import sft, reward, dpo, simpo, orpo, kto, rpo  # noqa: F401  (registers the objectives)
from .sft import SFTObjective
from .reward import RewardModelObjective
from .dpo import DPO_LOSS_TYPES, DPOObjective, dpo_losses
from .simpo import SimPOObjective
from .orpo import ORPOObjective
from .kto import KTOObjective, kto_class_weight_warning
from .rpo import RPO_LOSS_TYPES, RPOObjective, rpo_losses
from . import grpo, rloo, reinforce_pp, ppo, mdloo  # noqa: F401  (registers the online RL objectives)
from .token_stats import TokenStats, token_stats
from .rl_base import RLObjective
from .advantages import AdvantageOutput, compute_advantages, get_advantage_estimator, registered_advantage_estimators

__all__ = [
    "build_objective", "get_objective_class", "register_objective", "registered_objectives",
    "SequenceStats", "num_sequences", "precomputed_reference", "sequence_stats", "token_counts",
    "Objective", "resolve_objective", "SFTObjective", "RewardModelObjective", "DPOObjective", "DPO_LOSS_TYPES", "dpo_losses",
    "SimPOObjective", "ORPOObjective", "KTOObjective", "kto_class_weight_warning",
    "RPOObjective", "RPO_LOSS_TYPES", "rpo_losses",
    "TokenStats", "token_stats", "RLObjective", "AdvantageOutput", "compute_advantages", "get_advantage_estimator",
    "registered_advantage_estimators",
]
