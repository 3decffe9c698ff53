"""The `Objective` base class and small numerical helpers shared by the losses.

An objective turns per-sequence statistics (`SequenceStats`) of the policy (and of the reference, when it
needs one) plus the micro-batch index tensors into `(loss, metrics)`: `loss` is a 0-dim tensor to
back-propagate, `metrics` maps names to detached 0-dim tensors. Losses and metrics are micro-batch SHARES of
global-batch means (`aggregation.global_mean`): the loop averages them over micro-batches and data-parallel
ranks, which gives the full-batch value at any split; nonlinear metrics come from `summarize_metrics`. The
training loop only uses the class attributes and methods below and never branches on the objective's name.

Conventions shared by all objectives: log-probs are in nats; `logps/chosen` and `logps/rejected` are the
means of the policy's summed log-probs. Metrics never include `loss`: the loop records the returned loss
itself (a `loss` metric would be counted twice).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Dict, Mapping, Optional, Tuple

import torch
import torch.nn.functional as F

from megatron.config import ConfigError
from megatron.config.schema import ObjectiveConfig

from .aggregation import example_mean, global_mean, local_counts
from .stats import SequenceStats

# data.kind value that each batch kind needs
_DATA_KIND = {"single": "sft", "pairwise": "pairwise", "unpaired": "unpaired"}


class Objective:
    """Base class of all objectives.

    Class attributes:
      name: registry name (set by `register_objective`).
      batch_kind: 'single' (one sequence per example), 'pairwise' (chosen_idx/rejected_idx) or
        'unpaired' (target_idx/kl_idx/kto_label).
      uses_value_head: the model ends in a scalar value head and `SequenceStats.scores` is used.
      allowed_keys: the `objective.*` keys this objective reads; `validate` rejects any other key that
        differs from its default.
    """

    name: str = ""
    batch_kind: str = "single"
    uses_value_head: bool = False
    allowed_keys: Tuple[str, ...] = ("name",)

    def __init__(self, obj_cfg: ObjectiveConfig, ps: Any = None):
        """Keep the objective's config section and the parallel state (may be None: one process)."""
        self.cfg = obj_cfg
        self.ps = ps

    # ----------------------------------------------------------------- configuration
    @classmethod
    def needs_reference(cls, obj_cfg: ObjectiveConfig) -> bool:
        """Whether `loss` needs reference statistics for this objective config."""
        return False

    @classmethod
    def validate(cls, cfg: Any) -> None:
        """Check the full Config for this objective; raise ConfigError naming the key to change.

        Checks: no unused `objective.*` key is set, `data.kind` matches `batch_kind`, a reference-free
        objective is not given a reference (it would be unused), `model.value_head` matches
        `uses_value_head`. Subclasses extend this with their own option checks.
        """
        obj = cfg.objective
        defaults = ObjectiveConfig()
        for f in dataclasses.fields(obj):
            if f.name in cls.allowed_keys:
                continue
            if getattr(obj, f.name) != getattr(defaults, f.name):
                raise ConfigError(
                    f"key 'objective.{f.name}': objective '{cls.name}' does not use it (got "
                    f"{getattr(obj, f.name)!r}); remove it. Keys of '{cls.name}': {', '.join(cls.allowed_keys)}")
        want = _DATA_KIND[cls.batch_kind]
        if cfg.data.kind not in ("auto", want):
            raise ConfigError(f"key 'data.kind': objective '{cls.name}' needs {want} data, got "
                              f"data.kind={cfg.data.kind!r}; set data.kind={want} or auto")
        if not cls.needs_reference(obj) and cfg.reference.mode in ("live", "precomputed"):
            raise ConfigError(
                f"key 'reference.mode': objective '{cls.name}' is reference-free, so reference.mode="
                f"{cfg.reference.mode} would give a reference that is never used; set reference.mode=auto or none")
        if cfg.model.value_head and not cls.uses_value_head:
            raise ConfigError(f"key 'model.value_head': objective '{cls.name}' trains the language-model head, "
                              "not a value head; set model.value_head=false")

    @staticmethod
    def _check_beta(obj: ObjectiveConfig) -> None:
        if not obj.beta > 0:
            raise ConfigError(f"key 'objective.beta': must be > 0, got {obj.beta!r}")

    @staticmethod
    def _check_label_smoothing(obj: ObjectiveConfig) -> None:
        if not 0.0 <= obj.label_smoothing < 0.5:
            raise ConfigError(f"key 'objective.label_smoothing': must be in [0, 0.5), got {obj.label_smoothing!r}")

    @staticmethod
    def _check_nonneg(obj: ObjectiveConfig, key: str) -> None:
        value = getattr(obj, key)
        if not value >= 0:
            raise ConfigError(f"key 'objective.{key}': must be >= 0, got {value!r}")

    # ----------------------------------------------------------------- the loss
    def count_units(self, batch: Mapping[str, torch.Tensor]) -> Dict[str, float]:
        """The units of one micro-batch that global normalisation needs (`aggregation.local_counts`: tokens,
        sequences, examples, chosen_tokens). The loop sums them over the step's micro-batches and data-parallel
        ranks and passes the totals to `loss` as `batch[aggregation.GLOBAL_COUNTS]`. Extend to add units."""
        return local_counts(batch)

    def summarize_metrics(self, metrics: Dict[str, float]) -> Dict[str, float]:
        """Metrics derived from the step's global means (after averaging over micro-batches and ranks), e.g.
        a perplexity from the mean NLL. The default adds nothing."""
        return metrics

    def loss(self, policy: SequenceStats, reference: Optional[SequenceStats],
             batch: Mapping[str, torch.Tensor]) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        """Return (loss 0-dim tensor with grad, metrics dict of detached 0-dim tensors)."""
        raise NotImplementedError

    def _reference(self, reference: Optional[SequenceStats]) -> SequenceStats:
        if reference is None:
            raise ValueError(f"objective '{self.name}' needs reference statistics but got None "
                             "(reference.mode must be live or precomputed)")
        return reference


# --------------------------------------------------------------------- helpers
def index(batch: Mapping[str, torch.Tensor], key: str, like: torch.Tensor) -> torch.Tensor:
    """`batch[key]` as a Long tensor on the device of `like` (for gathering from Float[N])."""
    if key not in batch:
        raise KeyError(f"micro-batch has no '{key}'")
    return batch[key].to(device=like.device, dtype=torch.long)


def safe_mean(x: torch.Tensor) -> torch.Tensor:
    """Mean of a 1-D tensor; 0 (same dtype/device) for an empty one."""
    return x.sum() / max(x.numel(), 1)


def smoothed_sigmoid_loss(logits: torch.Tensor, label_smoothing: float) -> torch.Tensor:
    """Per-element `-(1-eps) log sigmoid(x) - eps log sigmoid(-x)` (conservative DPO, Mitchell 2023).

    Args: logits Float[P] (the argument x, already scaled by beta); label_smoothing eps in [0, 0.5).
    Returns Float[P], nats.
    """
    loss = -F.logsigmoid(logits)
    if label_smoothing:
        loss = (1.0 - label_smoothing) * loss - label_smoothing * F.logsigmoid(-logits)
    return loss


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """`log(1 - exp(x))` for x < 0, computed stably (Maechler 2012): log(-expm1(x)) near 0,
    log1p(-exp(x)) further out. x is clamped to <= -machine-eps so x = 0 stays finite. Float[*] -> Float[*].
    """
    x = x.clamp(max=-torch.finfo(x.dtype).eps)
    return torch.where(x > -math.log(2.0), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def chosen_nll(policy: SequenceStats, chosen: torch.Tensor,
               batch: Optional[Mapping[str, Any]] = None) -> torch.Tensor:
    """Per-token mean negative log-likelihood over all scored tokens of the chosen sequences (RPO's NLL term).

    `-sum(logp_sum[chosen]) / (chosen tokens)` -> 0-dim, nats per token; the denominator is the chosen tokens
    of the whole global batch when `batch` carries the loop's GlobalCounts (`aggregation.global_mean`, unit
    'chosen_tokens'), else this micro-batch's.
    """
    return global_mean(-policy.logp_sum[chosen].sum(), policy.token_count[chosen].sum(), "chosen_tokens",
                       batch if batch is not None else {})


def detached(metrics: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Detach every metric and make it a 0-dim tensor."""
    return {k: v.detach().reshape(()) for k, v in metrics.items()}


def preference_metrics(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor,
                       policy: SequenceStats, chosen: torch.Tensor, rejected: torch.Tensor,
                       batch: Optional[Mapping[str, Any]] = None) -> Dict[str, torch.Tensor]:
    """The shared pairwise metrics (TRL names, singular forms), means over pairs (global-batch means through
    `aggregation.example_mean` when `batch` carries the loop's GlobalCounts).

    rewards/chosen, rewards/rejected: means of the implicit rewards Float[P];
    rewards/accuracy: fraction of pairs with chosen reward > rejected reward;
    rewards/margin: mean(chosen - rejected); logps/chosen, logps/rejected: mean policy logp_sum (nats).
    """
    cr, rr = chosen_rewards.detach(), rejected_rewards.detach()
    mean = lambda x: example_mean(x, batch if batch is not None else {})  # noqa: E731
    return {
        "rewards/chosen": mean(cr),
        "rewards/rejected": mean(rr),
        "rewards/accuracy": mean((cr > rr).to(cr.dtype)),
        "rewards/margin": mean(cr - rr),
        "logps/chosen": mean(policy.logp_sum[chosen].detach()),
        "logps/rejected": mean(policy.logp_sum[rejected].detach()),
    }
