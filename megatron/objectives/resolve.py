"""Objective-dependent config checks, run after `megatron.config` has validated the rest.

`megatron.config` never imports the objectives (it is the floor below); entry points call
`megatron.engines.run_config.load_run_config`, and the training loop and tools call `resolve_objective` again
(it is idempotent), so a Config built with plain `load_config` is resolved before anything reads
`derived.reference_mode` or `derived.data_kind`.
"""
from __future__ import annotations

from megatron.config import Config, ConfigError

from .registry import get_objective_class

# objective batch_kind -> the data kind it consumes (megatron.data reads derived.data_kind)
BATCH_KIND_TO_DATA = {"single": "sft", "pairwise": "pairwise", "unpaired": "unpaired",
                      "rollout": "prompts"}  # online RL: prompts (rollout.prompts_path), never data.train_path


def resolve_objective(cfg: Config) -> Config:
    """Validate `cfg` for its objective and fill `derived.reference_mode` (live|precomputed|none) and
    `derived.data_kind` (sft|pairwise|unpaired). Raises ConfigError naming the key to change."""
    obj_cls = get_objective_class(cfg.objective.name)
    needs_ref = obj_cls.needs_reference(cfg.objective)
    ref_mode = cfg.reference.mode
    if ref_mode == "auto":
        ref_mode = "live" if needs_ref else "none"
    if needs_ref and ref_mode == "none":
        raise ConfigError(f"objective '{cfg.objective.name}' needs a reference policy but reference.mode=none; "
                          "set reference.mode to live or precomputed, or objective.reference_free=true")
    obj_cls.validate(cfg)
    cfg.derived.reference_mode = ref_mode
    cfg.derived.data_kind = BATCH_KIND_TO_DATA[obj_cls.batch_kind]
    return cfg
