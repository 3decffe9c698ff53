"""Atomic, resumable checkpoints (layout in docs/ARCHITECTURE.md).

A save writes everything under `D/<tag>.tmp/`, renames it to `D/<tag>/` when complete and only then
replaces `D/latest` (itself written to a temporary file and renamed). A run killed at any point during a
save therefore resumes from the previous complete checkpoint; a stale `.tmp` directory is ignored and
overwritten by the next save.
"""
from __future__ import annotations

import json
import os
import pickle
import random
import shutil
from dataclasses import dataclass
from typing import Any, Callable, Dict, Optional

import numpy as np
import torch
import torch.distributed as dist

from megatron.config import Config, dump_config, load_dumped_config

from .module_io import save_module_weights
from .optimizer_state import has_optimizer_state, save_optimizer_state
from .reshard_resume import layout_changes, resume_resharded
from .weights_io import CheckpointError, read_meta, resolve_tag_dir, write_shard  # noqa: F401 (re-exported)

LATEST = "latest"
FORMAT_VERSION = 1
# Model keys whose values must agree between a checkpoint and the run that loads it: the shapes, and the
# numerics the weights were trained with (rotary base and scaling, norm epsilon).
SHAPE_KEYS = ("hidden_size", "num_layers", "num_attention_heads", "num_kv_heads", "ffn_hidden_size",
              "vocab_size", "norm", "activation", "qkv_bias", "linear_bias", "tie_embeddings",
              "parallel_residual", "rotary_pct", "rope_theta", "rope_scaling", "norm_eps")


def tag_for_step(step: int) -> str:
    """Directory name of the checkpoint taken after `step` optimizer steps."""
    return f"step_{step:07d}"


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _atomic_write(path: str, text: str) -> None:
    tmp = path + ".writing"
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def rng_state() -> Dict[str, Any]:
    """Every RNG this process uses (python, numpy, torch CPU and CUDA), as tensors, ints, floats and strings
    only, so that `torch.load(..., weights_only=True)` reads it back (no pickled numpy arrays or tuples of
    arbitrary objects)."""
    version, mt, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python": {"version": version, "state": torch.tensor(mt, dtype=torch.int64), "gauss": gauss},
             "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                       "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: Dict[str, Any]) -> None:
    """Restore what `rng_state` returned."""
    py = state["python"]
    random.setstate((py["version"], tuple(int(v) for v in py["state"].tolist()), py["gauss"]))
    npy = state["numpy"]
    np.random.set_state((npy["kind"], npy["keys"].numpy().astype(np.uint32), npy["pos"], npy["has_gauss"],
                         npy["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def load_rng_file(path: str) -> Optional[Dict[str, Any]]:
    """The RNG state saved in `path` (a client/rank*.pt file), read with `weights_only=True`.

    None for a file from before the tensor-only format (it held pickled numpy arrays, which a weights-only
    load refuses): the run then resumes with fresh RNG streams rather than unpickling arbitrary objects.
    """
    try:
        return torch.load(path, weights_only=True)["rng"]
    except pickle.UnpicklingError:
        return None


@dataclass
class TrainState:
    """Where training stands: optimizer steps done and samples consumed (global count)."""
    step: int = 0
    consumed_samples: int = 0


def read_latest(ckpt_dir: str) -> str:
    """The tag directory `ckpt_dir/latest` points to (or `ckpt_dir` itself when it is a tag directory)."""
    return resolve_tag_dir(ckpt_dir)


def find_resume_dir(cfg: Config) -> Optional[str]:
    """Tag directory to start from.

    The run's own newest checkpoint in `checkpoint.save` comes first, so a restarted or requeued run
    continues where it stopped; otherwise `checkpoint.load` (a tag directory or a directory with `latest`).
    """
    if cfg.checkpoint.save and os.path.exists(os.path.join(cfg.checkpoint.save, LATEST)):
        return read_latest(cfg.checkpoint.save)
    if cfg.checkpoint.load:
        return read_latest(cfg.checkpoint.load)
    return None


def is_own_checkpoint(cfg: Config, tag_dir: str) -> bool:
    """True when `tag_dir` lies in this run's `checkpoint.save` (a resume, not a new starting point)."""
    return bool(cfg.checkpoint.save) and os.path.abspath(os.path.dirname(tag_dir)) == \
        os.path.abspath(cfg.checkpoint.save)


def continues_run(tag_dir: str, cfg: Config) -> bool:
    """Whether `checkpoint.load`'s training checkpoint `tag_dir` is resumed in full (optimizer, scheduler, step,
    data position) rather than used as the starting weights of a new stage.

    `checkpoint.load_optimizer` true/false decides; unset, the checkpoint continues only the same run: the
    same objective on the same training data or prompts (a DPO run loading an SFT run starts a new stage at step 0).
    The run's own checkpoints in `checkpoint.save` always resume in full and never come here.
    """
    if cfg.checkpoint.load_optimizer is not None:
        return cfg.checkpoint.load_optimizer
    path = os.path.join(tag_dir, "config.yaml")
    if not os.path.exists(path):
        return False
    saved = load_dumped_config(path)
    # online RL runs train on prompts (rollout.prompts_path), offline ones on data.train_path
    return ((saved.objective.name, saved.data.train_path, saved.rollout.prompts_path)
            == (cfg.objective.name, cfg.data.train_path, cfg.rollout.prompts_path))


def check_compatible(tag_dir: str, cfg: Config, weights_only: bool = False) -> None:
    """Refuse a checkpoint whose model differs from the configured model, naming each key.

    weights_only: the checkpoint only provides starting weights, so a different head is allowed (a reward
    model starts from an SFT model: the trunk loads, the value head keeps its fresh initialisation).
    A mismatch in the run's own `checkpoint.save` means the directory holds an earlier run of another model:
    the message says so and how to choose another directory.
    """
    path = os.path.join(tag_dir, "config.yaml")
    if not os.path.exists(path):
        raise CheckpointError(f"{path} is missing; cannot verify the checkpoint's model shape")
    saved = load_dumped_config(path)
    diffs = []
    for key in SHAPE_KEYS:
        a, b = getattr(saved.model, key), getattr(cfg.model, key)
        if key in ("num_kv_heads", "ffn_hidden_size"):
            a, b = getattr(saved.derived, key) or a, getattr(cfg.derived, key) or b
        if a != b:
            diffs.append(f"model.{key}: checkpoint {a!r} vs config {b!r}")
    if saved.model.value_head != cfg.model.value_head and not weights_only:
        diffs.append(f"model.value_head: checkpoint {saved.model.value_head!r} vs config {cfg.model.value_head!r}")
    if not diffs:
        return
    detail = "\n  " + "\n  ".join(diffs)
    if is_own_checkpoint(cfg, tag_dir):
        root = cfg.checkpoint.save
        raise CheckpointError(
            f"checkpoint.save={root} already holds another run, of a different model (its checkpoint "
            f"{os.path.basename(os.path.normpath(tag_dir))} has:{detail})\nchoose another directory for this run "
            f"with --set checkpoint.save=NEW_DIR (or delete {root} to start over)")
    raise CheckpointError(f"checkpoint.load: {tag_dir} was saved from a different model:{detail}\n"
                          "fix the model section of your config to match it (a converted model's directory has a "
                          "model.yaml to include)")


def canonical_state_dict(module: torch.nn.Module, zero_stage: int) -> Dict[str, torch.Tensor]:
    """This rank's canonical fp32 state dict, gathering ZeRO-3 partitions (collective over the DP group)."""
    if hasattr(module, "canonical_state_dict"):  # a pipeline stage maps its layer-index names itself
        return module.canonical_state_dict()
    if zero_stage == 3:
        import deepspeed
        params = list(module.parameters())
        with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
            return {k: v.detach().float().clone().cpu() for k, v in module.state_dict().items()}
    return {k: v.detach().float().clone().cpu() for k, v in module.state_dict().items()}


def weights_file(tag_dir: str, tp_rank: int, pp_rank: int) -> str:
    """Path of the weight shard of tensor rank `tp_rank` and pipeline stage `pp_rank` (safetensors)."""
    return os.path.join(tag_dir, "weights", f"tp{tp_rank:02d}_pp{pp_rank:02d}.safetensors")


def save_checkpoint(cfg: Config, ps, engine, state: TrainState,
                    weights_fn: Optional[Callable[[], Dict[str, torch.Tensor]]] = None,
                    extra_meta: Optional[Dict[str, Any]] = None,
                    before_commit: Optional[Callable[[], None]] = None) -> str:
    """Collective save of everything needed to resume exactly. Returns the final tag directory.

    weights_fn: returns this rank's canonical state dict; None (the default) streams `engine.module`'s
    parameters one at a time instead (ZeRO-3: one parameter gathered at a time, never the whole model).
    Besides DeepSpeed's own state the canonical optimizer state is written (`optimizer_state`), so the run can
    resume at another tensor/pipeline/data size.
    before_commit: called on every rank just before the rename (tests use it to simulate a crash).
    """
    root = cfg.checkpoint.save
    tag = tag_for_step(state.step)
    final, tmp = os.path.join(root, tag), os.path.join(root, tag + ".tmp")
    if ps.rank == 0:
        os.makedirs(root, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(os.path.join(tmp, "weights"))
        os.makedirs(os.path.join(tmp, "client"))
    _barrier()
    engine.save_checkpoint(tmp, tag="deepspeed", save_latest=False)
    path = weights_file(tmp, ps.tp_rank, ps.pp_rank) if ps.dp_rank == 0 else None
    if weights_fn is None:
        save_module_weights(engine.module, path)
    else:
        weights = weights_fn()
        if path is not None:
            write_shard(path, weights)
    save_optimizer_state(engine, tmp, cfg, ps)
    torch.save({"rng": rng_state()}, os.path.join(tmp, "client", f"rank{ps.rank:05d}.pt"))
    _barrier()
    if before_commit is not None:
        before_commit()
    if ps.rank == 0:
        dump_config(cfg, os.path.join(tmp, "config.yaml"))
        meta = {"format": FORMAT_VERSION, "step": state.step, "consumed_samples": state.consumed_samples,
                "tensor": ps.tp_size, "pipeline": ps.pp_size, "data_parallel": ps.dp_size,
                "world_size": ps.world_size, **_pipeline_meta(engine), **(extra_meta or {})}
        _atomic_write(os.path.join(tmp, "meta.json"), json.dumps(meta, indent=1))
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        _atomic_write(os.path.join(root, LATEST), tag)
        _prune(root, cfg.checkpoint.keep_last, keep=tag)
    _barrier()
    return final


def _pipeline_meta(engine) -> Dict[str, Any]:
    """{'blocks_per_stage': [...]} for a pipeline engine (read back by weights_io and resume), else {}."""
    bps = getattr(getattr(engine, "module", None), "blocks_per_stage", None)
    return {"blocks_per_stage": list(bps)} if bps is not None else {}


def _prune(root: str, keep_last: int, keep: str) -> None:
    if keep_last <= 0:
        return
    tags = sorted(d for d in os.listdir(root) if d.startswith("step_") and not d.endswith(".tmp")
                  and os.path.isdir(os.path.join(root, d)))
    for old in tags[:-keep_last]:
        if old != keep:
            shutil.rmtree(os.path.join(root, old), ignore_errors=True)


def load_training_state(tag_dir: str, cfg: Config, ps, engine) -> TrainState:
    """Restore engine (model, optimizer, scheduler), RNG and position from a full training checkpoint."""
    meta = read_meta(tag_dir)
    changes = layout_changes(tag_dir, meta, cfg, ps, engine)
    if changes and has_optimizer_state(tag_dir):  # another layout: through the canonical form (issue 11)
        resume_resharded(tag_dir, meta, cfg, ps, engine, changes)
        return TrainState(step=int(meta["step"]), consumed_samples=int(meta["consumed_samples"]))
    if (meta.get("tensor"), meta.get("pipeline")) != (ps.tp_size, ps.pp_size):
        new_stage = ("start a new stage from its weights (re-sharded) with --set checkpoint.save=NEW_DIR "
                     f"checkpoint.load={tag_dir} checkpoint.load_optimizer=false" if is_own_checkpoint(cfg, tag_dir)
                     else "set checkpoint.load_optimizer=false to load only the weights (re-sharded)")
        raise CheckpointError(
            f"{tag_dir} was saved at tensor={meta.get('tensor')} pipeline={meta.get('pipeline')} but this run "
            f"uses tensor={ps.tp_size} pipeline={ps.pp_size}; resume at the saved layout, or {new_stage}")
    split = _pipeline_meta(engine).get("blocks_per_stage")
    if split is not None and meta.get("blocks_per_stage", split) != split:
        raise CheckpointError(f"{tag_dir} was saved with blocks per pipeline stage {meta['blocks_per_stage']} but "
                              f"this run splits {split}; set parallel.pipeline_partition="
                              f"{','.join(str(b) for b in meta['blocks_per_stage'])} to resume")
    # A full resume always restores the optimizer: the run's own checkpoints, or `checkpoint.load` of the same
    # run (`continues_run`); weights-only starts never come here.
    load_path, _ = engine.load_checkpoint(tag_dir, tag="deepspeed", load_optimizer_states=True,
                                          load_lr_scheduler_states=True)
    if load_path is None:
        raise CheckpointError(f"DeepSpeed could not load {os.path.join(tag_dir, 'deepspeed')}; the checkpoint is "
                              "incomplete")
    client = os.path.join(tag_dir, "client", f"rank{ps.rank:05d}.pt")
    if os.path.exists(client) and meta.get("world_size") == ps.world_size:
        saved_rng = load_rng_file(client)
        if saved_rng is not None:
            set_rng_state(saved_rng)
    return TrainState(step=int(meta["step"]), consumed_samples=int(meta["consumed_samples"]))


def has_training_state(tag_dir: str) -> bool:
    """True when the tag holds DeepSpeed engine state (a training checkpoint, not converted weights)."""
    return os.path.isdir(os.path.join(tag_dir, "deepspeed"))
