"""The optimizer state in canonical form, so that a run resumes at another tensor, pipeline or data size.

DeepSpeed's own optimizer files (`<tag>/deepspeed/`) hold flat per-rank partitions that only the same layout
can read. Next to them every save writes, per canonical parameter and laid out exactly like the weights
(tensor shards per pipeline stage, any data-parallel or ZeRO partitioning undone):

    <tag>/optimizer/exp_avg/tp{t:02d}_pp{p:02d}.safetensors      Adam's first moment, fp32
    <tag>/optimizer/exp_avg_sq/tp{t:02d}_pp{p:02d}.safetensors   Adam's second moment, fp32
    <tag>/optimizer/master/tp{t:02d}_pp{p:02d}.safetensors       the fp32 master weights (16-bit training only)
    <tag>/optimizer/meta.json                                    Adam's step, the LR scheduler, engine counters

Gathers go one parameter at a time (`deepspeed.utils.safe_get_full_optimizer_state`, collective over the
data-parallel group), so a save holds one extra parameter at most. Loading reads each rank's slices of
those files (`sharded_read.CheckpointSource`) and writes them into whatever partitioning the new engine has.
The cost: two (16-bit: three) extra copies of the weights' size on disk per checkpoint.
"""
from __future__ import annotations

import json
import os
from typing import Any, Dict, List, Optional

import torch
import torch.distributed as dist

from megatron.config import Config

from .module_io import canonical_params, copy_partition, is_zero3, param_shape
from .tensor_files import SafetensorsWriter
from .weights_io import CheckpointError, shard_path

STATE_KEYS = ("exp_avg", "exp_avg_sq")
MASTER = "master"
SUBDIR = "optimizer"


def base_optimizer(engine) -> torch.optim.Optimizer:
    """The torch optimizer doing the update (inside DeepSpeed's ZeRO / bf16 wrappers)."""
    opt = engine.optimizer
    for _ in range(4):
        if isinstance(opt, torch.optim.Optimizer):
            return opt
        opt = getattr(opt, "optimizer", None)
    raise CheckpointError(f"cannot find the torch optimizer inside {type(engine.optimizer).__name__}")


def _adam_step(opt: torch.optim.Optimizer) -> int:
    for state in opt.state.values():
        if "step" in state:
            return int(float(state["step"]))
    return 0


def _has_master(p: torch.Tensor) -> bool:
    return is_zero3(p) or hasattr(p, "_hp_mapping")


def _full_state(engine, p: torch.Tensor, key: str) -> Optional[torch.Tensor]:
    """Full (tensor-rank) fp32 value of optimizer state `key` (or the master weight, key MASTER) of `p`.
    Collective over p's data-parallel group under ZeRO; None when `p` has no such state."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    if _has_master(p):
        value = safe_get_full_fp32_param(p) if key == MASTER else safe_get_full_optimizer_state(p, key)
        return None if value is None else value.reshape(param_shape(p))
    if key == MASTER:
        return p.detach()
    state = base_optimizer(engine).state.get(p)
    return None if not state or key not in state else state[key]


def _state_keys(cfg: Config) -> List[str]:
    return list(STATE_KEYS) + ([MASTER] if cfg.train.precision != "fp32" else [])


def save_optimizer_state(engine, tag_dir: str, cfg: Config, ps) -> None:
    """Write the canonical optimizer state of this rank's (tensor, pipeline) shard under `tag_dir/optimizer/`
    (collective: every rank calls it; data-parallel rank 0 writes, global rank 0 also writes meta.json)."""
    params = canonical_params(engine.module)
    trainable = [(k, p) for k, p in params if p.requires_grad]
    keys = _state_keys(cfg)
    _relink(engine)
    writers: Dict[str, SafetensorsWriter] = {}
    if ps.dp_rank == 0:
        for key in keys:
            path = shard_path(tag_dir, ps.tp_rank, ps.pp_rank, f"{SUBDIR}/{key}")
            os.makedirs(os.path.dirname(path), exist_ok=True)
            writers[key] = SafetensorsWriter(path, [(k, param_shape(p), torch.float32) for k, p in trainable])
    try:
        for name, p in trainable:
            for key in keys:
                value = _full_state(engine, p, key)
                if value is None:
                    raise CheckpointError(f"parameter '{name}' has no optimizer state '{key}' to save (a save before "
                                          "the first optimizer step?)")
                if key in writers:
                    writers[key].write(name, value.detach().float().cpu())
    except BaseException:
        for w in writers.values():
            w.abort()
        raise
    for w in writers.values():
        w.close()
    if ps.rank == 0:
        sched = getattr(engine, "lr_scheduler", None)
        meta = {"adam_step": _adam_step(base_optimizer(engine)), "state_keys": keys,
                "scheduler": _jsonable(sched.state_dict()) if sched is not None else None,
                "global_steps": int(getattr(engine, "global_steps", 0)),
                "global_samples": int(getattr(engine, "global_samples", 0)),
                "skipped_steps": int(getattr(engine, "skipped_steps", 0))}
        with open(os.path.join(tag_dir, SUBDIR, "meta.json"), "w", encoding="utf-8") as fh:
            json.dump(meta, fh, indent=1)


def _jsonable(state: Dict[str, Any]) -> Dict[str, Any]:
    """A LambdaLR state dict without its (unpicklable, unneeded) lambdas."""
    return {k: v for k, v in state.items() if k != "lr_lambdas"}


def has_optimizer_state(tag_dir: str) -> bool:
    """Whether `tag_dir` holds the canonical optimizer state (checkpoints from before issue 11 do not)."""
    return os.path.isfile(os.path.join(tag_dir, SUBDIR, "meta.json"))


def read_optimizer_meta(tag_dir: str) -> Dict[str, Any]:
    """`tag_dir/optimizer/meta.json`."""
    path = os.path.join(tag_dir, SUBDIR, "meta.json")
    if not os.path.isfile(path):
        raise CheckpointError(f"missing file: {path}")
    with open(path, "r", encoding="utf-8") as fh:
        return json.load(fh)


def _prime_state(engine, step: int) -> None:
    """Create Adam's state (zeros, step `step`) for every tensor the torch optimizer updates, as its first
    step would, and link DeepSpeed's per-parameter views to it, so the loaded values have somewhere to go."""
    opt = base_optimizer(engine)
    for group in opt.param_groups:
        fused = bool(group.get("fused")) or bool(group.get("capturable"))
        for q in group["params"]:
            state = opt.state[q]
            if "exp_avg" not in state:
                state["exp_avg"] = torch.zeros_like(q, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(q, memory_format=torch.preserve_format)
                if group.get("amsgrad"):
                    state["max_exp_avg_sq"] = torch.zeros_like(q, memory_format=torch.preserve_format)
            state["step"] = torch.tensor(float(step), dtype=torch.float32, device=q.device if fused else "cpu")
    _relink(engine)


def _relink(engine) -> None:
    """(Re)build DeepSpeed's per-parameter views of the optimizer state (ZeRO 1/2, bf16). DeepSpeed links them
    after the first step of the FIRST param group only, so parameters of the other groups (the no-decay group)
    are left without them; linking again once every group has state fixes that."""
    opt = engine.optimizer
    link = getattr(opt, "_lazy_init_hp_params_optimizer_state", None)
    if link is not None and hasattr(opt, "_hp_optimizer_states_linked"):
        opt._hp_optimizer_states_linked = False
        link()


def _set_state(engine, p: torch.Tensor, key: str, value: torch.Tensor) -> None:
    """Set optimizer state `key` (or MASTER) of `p` from its full tensor-rank value (this rank keeps its part)."""
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

    if is_zero3(p):  # DeepSpeed's setter assumes no padding in the last partition: copy the partition here
        part, _ = engine.optimizer._get_fp32_opt_state_partition(p, release_swap_buffers=False,
                                                                  optim_state_key=None if key == MASTER else key)
        copy_partition(part, value.to(part.dtype), p.ds_zero_partition_rank)
    elif hasattr(p, "_hp_mapping"):
        if key == MASTER:
            safe_set_full_fp32_param(p, value)
        else:
            safe_set_full_optimizer_state(p, value, key)
    elif key != MASTER:  # a plain torch optimizer over the model's own parameters
        with torch.no_grad():
            base_optimizer(engine).state[p][key].copy_(value)


def load_optimizer_state(engine, tag_dir: str, cfg: Config, ps) -> Dict[str, Any]:
    """Load the canonical optimizer state saved at any layout into `engine` (weights must be loaded already:
    their fp32 master copy comes from `optimizer/master` when saved, else from the weights). Sets Adam's step,
    the LR scheduler and the engine's step counters. Returns optimizer/meta.json."""
    from .sharded_read import CheckpointSource

    meta = read_optimizer_meta(tag_dir)
    _prime_state(engine, int(meta["adam_step"]))
    params = [(k, p) for k, p in canonical_params(engine.module) if p.requires_grad]
    sources = {key: CheckpointSource(tag_dir, f"{SUBDIR}/{key}") for key in meta["state_keys"]}
    weights = None if MASTER in sources else CheckpointSource(tag_dir, "weights")
    try:
        for name, p in params:
            for key, src in sources.items():
                if not src.has(name):  # a head the saved run did not have keeps fresh (zero) moments
                    continue
                _set_state(engine, p, key, src.read_shard(name, cfg, ps.tp_size, ps.tp_rank))
            if weights is not None and _has_master(p) and weights.has(name):
                _set_state(engine, p, MASTER, weights.read_shard(name, cfg, ps.tp_size, ps.tp_rank))
    finally:
        for src in list(sources.values()) + ([weights] if weights is not None else []):
            src.close()
    sched = getattr(engine, "lr_scheduler", None)
    if sched is not None and meta.get("scheduler"):
        # Only the position: the per-group lists (base_lrs, _last_lr) follow this run's parameter groups, which
        # another ZeRO stage may split differently.
        saved = meta["scheduler"]
        sched.last_epoch, sched._step_count = int(saved["last_epoch"]), int(saved.get("_step_count", 0))
        lrs = [base * fn(sched.last_epoch) for fn, base in zip(sched.lr_lambdas, sched.base_lrs)]
        sched._last_lr = lrs
        for group, lr in zip(base_optimizer(engine).param_groups, lrs):
            group["lr"] = lr
    for attr in ("global_steps", "global_samples", "skipped_steps"):
        if hasattr(engine, attr) and attr in meta:
            setattr(engine, attr, int(meta[attr]))
    if dist.is_initialized():
        dist.barrier()
    return meta
