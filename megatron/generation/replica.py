"""The module generation runs on: the model itself, or a plain replica for ZeRO-3 / sequence-parallel models.

ZeRO-3 partitions every parameter across the data-parallel group, and its module hooks gather them again
around every submodule call, collectively; decoding through those hooks would gather the whole model once per
token and deadlock when data-parallel ranks generate different numbers of tokens. Instead the parameters are
gathered ONCE per generation phase (`deepspeed.zero.GatheredParameters` over the module), copied into a
hook-free replica built on the meta device (no init cost, no RNG consumed) and released; the replica holds
this rank's tensor-parallel shards only. A sequence-parallel model (it splits the sequence across the
tensor-parallel group, impossible for one-token steps) gets the same replica with sequence parallelism off:
the weights are identical.
"""
from __future__ import annotations

import contextlib
import copy
from typing import Iterator

import torch

from megatron.config import ConfigError
from megatron.model import GPTModel


def unwrap(model) -> torch.nn.Module:
    """The GPTModel inside a DeepSpeed engine (its `.module`), or `model` itself."""
    inner = getattr(model, "module", model)
    if not isinstance(inner, GPTModel):
        raise ConfigError(f"generation needs a GPTModel (or a DeepSpeed engine around one), got "
                          f"{type(inner).__name__}; a pipeline engine cannot generate: set parallel.pipeline=1")
    return inner


def is_zero3(module: torch.nn.Module) -> bool:
    """Whether the parameters are ZeRO-3 partitioned (DeepSpeed marks them with `ds_id`)."""
    return any(hasattr(p, "ds_id") for p in module.parameters())


def _plain_replica(cfg, ps, state) -> GPTModel:
    """A GPTModel without sequence parallelism holding `state` (this rank's canonical tensors, taken over)."""
    gen_cfg = copy.deepcopy(cfg)
    gen_cfg.parallel.sequence_parallel = False
    gen_cfg.parallel.activation_checkpointing = False
    with torch.device("meta"):
        replica = GPTModel(gen_cfg, ps)
    replica.load_state_dict(state, strict=True, assign=True)  # rotary tables are CPU tensors even on meta
    return replica.eval()


@contextlib.contextmanager
def generation_model(model, cfg, ps) -> Iterator[GPTModel]:
    """Yield a module that `generate` can decode with (eval mode; training mode restored on exit).

    Plain models are used as they are. ZeRO-3 models: collective over the data-parallel group (every rank
    enters once per generation phase, whatever its number of prompts). Sequence parallel: a replica.
    """
    inner = unwrap(model)
    zero3 = is_zero3(inner)
    if not zero3 and inner.embedding.sp_group is None:
        was_training = inner.training
        inner.eval()
        try:
            yield inner
        finally:
            inner.train(was_training)
        return
    if zero3:
        import deepspeed
        params = list(inner.parameters())
        with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
            state = {name: p.data.detach().clone() for name, p in inner.named_parameters()}
    else:
        state = {name: p.detach() for name, p in inner.named_parameters()}
    yield _plain_replica(cfg, ps, state)
