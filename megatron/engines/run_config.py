"""The one way entry points (train.py, deepy.py, tools) load a run's config: YAML + `--set` overrides,
validated by `megatron.config`, then by the configured objective (`megatron.objectives.resolve_objective`)."""
from __future__ import annotations

from typing import Optional, Sequence

from megatron.config import Config, load_config
from megatron.objectives.resolve import resolve_objective


def load_run_config(paths: Sequence[str] = (), overrides: Sequence[str] = (),
                    world_size: Optional[int] = None, validate: bool = True) -> Config:
    """`megatron.config.load_config` plus the objective's checks (when `validate`); same arguments."""
    cfg = load_config(paths, overrides, world_size=world_size, validate=validate)
    return resolve_objective(cfg) if validate else cfg
