"""Last-stage loss functions for DeepSpeed's pipeline engine (`PipelineModule.loss_fn(outputs, labels)`).

DeepSpeed only returns the loss, so the objective's metrics are collected on the loss object itself; a new
object is installed for every optimizer step (no state survives a step). A live reference runs as a second
pipeline engine over the same micro-batches just before the policy: its `ReferenceCollector` queues the
per-sequence reference statistics in micro-batch order, and the policy's `PolicyLoss` takes them in the same
order (DeepSpeed runs the last stage's forward passes in micro-batch order in both schedules).
"""
from __future__ import annotations

from collections import deque
from typing import Deque, Dict, List, Optional, Tuple

import torch

from megatron.mpu import vocab_parallel_logprobs
from megatron.objectives import SequenceStats, precomputed_reference, sequence_stats
from megatron.objectives.aggregation import GLOBAL_COUNTS, GlobalCounts

from .forward import LOGPROB_CHUNK_TOKENS
from .pipeline_batch import from_pipe_labels


def output_stats(out: torch.Tensor, batch: Dict[str, torch.Tensor], ps, value_head: bool,
                 vocab_size: Optional[int] = None) -> SequenceStats:
    """Head output -> per-sequence statistics, exactly as `forward.forward_stats` does after the model.

    out: logits shard [B, S, Vp/tp] (or values [B, S] fp32 with a value head); vocab_size: cfg.model.vocab_size
    (ids >= it are padding rows of the head and get probability 0; None = no padding).
    Returns SequenceStats(logp_sum[N], token_count[N], scores[N] | None).
    """
    if value_head:
        zeros = torch.zeros(batch["labels"].shape, dtype=torch.float32, device=out.device)
        return sequence_stats(zeros, batch, scores_per_token=out.float())
    token_logps = vocab_parallel_logprobs(out, batch["labels"], ps, chunk_size=LOGPROB_CHUNK_TOKENS,
                                          vocab_size=vocab_size)
    return sequence_stats(token_logps, batch)


class ReferenceCollector:
    """loss_fn of the frozen reference engine: queue each micro-batch's reference SequenceStats."""

    def __init__(self, queue: Deque[SequenceStats], ps, value_head: bool, vocab_size: Optional[int] = None):
        self.queue = queue
        self.ps = ps
        self.value_head = value_head
        self.vocab_size = vocab_size

    def __call__(self, outputs: torch.Tensor, labels: Tuple[torch.Tensor, ...]) -> torch.Tensor:
        """Queue the stats; return a 0-dim dummy (DeepSpeed's eval collects a loss per micro-batch)."""
        batch = from_pipe_labels(labels)
        with torch.no_grad():
            stats = output_stats(outputs, batch, self.ps, self.value_head, self.vocab_size)
        self.queue.append(SequenceStats(stats.logp_sum.detach(), stats.token_count.detach(),
                                        None if stats.scores is None else stats.scores.detach()))
        return torch.zeros((), device=outputs.device)


class PolicyLoss:
    """loss_fn of the policy engine: model output -> SequenceStats -> objective.loss, metrics kept as floats.

    reference_mode: 'live' (stats from `reference_queue`), 'precomputed' (`ref_logps` in the labels) or 'none'.
    counts: the step's GlobalCounts, put into every micro-batch as `batch[GLOBAL_COUNTS]` (global-batch
    normalisation, objectives/aggregation.py); None: each micro-batch is normalised on its own.
    """

    def __init__(self, objective, ps, value_head: bool, reference_mode: str,
                 reference_queue: Optional[Deque[SequenceStats]] = None, counts: Optional[GlobalCounts] = None,
                 vocab_size: Optional[int] = None):
        self.counts = counts
        self.vocab_size = vocab_size
        self.objective = objective
        self.ps = ps
        self.value_head = value_head
        self.reference_mode = reference_mode
        self.reference_queue = reference_queue if reference_queue is not None else deque()
        self.rows: List[Dict[str, float]] = []

    def _reference(self, batch: Dict[str, torch.Tensor]) -> Optional[SequenceStats]:
        if self.reference_mode == "precomputed" and "ref_logps" in batch:
            return precomputed_reference(batch)
        if self.reference_mode == "live":
            if not self.reference_queue:
                raise RuntimeError("pipeline: the policy's last stage has no reference statistics for this "
                                   "micro-batch (the reference engine must run the same micro-batches first)")
            return self.reference_queue.popleft()
        return None

    def __call__(self, outputs: torch.Tensor, labels: Tuple[torch.Tensor, ...]) -> torch.Tensor:
        """0-dim loss of one micro-batch (with grad in training)."""
        batch = from_pipe_labels(labels)
        if self.counts is not None:
            batch[GLOBAL_COUNTS] = self.counts
        policy = output_stats(outputs, batch, self.ps, self.value_head, self.vocab_size)
        loss, metrics = self.objective.loss(policy, self._reference(batch), batch)
        row = {"loss": float(loss.detach())}
        row.update({k: float(v) for k, v in metrics.items()})
        self.rows.append(row)
        return loss

    def mean_metrics(self) -> Dict[str, float]:
        """Mean of every recorded value over this step's micro-batches ({} off the last stage)."""
        sums: Dict[str, float] = {}
        for row in self.rows:
            for k, v in row.items():
                sums[k] = sums.get(k, 0.0) + v
        n = max(1, len(self.rows))
        return {k: v / n for k, v in sums.items()}
