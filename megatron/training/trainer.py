"""The generic train/eval loop. It knows objectives only through the registry interface
(`batch_kind`, `uses_value_head`, `loss(policy, reference, batch)`): it never branches on a method name."""
from __future__ import annotations

import signal
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional

import torch
import torch.distributed as dist

from megatron.config import Config, ConfigError
from megatron.mpu import initialize_parallel
from megatron.objectives import (build_objective, get_objective_class, kto_class_weight_warning, precomputed_reference,
                                 resolve_objective)
from megatron.objectives.aggregation import GLOBAL_COUNTS, global_counts

from megatron.checkpoint import checkpointing as ckpt
from megatron.engines.build import (build_policy, build_reference, device_for_rank, param_groups,
                                   skip_single_replica_allreduce, starting_point)
from megatron.engines.deepspeed_config import build_deepspeed_config
from megatron.engines.forward import batch_to, forward_stats, reference_stats
from megatron.engines.grad_norm import global_grad_norm
from megatron.engines.pipeline import build_pipeline_engines, pipeline_step
from megatron.engines.precompute import ensure_reference_logps, reference_source, require_reference_logps
from megatron.engines.schedules import lambda_lr_factory
from megatron.mpu.distributed import init_distributed

from .memory_report import memory_report, report_measured_memory, start_memory_measurement, write_memory_report
from megatron.model.kernels import describe_kernels

from .metrics import MetricsLogger
from .summary import print_run_summary


@dataclass
class TrainResult:
    """What a finished (or preempted) run reports back: the steps done and every logged metrics row."""
    step: int
    history: List[Dict[str, float]] = field(default_factory=list)
    stopped_by_signal: bool = False


@dataclass
class Hooks:
    """Test seams. `before_commit(step)` runs on every rank just before a checkpoint becomes visible;
    `after_step(step) -> bool` returning True requests the same clean stop as SIGTERM (save and exit)."""
    before_commit: Optional[Callable[[int], None]] = None
    after_step: Optional[Callable[[int], bool]] = None


def data_warnings(cfg: Config, objective_cls, dataset) -> List[str]:
    """Start-up warnings about the training data for this objective (printed by rank 0).

    Unpaired (KTO) data: the desirable/undesirable class weighting against the KTO paper's recommended
    range, from the label counts of the whole training set.
    """
    out: List[str] = []
    if objective_cls.batch_kind == "unpaired" and dataset.kind == "unpaired":
        ix = dataset.indexed
        labels = ix.index["label"][::ix.seqs_per_example]  # Float32[E], 1 desirable / 0 undesirable
        n_desirable = int((labels > 0.5).sum())
        text = kto_class_weight_warning(n_desirable, len(labels) - n_desirable, cfg.objective.desirable_weight,
                                        cfg.objective.undesirable_weight)
        if text:
            out.append(text)
    return out


class _StopFlag:
    """Set by SIGTERM (Slurm preemption); checked after every step and agreed on by all ranks."""

    def __init__(self) -> None:
        self.raised = False
        self._previous = signal.getsignal(signal.SIGTERM)
        signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame) -> None:
        self.raised = True

    def agreed(self, device) -> bool:
        flag = torch.tensor([1.0 if self.raised else 0.0], device=device)
        if dist.is_initialized():
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item() > 0)

    def restore(self) -> None:
        signal.signal(signal.SIGTERM, self._previous)


def _mean_over_dp(values: Dict[str, float], ps, device) -> Dict[str, float]:
    if not values:
        return {}
    keys = sorted(values)
    t = torch.tensor([values[k] for k in keys], dtype=torch.float64, device=device)
    if ps.dp_size > 1:
        dist.all_reduce(t, group=ps.dp_group)
        t /= ps.dp_size
    return dict(zip(keys, t.tolist()))


def _step_micro_batches(engine, ref_model, objective, batches, ps, cfg, device, train: bool):
    """Forward (and backward when `train`) over the micro-batches of one step.

    Before the first forward, the units of the whole step (scored tokens, sequences, examples of every
    micro-batch on every data-parallel rank) are counted and handed to `objective.loss` as
    `batch[GLOBAL_COUNTS]`: each micro-batch loss is its share of the global-batch mean, so DeepSpeed's
    averaging over accumulation steps and ranks yields the full-batch loss and gradient (objectives/aggregation.py).
    Returns (metrics averaged over the micro-batches, this rank's real tokens).
    """
    counts = global_counts([objective.count_units(b) for b in batches], ps, device)  # collective (dp group)
    if ps.pp_size > 1:
        return pipeline_step(engine, ref_model, objective, batches, ps, cfg, train, counts)
    sums: Dict[str, float] = {}
    tokens = 0
    value_head = cfg.model.value_head
    for batch in batches:
        batch = batch_to(batch, device)
        batch[GLOBAL_COUNTS] = counts
        tokens += int((batch["segment_ids"] > 0).sum())
        with torch.set_grad_enabled(train):
            policy = forward_stats(engine, batch, ps, value_head)
            if "ref_logps" in batch and cfg.derived.reference_mode == "precomputed":
                reference = precomputed_reference(batch)
            else:
                reference = reference_stats(ref_model, batch, ps, value_head)
            loss, metrics = objective.loss(policy, reference, batch)
        if train:
            engine.backward(loss)
            if engine.is_gradient_accumulation_boundary() and cfg.parallel.zero_stage == 0:
                # Plain fp32 engines clip without keeping the norm; measure it (TP-aware) for the logs.
                sums["grad_norm"] = global_grad_norm(engine.module.parameters(), ps) * len(batches)
            engine.step()
        sums["loss"] = sums.get("loss", 0.0) + float(loss.detach())
        for k, v in metrics.items():
            sums[k] = sums.get(k, 0.0) + float(v)
    n = max(1, len(batches))
    return {k: v / n for k, v in sums.items()}, tokens


def run_training(cfg: Config, hooks: Optional[Hooks] = None) -> TrainResult:
    """Train `cfg` (already validated, `cfg.derived` filled) on the current process group.

    Works on 1..N ranks; the caller (train.py, or a test that spawned ranks) owns process start-up.
    """
    import deepspeed
    from megatron.data import build_data_iterator, load_tokenizer

    hooks = hooks or Hooks()
    resolve_objective(cfg)  # idempotent: a Config from plain load_config gets its objective checks here
    if get_objective_class(cfg.objective.name).batch_kind == "rollout":
        raise ConfigError(f"objective '{cfg.objective.name}' is an online RL objective: it trains on completions it "
                          "generates from rollout.prompts_path, which the offline trainer (data.train_path) cannot do; "
                          "it needs the online loop")
    init_distributed(cfg.parallel.backend)
    ps = initialize_parallel(cfg.parallel.tensor, cfg.parallel.pipeline)
    if ps.world_size != cfg.derived.world_size:
        raise ConfigError(f"the config was validated for world size {cfg.derived.world_size} but "
                          f"{ps.world_size} ranks started; launch with launcher.num_gpus * launcher.num_nodes = "
                          f"{cfg.derived.world_size} or re-validate")
    device = device_for_rank()
    objective_cls = get_objective_class(cfg.objective.name)
    if objective_cls.uses_value_head and not cfg.model.value_head:
        cfg.model.value_head = True
    memory = memory_report(cfg)  # on every rank, so a config error stops all ranks alike
    if ps.rank == 0:  # printed once, and written to <logging.dir>/memory.json
        write_memory_report(cfg, memory)
    memory_start = start_memory_measurement()  # this rank's memory before the model; the peak is reported at the end

    tokenizer = load_tokenizer(cfg.data.tokenizer)
    tok_vocab = len(tokenizer) if hasattr(tokenizer, "__len__") else tokenizer.vocab_size
    if tok_vocab > cfg.derived.padded_vocab_size:
        raise ConfigError(f"tokenizer {cfg.data.tokenizer} has {tok_vocab} tokens but model.vocab_size is "
                          f"{cfg.model.vocab_size} (padded {cfg.derived.padded_vocab_size}); wrong tokenizer, "
                          f"or set model.vocab_size >= {tok_vocab}")

    resume_dir, full_resume, init_from = starting_point(cfg)
    if cfg.derived.reference_mode == "precomputed":
        # Values no tools/precompute_reference.py run made yet are computed now, by all ranks, and cached.
        ensure_reference_logps(cfg, ps, tokenizer, init_from)
    total_iters = cfg.train.iters
    if ps.pp_size > 1:  # DeepSpeed's pipeline engine (megatron/training/pipeline.py)
        engine, ref_model = build_pipeline_engines(cfg, ps, init_from, deepspeed)
    else:
        model = build_policy(cfg, ps, init_from)
        ref_model = build_reference(cfg, ps, model, device, deepspeed)
        ds_cfg = build_deepspeed_config(cfg, use_torch_adam=not torch.cuda.is_available())
        engine, _opt, _, _sched = deepspeed.initialize(
            model=model, model_parameters=param_groups(model, cfg.optimizer.weight_decay), config=ds_cfg,
            lr_scheduler=lambda_lr_factory(cfg.optimizer, total_iters), mpu=ps)
        skip_single_replica_allreduce(engine, cfg, ps)

    state = ckpt.TrainState()
    if full_resume:
        state = ckpt.load_training_state(resume_dir, cfg, ps, engine)

    barrier = (lambda: dist.barrier()) if dist.is_initialized() else (lambda: None)
    train_iter = build_data_iterator(cfg, ps.dp_rank, ps.dp_size, tokenizer, consumed_samples=state.consumed_samples,
                                     split="train", is_builder=ps.rank == 0, barrier=barrier)
    if cfg.derived.reference_mode == "precomputed":
        require_reference_logps(train_iter.dataset, "train", reference_source(cfg, init_from))
    valid_batches = None
    if cfg.train.eval_interval > 0 and cfg.data.valid_path:
        valid_iter = build_data_iterator(cfg, ps.dp_rank, ps.dp_size, tokenizer, consumed_samples=0,
                                         split="valid", is_builder=ps.rank == 0, barrier=barrier)
        if cfg.derived.reference_mode == "precomputed":
            require_reference_logps(valid_iter.dataset, "valid", reference_source(cfg, init_from))
        # The same held-out micro-batches at every evaluation, so eval curves are comparable.
        valid_batches = [next(valid_iter) for _ in range(cfg.train.eval_iters)]
    objective = build_objective(cfg, ps)
    logger = MetricsLogger(cfg, enabled=ps.rank == 0, start_step=state.step)
    logger.message(describe_kernels(cfg))  # which kernel path each op took (model.kernels)
    for text in data_warnings(cfg, objective_cls, train_iter.dataset):
        logger.message(f"warning: {text}")
    stop = _StopFlag() if cfg.checkpoint.save_on_sigterm else None
    result = TrainResult(step=state.step)

    def save() -> None:
        if not cfg.checkpoint.save:
            return
        commit = (lambda: hooks.before_commit(state.step)) if hooks.before_commit else None
        ckpt.save_checkpoint(cfg, ps, engine, state,  # weights streamed from engine.module, one tensor at a time
                             extra_meta={"init_from": init_from}, before_commit=commit)
        logger.message(f"saved checkpoint step {state.step} to {cfg.checkpoint.save}")

    engine.train()
    last_saved = state.step
    if valid_batches is not None and state.step == 0:
        # A step-0 evaluation gives every eval curve its untrained starting point.
        ev = evaluate(engine, ref_model, objective, valid_batches, ps, cfg, device)
        logger.log(0, ev)
        result.history.append({"step": 0, **ev})
    try:
        while state.step < total_iters:
            t0 = time.perf_counter()
            batches = [next(train_iter) for _ in range(cfg.derived.grad_accum)]
            metrics, tokens = _step_micro_batches(engine, ref_model, objective, batches, ps, cfg, device, True)
            state.step += 1
            state.consumed_samples += cfg.train.global_batch_size
            grad_norm = engine.get_global_grad_norm()
            if grad_norm is None:
                grad_norm = metrics.pop("grad_norm", float("nan"))
            metrics.pop("grad_norm", None)
            metrics = objective.summarize_metrics(_mean_over_dp(metrics, ps, device))
            tok = torch.tensor([float(tokens)], device=device)
            if ps.dp_size > 1:
                dist.all_reduce(tok, group=ps.dp_group)
            elapsed = max(time.perf_counter() - t0, 1e-9)
            metrics.update(lr=engine.get_lr()[0],
                           grad_norm=float(grad_norm) if grad_norm is not None else float("nan"),
                           tokens_per_s=float(tok.item()) / elapsed,
                           samples_per_s=cfg.train.global_batch_size / elapsed)
            if state.step % cfg.train.log_interval == 0 or state.step == total_iters:
                logger.log(state.step, metrics)
                result.history.append({"step": state.step, **metrics})
            logger.advance()
            if valid_batches is not None and state.step % cfg.train.eval_interval == 0:
                ev = evaluate(engine, ref_model, objective, valid_batches, ps, cfg, device)
                logger.log(state.step, ev)
                result.history.append({"step": state.step, **ev})
            if cfg.checkpoint.interval and state.step % cfg.checkpoint.interval == 0:
                save()
                last_saved = state.step
            requested = hooks.after_step is not None and hooks.after_step(state.step)
            if requested or (stop is not None and stop.agreed(device)):
                logger.message(f"SIGTERM received: saving at step {state.step} and exiting")
                result.stopped_by_signal = True
                break
        if state.step != last_saved:
            save()
    finally:
        if stop is not None:
            stop.restore()
        logger.close()
    result.step = state.step
    report_measured_memory(cfg, memory, ps, memory_start)  # collective: measured peaks beside the estimate
    if ps.rank == 0:
        print_run_summary(cfg, state.step, result.stopped_by_signal)
    return result


@torch.no_grad()
def evaluate(engine, ref_model, objective, batches, ps, cfg: Config, device) -> Dict[str, float]:
    """Mean objective metrics over the given validation micro-batches, keys prefixed `eval/`."""
    engine.eval()
    metrics, _ = _step_micro_batches(engine, ref_model, objective, batches, ps, cfg, device, train=False)
    engine.train()
    metrics = objective.summarize_metrics(_mean_over_dp(metrics, ps, device))
    return {f"eval/{k}": v for k, v in metrics.items()}
