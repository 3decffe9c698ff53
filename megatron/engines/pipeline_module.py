"""The model as a DeepSpeed `PipelineModule` on this rank's stage, and its canonical parameter names.

`build_pipeline_module(cfg, ps)` cuts `megatron.model.layer_specs(cfg, ps)` at the explicit boundaries of
`pipeline_partition.stage_boundaries` over DeepSpeed's `PipeModelDataParallelTopology(num_pp, num_mp=tensor,
num_dp)` (the same rank layout as `ParallelState`). Layers are seeded `train.seed + spec index` while they are
built (DeepSpeed's seed_layers), which is what `GPTModel(cfg, ps, layer_seed=train.seed)` does too, so
a pipelined model starts from the same weights as the unpipelined one at any split.

A PipelineModule names parameters by spec index (`'3.attention.qkv.weight'`) and keeps tied modules under
`'tied_modules.<key>.'`; `canonical_state_dict` / `load_canonical` translate with
`megatron.model.canonical_prefix`, so checkpoints hold the canonical names of docs/ARCHITECTURE.md.
"""
from __future__ import annotations

import os
from typing import Dict, List

import torch
from deepspeed.accelerator import get_accelerator
from deepspeed.pipe import PipelineModule
from deepspeed.runtime.pipe.topology import PipeModelDataParallelTopology

from megatron.config import Config
from megatron.model import CHECKPOINTABLE_LAYERS, activation_checkpoint_func, canonical_prefix, layer_specs
from megatron.model.specs import TIED_EMBEDDING_KEY

from .pipeline_partition import blocks_per_stage, stage_boundaries

TIED_PREFIX = f"tied_modules.{TIED_EMBEDDING_KEY}."


class StagedPipelineModule(PipelineModule):
    """A PipelineModule with explicit stage boundaries (`parts`) instead of a DeepSpeed partition method.

    Extra attributes: `blocks_per_stage` (the split, recorded in checkpoints) and `model_cfg` (for names).
    """

    def __init__(self, layers, parts: List[int], blocks: List[int], cfg: Config, deferred: bool = False, **kwargs):
        # Read by _partition_layers and _build, which PipelineModule.__init__ calls before it returns.
        object.__setattr__(self, "_explicit_parts", list(parts))
        object.__setattr__(self, "_deferred", deferred)
        super().__init__(layers, partition_method="explicit", **kwargs)
        self.blocks_per_stage = list(blocks)
        self.model_cfg = cfg

    def _partition_layers(self, method: str = "explicit") -> None:
        self.parts = list(self._explicit_parts)
        stage = self._topo.get_coord(self.global_rank).pipe
        self._set_bounds(start=self.parts[stage], stop=self.parts[stage + 1])

    def _build(self) -> None:
        """DeepSpeed's layer build; `deferred`: on the meta device, then allocated uninitialised (`to_empty`),
        for weights about to be loaded: no random draws and no full-size master weights on any rank."""
        if not self._deferred:
            super()._build()
            return
        with torch.device("meta"):
            super()._build()
        buffers = [name for name, _ in self.named_buffers()]
        if buffers:
            raise RuntimeError(f"deferred pipeline build: buffers {buffers[:4]} would stay uninitialised")
        self.to_empty(device=get_accelerator().device_name(int(os.environ.get("LOCAL_RANK", 0))))

    def canonical_key(self, key: str) -> str:
        """PipelineModule state-dict key -> canonical name ('3.mlp.fc1.weight' -> 'blocks.2.mlp.fc1.weight')."""
        if key.startswith(TIED_PREFIX):
            return "embedding." + key[len(TIED_PREFIX):]
        index, rest = key.split(".", 1)
        return canonical_prefix(int(index), self.model_cfg) + rest

    def canonical_state_dict(self) -> Dict[str, torch.Tensor]:
        """This stage's fp32 CPU state dict under canonical names (the tied embedding copy of the last
        stage appears as 'embedding.word_embeddings.weight', as weights_io.split_pp expects)."""
        return {self.canonical_key(k): v.detach().float().clone().cpu() for k, v in self.state_dict().items()}

    def load_canonical(self, shard: Dict[str, torch.Tensor]) -> None:
        """Load a canonical state dict of this tensor rank (any superset of this stage's keys)."""
        own = self.state_dict()
        missing = [self.canonical_key(k) for k in own if self.canonical_key(k) not in shard]
        if missing:
            raise KeyError(f"weights lack {', '.join(missing[:8])}" + (" ..." if len(missing) > 8 else ""))
        new = {}
        for k, v in own.items():
            src = shard[self.canonical_key(k)]
            if tuple(src.shape) != tuple(v.shape):
                raise ValueError(f"tensor '{self.canonical_key(k)}' has shape {tuple(src.shape)} in the weights "
                                 f"but {tuple(v.shape)} on pipeline stage {self.stage_id}")
            new[k] = src.to(dtype=v.dtype)
        self.load_state_dict(new, strict=True)


def topology(cfg: Config) -> PipeModelDataParallelTopology:
    """DeepSpeed's (pipe, data, model) topology of the configured grid: rank = pp*(dp*tp) + dp*tp + tp."""
    return PipeModelDataParallelTopology(num_pp=cfg.parallel.pipeline, num_mp=cfg.parallel.tensor,
                                         num_dp=cfg.derived.data_parallel)


def build_pipeline_module(cfg: Config, ps, loss_fn=None, activation_checkpointing: bool = True,
                          deferred: bool = False) -> StagedPipelineModule:
    """This rank's stage of the model as a StagedPipelineModule (collective: every rank must call it).

    Activation checkpointing (cfg.parallel.activation_checkpointing) recomputes every
    `checkpoint_num_layers` consecutive layers of the stage whose layers are all transformer blocks, with the
    model's non-reentrant checkpoint function (it restores the RNG, so dropout is recomputed identically);
    `activation_checkpointing=False` turns it off whatever the config says (a frozen reference).
    Shapes may change between micro-batches (`dynamic_shape`): packed micro-batches have varying rows.
    `deferred=True`: parameters allocated but not initialised (weights are loaded next; see `_build`).
    """
    bps = blocks_per_stage(cfg)
    on = activation_checkpointing and cfg.parallel.activation_checkpointing
    interval = cfg.parallel.checkpoint_num_layers if on else 0
    # no_grad: DeepSpeed broadcasts tied weights in place while building; outside no_grad autograd would
    # record that broadcast into the parameter's history and backpropagate through it.
    with torch.no_grad():
        module = StagedPipelineModule(
            layer_specs(cfg, ps), parts=stage_boundaries(bps), blocks=bps, cfg=cfg, deferred=deferred,
            topology=topology(cfg),
            loss_fn=loss_fn, seed_layers=True, seed_fn=torch.manual_seed, base_seed=cfg.train.seed,
            activation_checkpoint_interval=interval, activation_checkpoint_func=activation_checkpoint_func,
            checkpointable_layers=list(CHECKPOINTABLE_LAYERS), dynamic_shape=True)
    # seed_layers is only wanted for initialisation: in forward DeepSpeed would re-seed the default RNG
    # before every layer of every micro-batch, which would tie dropout to the stage layout.
    module.seed_layers = False
    if module.stage_id != ps.pp_rank:
        raise RuntimeError(f"DeepSpeed places rank {ps.rank} on stage {module.stage_id} but ParallelState says "
                           f"{ps.pp_rank}; the two rank layouts disagree")
    return module


def load_weights_into_stage(module: StagedPipelineModule, tag_dir: str, cfg: Config, ps) -> None:
    """Load canonical weights of any tensor/pipeline layout from `tag_dir` into this rank's stage, reading only
    this stage's tensors and this tensor rank's slices of them, one tensor at a time."""
    from megatron.checkpoint.module_io import load_from_source
    from megatron.checkpoint.sharded_read import CheckpointSource

    with CheckpointSource(tag_dir) as source:
        kept = load_from_source(module, source, cfg, ps, where=tag_dir)
    if kept:
        from .build import seeded_value_head
        fresh = seeded_value_head(cfg, ps)
        with torch.no_grad():
            for key, p in module.named_parameters():
                if module.canonical_key(key) in kept:
                    p.copy_(fresh[module.canonical_key(key)])
