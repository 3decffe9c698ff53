"""Canonical tensors into and out of a live model, one parameter at a time.

Works on a plain `GPTModel`, a pipeline stage (names mapped by its `canonical_key`), a DeepSpeed engine
wrapping either, and ZeRO-3 partitioned parameters (`ds_id`): loading writes each rank's partition straight from
the tensor it read (no gather), saving gathers one parameter at a time (`GatheredParameters([p])`) and streams
it to a safetensors file, so no rank ever holds more than its training state plus one parameter.
"""
from __future__ import annotations

import contextlib
import os
from typing import Iterator, List, Optional, Tuple

import torch
from torch import nn

from megatron.config import Config

from .tensor_files import SafetensorsWriter
from .weights_io import CheckpointError

VALUE_HEAD_PREFIX = "value_head."


def unwrap(module: nn.Module) -> nn.Module:
    """The model inside a DeepSpeed engine (or the module itself)."""
    inner = getattr(module, "module", None)
    return inner if isinstance(inner, nn.Module) else module


def canonical_params(module: nn.Module) -> List[Tuple[str, nn.Parameter]]:
    """[(canonical name, parameter)] of a GPTModel, pipeline stage or engine, in state-dict order (a tied
    parameter once)."""
    m = unwrap(module)
    key = getattr(m, "canonical_key", None) or (lambda k: k)
    return [(key(name), p) for name, p in m.named_parameters()]


def is_zero3(p: torch.Tensor) -> bool:
    """Whether `p` is a ZeRO-3 partitioned parameter."""
    return hasattr(p, "ds_id")


def param_shape(p: torch.Tensor) -> Tuple[int, ...]:
    """The full (unpartitioned) shape of a parameter."""
    return tuple(p.ds_shape) if is_zero3(p) else tuple(p.shape)


def gathered(p: torch.Tensor):
    """Context in which a ZeRO-3 parameter holds its full data (collective over its partition group)."""
    if not is_zero3(p):
        return contextlib.nullcontext()
    import deepspeed
    return deepspeed.zero.GatheredParameters([p], modifier_rank=None)


def copy_partition(dst: torch.Tensor, value: torch.Tensor, part_rank: int) -> None:
    """Copy this rank's ZeRO-3 partition (elements [r*n, (r+1)*n) of the flattened `value`) into the flat `dst`
    (n elements); the tail past the tensor's end, padding of the last partition, is zeroed."""
    n = dst.numel()
    flat = value.reshape(-1)
    start = part_rank * n
    have = max(0, min(n, flat.numel() - start))
    with torch.no_grad():
        if have:
            dst.view(-1)[:have].copy_(flat[start:start + have])
        if have < n:
            dst.view(-1)[have:].zero_()


def set_param(p: nn.Parameter, value: torch.Tensor) -> None:
    """Set a parameter (its ZeRO-3 partition, or its data) from the full tensor `value` (converted to p's dtype)."""
    if tuple(value.shape) != param_shape(p):
        raise ValueError(f"shape {tuple(value.shape)} does not match the parameter's {param_shape(p)}")
    with torch.no_grad():
        if is_zero3(p):
            copy_partition(p.ds_tensor.data, value, p.ds_zero_partition_rank)
        else:
            p.data.copy_(value)


def load_from_source(module: nn.Module, source, cfg: Config, ps, where: str) -> List[str]:
    """Load every parameter of `module` with this rank's shard read from `source` (a CheckpointSource).

    A value head the checkpoint lacks keeps its current values (returned: the caller decides what they are);
    any other missing tensor, or a shape mismatch, raises CheckpointError naming `where` and the tensor. Reads
    one tensor at a time, straight into the parameter's memory when it is a plain fp32 CPU tensor.
    """
    params = canonical_params(module)
    kept = [k for k, _ in params if not source.has(k) and k.startswith(VALUE_HEAD_PREFIX)]
    missing = [k for k, _ in params if not source.has(k) and k not in kept]
    if missing:
        raise CheckpointError(f"{where} lacks weights for: {', '.join(missing[:8])}" + (" ..." if len(missing) > 8 else ""))
    from .weights_io import VOCAB_KEYS, canonical_shapes

    want_full = canonical_shapes(cfg, 1)
    direct = getattr(source, "read_shard_into", None)
    for key, p in params:
        if key in kept:
            continue
        saved_full = tuple(source.full_shape(key)) if hasattr(source, "full_shape") else tuple(want_full[key])
        skip = 1 if key in VOCAB_KEYS else 0  # vocabulary rows are re-padded, only the width must agree
        if saved_full[skip:] != tuple(want_full[key])[skip:]:
            raise CheckpointError(f"{where}: tensor '{key}' has shape {saved_full} in the checkpoint (tensor=1) but "
                                  f"{tuple(want_full[key])} in the model")
        if direct is not None and not is_zero3(p) and p.device.type == "cpu" \
                and p.dtype == torch.float32 and p.is_contiguous():
            with torch.no_grad():  # straight from the file into the parameter's memory: no copy of the shard
                direct(key, cfg, ps.tp_size, ps.tp_rank, p.data)
            continue
        value = source.read_shard(key, cfg, ps.tp_size, ps.tp_rank)
        if tuple(value.shape) != param_shape(p):
            raise CheckpointError(f"{where}: tensor '{key}' has shape {tuple(value.shape)} in the checkpoint (re-sharded "
                                  f"to tensor={ps.tp_size}) but {param_shape(p)} in the model")
        set_param(p, value)
        del value
    return kept


def iter_gathered(module: nn.Module) -> Iterator[Tuple[str, torch.Tensor]]:
    """(canonical name, full fp32 CPU tensor) of every parameter, one at a time (ZeRO-3: gathered, collective)."""
    for key, p in canonical_params(module):
        with gathered(p):
            yield key, p.detach().float().cpu()


def save_module_weights(module: nn.Module, path: Optional[str]) -> int:
    """Stream this rank's canonical fp32 weights into the safetensors file `path` (None: take part in the
    ZeRO-3 gathers without writing, as the other data-parallel ranks do). Returns bytes written."""
    params = canonical_params(module)
    writer = None
    if path is not None:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        writer = SafetensorsWriter(path, [(k, param_shape(p), torch.float32) for k, p in params])
    try:
        for key, value in iter_gathered(module):
            if writer is not None:
                writer.write(key, value)
    except BaseException:
        if writer is not None:
            writer.abort()
        raise
    if writer is None:
        return 0
    writer.close()
    return writer.bytes_written
