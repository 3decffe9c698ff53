"""Pipeline parallelism (cfg.parallel.pipeline > 1) through DeepSpeed's pipeline engine, for every objective.

The trainer calls `build_pipeline_engines` instead of building a GPTModel engine, and `pipeline_step` instead
of its per-micro-batch loop; everything else (logging, evaluation, checkpoints, resume) is shared.

One optimizer step, with grad_accum micro-batches per data-parallel rank:

    micro = [(inputs, labels)]            pipeline_batch: contract dict -> DeepSpeed's micro-batch tuple
    reference engine .eval_batch(micro)   live reference only: same stage layout, no optimizer; its last stage
                                          queues per-sequence reference stats (pipeline_loss.ReferenceCollector)
    policy engine .train_batch(micro)     1F1B schedule; the last stage's loss_fn (pipeline_loss.PolicyLoss)
                                          runs logprobs -> sequence_stats -> objective.loss, with the queued
                                          (live), label-carried (precomputed) or no reference
    metrics                               recorded on the last stage, broadcast over the pipeline group

Every rank draws the same micro-batches from its data iterator (DeepSpeed reads them on the first and last
stage only), so the data position stays identical on every stage. An example (a pair, a KTO target with its
KL sequence) never spans micro-batches, so the pairwise losses see whole pairs on the last stage. Packed
micro-batches vary in rows and width: the PipelineModule is built with `dynamic_shape=True` (shapes are sent
before every activation) and DeepSpeed's activation partitioning over the tensor group is off (it caches
shapes, and under sequence parallelism each tensor rank holds a different sequence shard).
"""
from __future__ import annotations

from collections import deque
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.distributed as dist

from megatron.config import Config

from .deepspeed_config import build_deepspeed_config
from .pipeline_batch import to_pipe_micro_batch
from .pipeline_loss import PolicyLoss, ReferenceCollector
from .schedules import lambda_lr_factory


def pipeline_deepspeed_config(cfg: Config, with_optimizer: bool) -> Dict[str, Any]:
    """The engine's DeepSpeed config plus the pipeline section (no activation partitioning, see above).

    Keys the user set under `deepspeed.pipeline` win. The frozen reference runs without ZeRO (it has no
    optimizer state to shard).
    """
    ds = build_deepspeed_config(cfg, use_torch_adam=not torch.cuda.is_available(), with_optimizer=with_optimizer)
    pipe = ds.setdefault("pipeline", {})
    pipe.setdefault("pipe_partitioned", False)
    pipe.setdefault("grad_partitioned", False)
    if not with_optimizer:
        ds["zero_optimization"] = {"stage": 0}
    return ds


def build_pipeline_reference(cfg: Config, ps, policy_module, ds_module):
    """Frozen reference PipelineEngine with the policy's stage layout and initial weights (or
    `reference.load`); None unless reference.mode is live."""
    from .pipeline_module import build_pipeline_module, load_weights_into_stage  # imports deepspeed

    if cfg.derived.reference_mode != "live":
        return None
    # Deferred: allocated without an initialisation of its own, then given the policy's initial weights.
    ref = build_pipeline_module(cfg, ps, activation_checkpointing=False, deferred=True)
    ref.load_state_dict(policy_module.state_dict())
    if cfg.reference.load:
        load_weights_into_stage(ref, cfg.reference.load, cfg, ps)
    ref.requires_grad_(False)
    ref.eval()
    engine, *_ = ds_module.initialize(model=ref, config=pipeline_deepspeed_config(cfg, with_optimizer=False))
    return engine


def build_pipeline_engines(cfg: Config, ps, init_from: Optional[str], ds_module) -> Tuple[Any, Any]:
    """(policy PipelineEngine, reference PipelineEngine or None) for this rank's stage (collective).

    init_from: a checkpoint tag directory whose canonical weights (any layout) start the policy, or None
    for the seeded initialisation (the same weights as GPTModel(cfg, ps, layer_seed=train.seed)).
    """
    from .pipeline_engine import MegatronPipelineEngine  # these import deepspeed
    from .pipeline_module import build_pipeline_module, load_weights_into_stage
    from .build import param_groups, skip_single_replica_allreduce

    module = build_pipeline_module(cfg, ps, deferred=init_from is not None)
    if init_from is not None:
        load_weights_into_stage(module, init_from, cfg, ps)
    ref_engine = build_pipeline_reference(cfg, ps, module, ds_module)
    engine, *_ = ds_module.initialize(
        model=module, model_parameters=param_groups(module, cfg.optimizer.weight_decay),
        config=pipeline_deepspeed_config(cfg, with_optimizer=True),
        lr_scheduler=lambda_lr_factory(cfg.optimizer, cfg.train.iters))
    skip_single_replica_allreduce(engine, cfg, ps)
    return MegatronPipelineEngine.adopt(engine, ps), ref_engine


def from_last_stage(values: Dict[str, float], ps) -> Dict[str, float]:
    """The last stage's `values`, on every rank of this rank's pipeline."""
    if ps.pp_size == 1:
        return values
    box: List[Optional[Dict[str, float]]] = [values if ps.is_last_stage else None]
    dist.broadcast_object_list(box, src=ps.pp_ranks[-1], group=ps.pp_group)
    return box[0]


def pipeline_step(engine, ref_engine, objective, batches: List[Dict[str, torch.Tensor]], ps, cfg: Config,
                  train: bool, counts=None) -> Tuple[Dict[str, float], int]:
    """One optimizer step (train) or one evaluation pass over `batches`, the same on every stage.

    counts: the step's `objectives.aggregation.GlobalCounts` (the loop measures them before the step); the
    last stage's loss function hands them to `objective.loss`, as the unpipelined loop does.

    Returns (metrics averaged over the micro-batches, on every rank; this rank's real tokens).
    """
    micro = [to_pipe_micro_batch(b) for b in batches]
    value_head = cfg.model.value_head
    queue: deque = deque()
    if ref_engine is not None:
        ref_engine.module.loss_fn = ReferenceCollector(queue, ps, value_head, vocab_size=cfg.model.vocab_size)
        ref_engine.eval_batch(iter(micro), compute_loss=True, reduce_output=None, bcast_loss=False,
                              num_micro_batches=len(micro))
    loss_fn = PolicyLoss(objective, ps, value_head, cfg.derived.reference_mode, queue, counts,
                         vocab_size=cfg.model.vocab_size)
    engine.module.loss_fn = loss_fn
    if train:
        engine.train_batch(iter(micro))
    else:
        engine.eval_batch(iter(micro), compute_loss=True, reduce_output=None, bcast_loss=False,
                          num_micro_batches=len(micro))
    engine.module.loss_fn = None
    tokens = sum(int((b["segment_ids"] > 0).sum()) for b in batches)
    return from_last_stage(loss_fn.mean_metrics(), ps), tokens
