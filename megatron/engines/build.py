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
    """The model with its starting weights: seeded random init, or the weights in `init_dir` (any layout).

    With weights to load, the model is built on the meta device and only this rank's shard is allocated and
    read (no random draws, no full master weights); with ZeRO-3 every parameter is partitioned over the
    data-parallel group as it is created (`deepspeed.zero.Init`) and the weights go straight into the
    partitions. Without weights, the seeded init is the same at every tensor/pipeline layout.
    """
    torch.manual_seed(cfg.train.seed)
    if cfg.parallel.zero_stage == 3:
        with zero3_init(cfg, ps):
            # Per-layer seeds (DeepSpeed's seed_layers): the same initial weights at any pipeline split.
            model = GPTModel(cfg, ps, layer_seed=cfg.train.seed)
    elif init_dir is not None:
        model = build_deferred(cfg, ps)
    else:
        model = GPTModel(cfg, ps, layer_seed=cfg.train.seed)
    if init_dir is not None:
        load_weights_into(model, init_dir, cfg, ps)
    return model


def zero3_init(cfg: Config, ps):
    """`deepspeed.zero.Init` for this run: parameters created inside are partitioned over `ps.dp_group` at once.

    fp32 partitions whatever `train.precision` (the engine casts later), so the seeded initial values are those
    of every other layout (each layer still draws its master weight in fp32, one layer at a time).
    """
    import deepspeed

    ds_cfg = build_deepspeed_config(cfg, use_torch_adam=True, with_optimizer=False)
    return deepspeed.zero.Init(config_dict_or_path=ds_cfg, mpu=ps, dtype=torch.float32)


def build_deferred(cfg: Config, ps, device: Optional[torch.device] = None) -> torch.nn.Module:
    """`GPTModel(cfg, ps)` with allocated but UNINITIALISED parameters, for weights about to be loaded.

    Built on the meta device (shapes only: no random draws, no full-size master weights), then materialised
    with `to_empty` on `device` (default: this rank's). The model holds no buffers today; one added later
    could not be restored this way, so it is refused here rather than left uninitialised.
    """
    with torch.device("meta"):
        model = GPTModel(cfg, ps, layer_seed=cfg.train.seed)
    buffers = [name for name, _ in model.named_buffers()]
    if buffers:
        raise RuntimeError(f"build_deferred: GPTModel has buffers {buffers[:4]} that to_empty would leave "
                           "uninitialised; recompute them after to_empty in megatron/engines/build.py")
    return model.to_empty(device=device or device_for_rank())


def seeded_value_head(cfg: Config, ps) -> Dict[str, torch.Tensor]:
    """The value head's initial weights as `GPTModel(cfg, ps, layer_seed=train.seed)` draws them (the head is
    seeded `train.seed + num_layers + 2`): what a reward model starting from SFT weights begins with."""
    from megatron.model.stages import ValueHeadStage

    torch.manual_seed(cfg.train.seed + cfg.model.num_layers + 2)
    head = ValueHeadStage(cfg, ps)
    return {f"value_head.{k}": v.detach() for k, v in head.state_dict().items()}


def skip_single_replica_allreduce(engine, cfg: Config, ps) -> None:
    """With one data-parallel replica and plain fp32 ZeRO 0, turn off DeepSpeed's gradient all-reduce: over a
    group of one it changes nothing, yet it first copies every gradient into flat buffers of up to 500M
    elements (a transient second copy of all gradients: +0.6 GiB per rank for a 160M model)."""
    if ps.dp_size == 1 and cfg.parallel.zero_stage == 0 and cfg.train.precision == "fp32":
        engine.enable_backward_allreduce = False
        if hasattr(engine, "pipeline_enable_backward_allreduce"):
            engine.pipeline_enable_backward_allreduce = False


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

    Reads only this rank's slices, one tensor at a time, straight into the parameters (ZeRO-3: into this
    rank's partitions). A head the checkpoint lacks (a value head on an SFT model) gets its seeded
    initialisation (`seeded_value_head`); a head the model lacks (the SFT model's lm_head) is ignored. Every
    other tensor must be present with its shape.
    """
    from megatron.checkpoint.module_io import canonical_params, load_from_source, set_param
    from megatron.checkpoint.sharded_read import CheckpointSource

    with CheckpointSource(tag_dir) as source:
        kept = load_from_source(model, source, cfg, ps, where=tag_dir)
    if kept:
        fresh = seeded_value_head(cfg, ps)
        for key, p in canonical_params(model):
            if key in kept:
                set_param(p, fresh[key])


def build_reference(cfg: Config, ps, policy_init: torch.nn.Module, device, ds_module) -> Optional[torch.nn.Module]:
    """The frozen reference policy for `reference.mode == live` (None otherwise).

    Sharded like the policy: the same tensor layout, and ZeRO-3 partitioned (inference-only DeepSpeed
    engine, no optimizer state) when the policy is.
    """
    if cfg.derived.reference_mode != "live":
        return None
    # A fresh module with the policy's initial weights (modules hold process groups: no deepcopy), built
    # without an initialisation of its own: on the meta device, or partitioned (ZeRO-3) like the policy.
    if cfg.parallel.zero_stage == 3:
        with zero3_init(cfg, ps):
            ref = GPTModel(cfg, ps)
        copy_partitions(policy_init, ref)
    else:
        ref = build_deferred(cfg, ps, device=next(policy_init.parameters()).device)
        ref.load_state_dict(policy_init.state_dict())
    return freeze_as_reference(cfg, ps, ref, device, ds_module)


def copy_partitions(src: torch.nn.Module, dst: torch.nn.Module) -> None:
    """Copy every ZeRO-3 partition of `src` into the same-shaped partitioned `dst` (no gather)."""
    with torch.no_grad():
        for (name, a), (_, b) in zip(src.named_parameters(), dst.named_parameters()):
            if a.ds_shape != b.ds_shape or a.ds_tensor.numel() != b.ds_tensor.numel():
                raise RuntimeError(f"copy_partitions: '{name}' is partitioned differently in the two models")
            b.ds_tensor.data.copy_(a.ds_tensor.data)


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
