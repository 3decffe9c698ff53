"""Building models one way for every loop and tool: the policy with its starting weights, the frozen
reference, and the rules that pick a run's starting point (its own newest checkpoint, else `checkpoint.load`).

Pipeline engines (`parallel.pipeline > 1`) are built in `pipeline.py` from the same pieces."""
from __future__ import annotations

from typing import Any, Dict, List, Optional

import torch

from megatron.checkpoint import checkpointing as ckpt
from megatron.config import Config
from megatron.model import GPTModel

from .deepspeed_config import build_deepspeed_config


def device_for_rank() -> torch.device:
    """This rank's accelerator, or the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def param_groups(model: torch.nn.Module, weight_decay: float) -> List[Dict[str, Any]]:
    """AdamW groups: decay on matrices, none on biases, norms and other vectors (common LLM practice)."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def build_policy(cfg: Config, ps, init_dir: Optional[str]) -> torch.nn.Module:
    """The model with its starting weights: seeded random init, or the weights in `init_dir`."""
    torch.manual_seed(cfg.train.seed)
    # Per-layer seeds (DeepSpeed's seed_layers): the same initial weights at any pipeline split.
    model = GPTModel(cfg, ps, layer_seed=cfg.train.seed)
    if init_dir is not None:
        load_weights_into(model, init_dir, cfg, ps)
    return model


def starting_point(cfg: Config):
    """(resume_dir, full_resume, init_from) of a run: the checkpoint tag it starts from (or None), whether it
    resumes the full training state from it, and the tag directory of the run's INITIAL weights (None: the
    seeded init). A resumed run rebuilds its reference from `init_from`, as does tools/precompute_reference.py.
    """
    resume_dir = ckpt.find_resume_dir(cfg)
    own = resume_dir is not None and ckpt.is_own_checkpoint(cfg, resume_dir)
    # Our own checkpoints always resume in full; `checkpoint.load` of another run (DPO from SFT) is a new stage
    # (its weights, a fresh optimizer, step 0 and that model as reference) unless it is the same run or
    # `checkpoint.load_optimizer` says otherwise (ckpt.continues_run).
    full_resume = (resume_dir is not None and ckpt.has_training_state(resume_dir)
                   and (own or ckpt.continues_run(resume_dir, cfg)))
    if resume_dir is not None:
        ckpt.check_compatible(resume_dir, cfg, weights_only=not full_resume)
    init_from = ckpt.read_meta(resume_dir).get("init_from") if full_resume else resume_dir
    return resume_dir, full_resume, init_from


def load_weights_into(model: torch.nn.Module, tag_dir: str, cfg: Config, ps) -> None:
    """Load canonical weights from any tensor/pipeline layout, re-sharded to this rank's layout.

    A head the checkpoint lacks (a value head on an SFT model) keeps its seeded initialisation; a head the
    model lacks (the SFT model's lm_head) is ignored. Every other tensor must be present with its shape.
    """
    from megatron.checkpoint.weights_io import read_weights, split_tp

    full, _meta, saved_cfg = read_weights(tag_dir)
    own = model.state_dict()
    shard = split_tp(full, saved_cfg, ps.tp_size)[ps.tp_rank]
    fresh_head = sorted(k for k in set(own) - set(shard) if k.startswith("value_head."))
    missing = sorted(set(own) - set(shard) - set(fresh_head))
    if missing:
        raise ckpt.CheckpointError(f"{tag_dir} lacks weights for: {', '.join(missing[:8])}"
                                   + (" ..." if len(missing) > 8 else ""))
    for key, value in own.items():
        if key in shard and shard[key].shape != value.shape:
            raise ckpt.CheckpointError(f"{tag_dir}: tensor '{key}' has shape {tuple(shard[key].shape)} in the "
                                       f"checkpoint but {tuple(value.shape)} in the model")
    state = {k: (shard[k] if k in shard else own[k]) for k in own}
    model.load_state_dict(state, strict=True)


def build_reference(cfg: Config, ps, policy_init: torch.nn.Module, device, ds_module) -> Optional[torch.nn.Module]:
    """The frozen reference policy for `reference.mode == live` (None otherwise).

    Sharded like the policy: the same tensor layout, and ZeRO-3 partitioned (inference-only DeepSpeed
    engine, no optimizer state) when the policy is.
    """
    if cfg.derived.reference_mode != "live":
        return None
    # A fresh module with the policy's initial weights (modules hold process groups: no deepcopy).
    ref = GPTModel(cfg, ps)
    ref.load_state_dict(policy_init.state_dict())
    return freeze_as_reference(cfg, ps, ref, device, ds_module)


def freeze_as_reference(cfg: Config, ps, ref: torch.nn.Module, device, ds_module) -> torch.nn.Module:
    """Turn `ref` (holding the policy's initial weights) into the frozen reference: `reference.load` weights
    when set, no gradients, eval mode, `train.precision` dtype on `device` (ZeRO-3: an inference-only
    DeepSpeed engine). Shared by the live reference and tools/precompute_reference.py, so precomputed
    log-probs come from exactly the model (and precision) a live reference would use.
    """
    if cfg.reference.load:
        load_weights_into(ref, ckpt.read_latest(cfg.reference.load), cfg, ps)
    ref.requires_grad_(False)
    ref.eval()
    if cfg.parallel.zero_stage == 3:
        ds_cfg = build_deepspeed_config(cfg, use_torch_adam=True, with_optimizer=False)
        engine, *_ = ds_module.initialize(model=ref, config=ds_cfg, mpu=ps)
        engine.eval()
        return engine
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.train.precision, torch.float32)
    return ref.to(device=device, dtype=dtype)
