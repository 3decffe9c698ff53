"""Derive DeepSpeed's JSON config from ours (one source of truth; `deepspeed:` passes extra keys)."""
from __future__ import annotations

import copy
from typing import Any, Dict

from megatron.config import Config


def _merge(base: Dict[str, Any], extra: Dict[str, Any]) -> Dict[str, Any]:
    out = copy.deepcopy(base)
    for k, v in extra.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def build_deepspeed_config(cfg: Config, use_torch_adam: bool, with_optimizer: bool = True) -> Dict[str, Any]:
    """DeepSpeed config dict for the policy engine (or, with `with_optimizer=False`, a frozen reference).

    Batch sizes come from `cfg.derived` (micro batch per rank, accumulation steps); ZeRO stage, precision
    and clipping from `cfg.parallel`/`cfg.train`/`cfg.optimizer`; `cfg.deepspeed` is merged last.
    """
    t, o = cfg.train, cfg.optimizer
    ds: Dict[str, Any] = {
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": cfg.derived.grad_accum,
        "train_batch_size": t.micro_batch_size * cfg.derived.grad_accum * cfg.derived.data_parallel,
        "steps_per_print": 10**9,  # we log ourselves
        "wall_clock_breakdown": False,
        "zero_optimization": {"stage": cfg.parallel.zero_stage},
        "zero_allow_untested_optimizer": True,
    }
    if cfg.parallel.zero_stage >= 1:
        # Communication buckets sized to the model (transformers' "auto" values), not DeepSpeed's 5e8 elements:
        # those are flat fp32 buffers of 2 GiB per rank, more than a 160M model's whole sharded state.
        h2 = cfg.model.hidden_size ** 2
        ds["zero_optimization"]["reduce_bucket_size"] = h2
        if cfg.parallel.zero_stage < 3:
            ds["zero_optimization"]["allgather_bucket_size"] = h2
    if cfg.parallel.zero_stage == 3:
        # Gathered parameters are released after use: DeepSpeed's defaults (1e9 live parameters, reuse distance
        # 1e9) keep every gathered layer of a model below 1e9 parameters alive from the second step on, i.e. the
        # whole model on every rank. ~16 h^2 is a bit more than one transformer block (12 h^2).
        ds["zero_optimization"].update({"stage3_param_persistence_threshold": 0,
                                         "stage3_prefetch_bucket_size": int(0.9 * h2),
                                         "stage3_max_live_parameters": 16 * h2,
                                         "stage3_max_reuse_distance": 16 * h2,
                                         "stage3_gather_16bit_weights_on_model_save": False})
    if t.precision == "bf16":
        ds["bf16"] = {"enabled": True}
    elif t.precision == "fp16":
        ds["fp16"] = {"enabled": True, "loss_scale": 0, "initial_scale_power": t.fp16_initial_loss_scale_power,
                      "loss_scale_window": 1000, "hysteresis": 2, "min_loss_scale": 1}
    if with_optimizer:
        ds["gradient_clipping"] = o.grad_clip
        ds["optimizer"] = {"type": "AdamW", "params": {
            "lr": o.lr, "betas": [o.beta1, o.beta2], "eps": o.eps, "weight_decay": o.weight_decay,
            "torch_adam": use_torch_adam, "adam_w_mode": True}}
        if use_torch_adam:  # torch's fused kernel: ~4x less optimizer time on CPU than the per-tensor loop
            ds["optimizer"]["params"]["fused"] = True
    else:
        ds.pop("gradient_clipping", None)
    return _merge(ds, cfg.deepspeed)
