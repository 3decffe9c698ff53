"""Validate a Config and compute its derived values once.

    data_parallel = world / (tensor * pipeline)
    grad_accum    = global_batch / (micro_batch * data_parallel)
    padded_vocab  = vocab rounded up to a multiple of 128 * tensor
"""
from __future__ import annotations

import math
from typing import Optional

from .load import ConfigError, _suggest
from .schema import Config

_CHOICES = {
    "model.norm": ("rmsnorm", "layernorm"),
    "model.activation": ("swiglu", "gelu"),
    "model.attention": ("auto", "eager", "sdpa", "segments", "flash"),
    "model.kernels": ("auto", "eager", "fused"),
    "model.kernel_ops.norm": ("auto", "eager", "fused", "compiled"),
    "model.kernel_ops.rotary": ("auto", "eager", "fused", "compiled"),
    "model.kernel_ops.mlp": ("auto", "eager", "fused", "compiled"),
    "model.kernel_ops.head": ("auto", "eager", "fused"),
    "train.precision": ("fp32", "bf16", "fp16"),
    "optimizer.schedule": ("constant", "linear", "cosine"),
    "data.format": ("auto", "jsonl", "json", "parquet", "csv", "hf_disk", "indexed"),
    "data.kind": ("auto", "sft", "pairwise", "unpaired"),
    "data.on_bad_record": ("error", "skip"),
    "reference.mode": ("auto", "live", "precomputed", "none"),
    "launcher.type": ("local", "hostfile", "slurm", "openmpi", "mpich"),
    "parallel.backend": ("auto", "gloo", "nccl"),
}


def _get(cfg: Config, dotted: str):
    obj = cfg
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


def pad_vocab(vocab_size: int, tensor: int, multiple: int = 128) -> int:
    """Round `vocab_size` up so each of `tensor` shards holds a multiple of `multiple` rows."""
    step = multiple * tensor
    return int(math.ceil(vocab_size / step) * step)


def default_ffn(hidden: int, activation: str) -> int:
    """Llama's 2/3 * 4h rounded to 64 for SwiGLU; 4h for GeLU."""
    if activation == "swiglu":
        return int(64 * math.ceil((8 * hidden / 3) / 64))
    return 4 * hidden


def _even_split(n: int, parts: int):
    return [n // parts + (i < n % parts) for i in range(parts)]


def derive_and_validate(cfg: Config, world_size: Optional[int] = None) -> Config:
    """Check `cfg` for impossible values and fill `cfg.derived`. Returns cfg."""
    for key, choices in _CHOICES.items():
        value = _get(cfg, key)
        if value not in choices:
            raise ConfigError(f"key '{key}': {value!r} is not one of {', '.join(choices)}{_suggest(str(value), choices)}")

    m, p, t, o = cfg.model, cfg.parallel, cfg.train, cfg.optimizer
    for key in ("model.hidden_size", "model.num_layers", "model.num_attention_heads", "model.vocab_size",
                "model.max_seq_len", "parallel.tensor", "parallel.pipeline", "train.micro_batch_size",
                "train.global_batch_size", "train.iters", "launcher.num_gpus", "launcher.num_nodes"):
        if _get(cfg, key) < 1:
            raise ConfigError(f"key '{key}': must be >= 1, got {_get(cfg, key)!r}")
    if p.zero_stage not in (0, 1, 2, 3):
        raise ConfigError(f"key 'parallel.zero_stage': must be 0, 1, 2 or 3, got {p.zero_stage!r}")
    if not 0.0 <= m.rotary_pct <= 1.0:
        raise ConfigError(f"key 'model.rotary_pct': must be in [0, 1], got {m.rotary_pct!r}")
    if o.lr < 0 or o.min_lr < 0 or o.min_lr > o.lr:
        raise ConfigError(f"keys 'optimizer.lr'/'optimizer.min_lr': need 0 <= min_lr <= lr, got lr={o.lr}, min_lr={o.min_lr}")

    if m.hidden_size % m.num_attention_heads:
        raise ConfigError(f"model.hidden_size={m.hidden_size} is not divisible by "
                          f"model.num_attention_heads={m.num_attention_heads}")
    kv = m.num_kv_heads or m.num_attention_heads
    if m.num_attention_heads % kv:
        raise ConfigError(f"model.num_attention_heads={m.num_attention_heads} is not divisible by "
                          f"model.num_kv_heads={kv}")
    ffn = m.ffn_hidden_size or default_ffn(m.hidden_size, m.activation)
    head_dim = m.hidden_size // m.num_attention_heads
    rot = int(head_dim * m.rotary_pct)
    if rot % 2:
        raise ConfigError(f"model.rotary_pct={m.rotary_pct} gives an odd rotary dim {rot} of head dim {head_dim}; "
                          "pick a fraction that makes it even")

    for name, value in (("model.num_attention_heads", m.num_attention_heads), ("model.num_kv_heads", kv),
                        ("model.ffn_hidden_size", ffn)):
        if value % p.tensor:
            raise ConfigError(f"{name}={value} is not divisible by parallel.tensor={p.tensor}; "
                              f"choose a tensor size that divides {value}")
    if p.pipeline > m.num_layers:
        raise ConfigError(f"parallel.pipeline={p.pipeline} exceeds model.num_layers={m.num_layers}")
    if p.pipeline > 1 and p.zero_stage > 1:
        raise ConfigError(f"parallel.zero_stage={p.zero_stage} cannot be combined with parallel.pipeline="
                          f"{p.pipeline}: DeepSpeed's pipeline engine supports ZeRO stage 0 or 1; "
                          "set parallel.zero_stage=1")
    if p.pipeline_partition not in ("parameters", "uniform"):
        try:
            counts = [int(x) for x in p.pipeline_partition.split(",")]
        except ValueError:
            counts = []
        if len(counts) != p.pipeline or sum(counts) != m.num_layers or min(counts, default=0) < 1:
            raise ConfigError(f"parallel.pipeline_partition={p.pipeline_partition!r}: use 'parameters', 'uniform' or "
                              f"{p.pipeline} comma-separated block counts (each >= 1) summing to model.num_layers="
                              f"{m.num_layers}, e.g. '{','.join(str(c) for c in _even_split(m.num_layers, p.pipeline))}'")
    if p.sequence_parallel and m.max_seq_len % p.tensor:
        raise ConfigError(f"parallel.sequence_parallel needs model.max_seq_len={m.max_seq_len} divisible by "
                          f"parallel.tensor={p.tensor}")

    world = world_size if world_size is not None else cfg.launcher.num_gpus * cfg.launcher.num_nodes
    mp = p.tensor * p.pipeline
    if world % mp:
        raise ConfigError(f"world size {world} is not divisible by parallel.tensor * parallel.pipeline = "
                          f"{p.tensor} * {p.pipeline} = {mp}; use a world size that is a multiple of {mp}")
    dp = world // mp
    if t.global_batch_size % (t.micro_batch_size * dp):
        raise ConfigError(
            f"train.global_batch_size={t.global_batch_size} is not divisible by train.micro_batch_size * "
            f"data_parallel = {t.micro_batch_size} * {dp} = {t.micro_batch_size * dp} "
            f"(data_parallel = world {world} / (tensor {p.tensor} * pipeline {p.pipeline}))")

    # Objective-dependent checks (the reference an objective needs, its own keys) live with the objectives
    # (megatron.objectives.resolve_objective), one floor up: config never imports them. Until they run,
    # reference.mode 'auto' stays 'auto' in derived.reference_mode.
    ref_mode = cfg.reference.mode

    d = cfg.derived
    d.world_size = world
    d.data_parallel = dp
    d.grad_accum = t.global_batch_size // (t.micro_batch_size * dp)
    d.padded_vocab_size = pad_vocab(m.vocab_size, p.tensor)
    d.num_kv_heads = kv
    d.ffn_hidden_size = ffn
    d.head_dim = head_dim
    d.reference_mode = ref_mode
    return cfg
