"""Resuming a training checkpoint at another layout: tensor, pipeline (or its split), data-parallel size or
ZeRO stage. The weights and the optimizer state are read through their canonical form (each rank only its
slices), the LR scheduler and step counters are restored, and rank 0 prints one line saying what was re-sharded.
The data position (`consumed_samples`, a global count) is layout-free; the RNG streams start fresh (per-rank
states do not map onto another world).
"""
from __future__ import annotations

import os
from typing import List

from megatron.config import Config

from .module_io import load_from_source
from .optimizer_state import load_optimizer_state
from .sharded_read import CheckpointSource
from .weights_io import read_config


def layout_changes(tag_dir: str, meta: dict, cfg: Config, ps, engine) -> List[str]:
    """What differs between the layout `tag_dir` was saved at and this run's, e.g. ['tensor 2 -> 1']."""
    saved = read_config(tag_dir)
    saved_dp = meta.get("data_parallel") or max(1, int(meta.get("world_size", 1)) // (meta["tensor"] * meta["pipeline"]))
    pairs = [("tensor", meta["tensor"], ps.tp_size), ("pipeline", meta["pipeline"], ps.pp_size),
             ("data", saved_dp, ps.dp_size), ("ZeRO stage", saved.parallel.zero_stage, cfg.parallel.zero_stage)]
    out = [f"{name} {a} -> {b}" for name, a, b in pairs if a != b]
    split = getattr(getattr(engine, "module", None), "blocks_per_stage", None)
    if split is not None and meta["pipeline"] == ps.pp_size and meta.get("blocks_per_stage", split) != list(split):
        out.append(f"blocks per stage {meta['blocks_per_stage']} -> {list(split)}")
    return out


def resume_resharded(tag_dir: str, meta: dict, cfg: Config, ps, engine, changes: List[str]) -> None:
    """Load weights and optimizer state of `tag_dir` (saved at another layout) into `engine`; print the line."""
    with CheckpointSource(tag_dir, meta=meta) as source:
        load_from_source(engine.module, source, cfg, ps, where=tag_dir)
    load_optimizer_state(engine, tag_dir, cfg, ps)
    if ps.rank == 0:
        print(f"resuming step {meta['step']} from {os.path.abspath(tag_dir)} re-sharded: {', '.join(changes)} "
              "(weights and optimizer state read through their canonical form; RNG streams start fresh)", flush=True)
