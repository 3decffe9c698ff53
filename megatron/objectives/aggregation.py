"""Global-batch normalisation: one mechanism that makes every loss independent of how a step is split.

A step's global batch is cut into micro-batches: `grad_accum` per data-parallel rank, `dp` ranks. DeepSpeed
turns their losses into one gradient by AVERAGING: `engine.backward` divides each loss by
gradient_accumulation_steps (the pipeline engine's last stage too), and the data-parallel all-reduce (every
ZeRO stage) averages over the ranks. The gradient is therefore the mean of `contributors = grad_accum * dp`
micro-batch losses. The full-batch loss we want is

    L = (sum of per-unit losses over the global batch) / (number of units in the global batch)

(unit: scored token for token-level losses, sequence or example for sequence-level ones). So each
micro-batch returns

    loss_mb = (sum of its per-unit losses) / global_units * contributors

and the mean of those over micro-batches and ranks - both the gradient and the logged value - is L,
whatever the split (a per-micro-batch mean of means differs from L as soon as micro-batches hold unequal
token counts). The loop measures the global counts before the step (`global_counts`: per micro-batch
`objective.count_units(batch)`, summed over the step's micro-batches and all-reduced over the data-parallel
group) and hands them to `objective.loss` in `batch[GLOBAL_COUNTS]`. Without them (a loss called on one batch
on its own) the local counts are used with contributors = 1: the plain mean over that batch.

Every normalised loss or metric goes through `global_mean`; `agg_token_loss` is its per-token front end
(the modes of verl's `agg_loss`) for token-level losses given as [B,S] tensors.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Mapping, Optional, Union

import torch
import torch.distributed as dist

from .stats import _scatter_tokens, num_sequences, token_counts

# batch key under which the loop passes the step's GlobalCounts to objective.loss
GLOBAL_COUNTS = "global_counts"

AGG_MODES = ("token-mean", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm")


@dataclass(frozen=True)
class GlobalCounts:
    """Units of one step's whole global batch and how many micro-batch losses DeepSpeed averages.

    units: unit name -> count over every micro-batch of the step on every data-parallel rank. The standard
      units (`local_counts`): 'tokens' (scored tokens, sum of loss_mask), 'sequences', 'examples' (an SFT
      sequence, a preference pair, a KTO example), 'chosen_tokens' (scored tokens of chosen sequences,
      pairwise data). Objectives may add their own through `Objective.count_units`.
    contributors: micro-batches per rank x data-parallel ranks (grad_accum * dp in training; the number of
      evaluation micro-batches x dp in evaluation).
    """

    units: Dict[str, float]
    contributors: int

    def count(self, unit: str) -> float:
        """The global count of `unit`; KeyError naming the known units when absent."""
        if unit not in self.units:
            raise KeyError(f"GlobalCounts has no unit {unit!r} (units: {', '.join(sorted(self.units))}); "
                           "add it in the objective's count_units(batch)")
        return self.units[unit]


def local_counts(batch: Mapping[str, torch.Tensor]) -> Dict[str, float]:
    """The standard units of one micro-batch (see GlobalCounts): tokens, sequences, examples, chosen_tokens.

    Uses `loss_mask` Float[B,S], `seq_id` Long[B,S], `seq_last_pos` Long[N] and, when present,
    `chosen_idx` Long[P] (pairwise: examples = pairs) or `target_idx` Long[E] (unpaired: examples = E).
    """
    mask = batch["loss_mask"]
    n = num_sequences(batch)
    out = {"tokens": float(mask.sum()), "sequences": float(n), "examples": float(n), "chosen_tokens": 0.0}
    if "chosen_idx" in batch:
        out["examples"] = float(batch["chosen_idx"].numel())
        per_seq = token_counts(batch, dtype=torch.float64)
        out["chosen_tokens"] = float(per_seq[batch["chosen_idx"].to(per_seq.device).long()].sum())
    elif "target_idx" in batch:
        out["examples"] = float(batch["target_idx"].numel())
    return out


def global_counts(per_micro_batch: List[Dict[str, float]], ps, device: Optional[torch.device] = None) -> GlobalCounts:
    """Sum the per-micro-batch unit counts of this rank's step and all-reduce them over `ps.dp_group`.

    Collective over the data-parallel group (every rank calls it once per step, with the same unit names).
    Counts travel as float64, exact for integers below 2^53. contributors = len(per_micro_batch) * dp.
    """
    names = sorted({k for counts in per_micro_batch for k in counts})
    total = torch.tensor([sum(c.get(k, 0.0) for c in per_micro_batch) for k in names], dtype=torch.float64,
                         device=device)
    dp = getattr(ps, "dp_size", 1) if ps is not None else 1
    if dp > 1:
        dist.all_reduce(total, group=ps.dp_group)
    return GlobalCounts(units=dict(zip(names, total.tolist())), contributors=len(per_micro_batch) * dp)


def global_mean(local_sum: torch.Tensor, local_count: Union[torch.Tensor, float], unit: str,
                batch: Mapping[str, object]) -> torch.Tensor:
    """THE reduction: this micro-batch's share of a global-batch mean.

    Args:
      local_sum: 0-dim, the sum of the per-unit losses (or metric values) over this micro-batch's units.
      local_count: this micro-batch's number of `unit`s (used only without global counts).
      unit: the GlobalCounts unit that is the denominator ('tokens', 'sequences', 'examples', ...).
      batch: the micro-batch; `batch[GLOBAL_COUNTS]` (a GlobalCounts) when the loop provides it.
    Returns 0-dim: local_sum / global_count * contributors (the mean over the step's micro-batches and ranks
    of these values is the global mean), or local_sum / local_count without global counts. A zero count
    gives 0 (denominator clamped at 1).
    """
    counts = batch.get(GLOBAL_COUNTS)
    if counts is None:
        if torch.is_tensor(local_count):
            return local_sum / local_count.to(local_sum.dtype).clamp(min=1.0)
        return local_sum / max(float(local_count), 1.0)
    return local_sum * (counts.contributors / max(counts.count(unit), 1.0))


def example_mean(values: torch.Tensor, batch: Mapping[str, object]) -> torch.Tensor:
    """Global mean over examples (pairs, KTO examples, SFT sequences) of per-example values Float[E] -> 0-dim."""
    return global_mean(values.sum(), values.numel(), "examples", batch)


def agg_token_loss(loss_per_token: torch.Tensor, batch: Mapping[str, object], mode: str = "token-mean",
                   norm_len: Optional[float] = None) -> torch.Tensor:
    """Aggregate a per-token loss Float[B,S] over the scored tokens (`loss_mask`) into this micro-batch's share
    of the global-batch loss (see the module docstring; modes as verl's `agg_loss`).

    mode:
      token-mean               sum over all scored tokens / global scored tokens      (unit 'tokens')
      seq-mean-token-sum       mean over sequences of each sequence's token sum       (unit 'sequences')
      seq-mean-token-mean      mean over sequences of each sequence's token mean      (unit 'sequences')
      seq-mean-token-sum-norm  mean over sequences of token sum / norm_len (Dr. GRPO; norm_len a constant,
                               e.g. the maximum response length)                       (unit 'sequences')
    Positions with loss_mask 0 or seq_id -1 never contribute (their values, even non-finite, are ignored);
    a fractional loss_mask weights its token. Returns a 0-dim tensor, differentiable in `loss_per_token`.
    """
    if mode not in AGG_MODES:
        raise ValueError(f"agg_token_loss: unknown mode {mode!r}; one of {', '.join(AGG_MODES)}")
    dtype = torch.promote_types(loss_per_token.dtype, torch.float32)
    sums, counts = _scatter_tokens(loss_per_token, batch, num_sequences(batch), dtype)
    if mode == "token-mean":
        return global_mean(sums.sum(), counts.sum(), "tokens", batch)
    if mode == "seq-mean-token-sum":
        per_seq = sums
    elif mode == "seq-mean-token-mean":
        per_seq = sums / counts.clamp(min=1.0)
    else:
        if not norm_len or norm_len <= 0:
            raise ValueError("agg_token_loss: mode seq-mean-token-sum-norm needs norm_len > 0 (a constant length)")
        per_seq = sums / float(norm_len)
    return global_mean(per_seq.sum(), per_seq.numel(), "sequences", batch)
