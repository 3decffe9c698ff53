"""The PPO critic: a value-head model with its own DeepSpeed engine (optimizer, scheduler, ZeRO stage, layout as
the policy's), trained beside the policy on the same micro-batches.

Starting weights: the reward model when `reward.model` is set (its model section decides the shape; a reward model
already predicts how good a completion is), else the policy's own starting weights (the trunk of `checkpoint.load`,
or the seeded init) with a freshly seeded value head. A resumed run restores the critic's full DeepSpeed state
from `<tag>/critic/` of the run's checkpoint (saved beside the policy's `deepspeed/`, same layout only).
"""
from __future__ import annotations

import copy
import os
from typing import Optional, Tuple

import torch
import torch.distributed as dist

from megatron.checkpoint import weights_io as wio
from megatron.checkpoint.weights_io import CheckpointError
from megatron.config import Config, ConfigError, derive_and_validate

from .build import build_policy, param_groups
from .deepspeed_config import build_deepspeed_config
from .schedules import lambda_lr_factory

CRITIC_TAG = "critic"  # DeepSpeed tag of the critic's state inside a checkpoint tag directory


def critic_start(cfg: Config, policy_init: Optional[str]) -> Tuple[Optional[str], str]:
    """(tag dir of the critic's starting weights or None for the seeded init, a word on where they come from)."""
    if cfg.reward.model:
        return wio.resolve_tag_dir(cfg.reward.model), f"reward model {cfg.reward.model}"
    return policy_init, (f"policy weights {policy_init}" if policy_init else "the policy's seeded init")


def critic_config(cfg: Config, init_dir: Optional[str]) -> Config:
    """The critic's Config: the policy's, with a value head and, when starting from a reward model, that model's
    shape (its vocabulary must be the policy's: it reads the same token ids)."""
    critic = copy.deepcopy(cfg)
    if init_dir is not None and cfg.reward.model:
        saved = wio.read_config(init_dir)
        if saved.model.vocab_size != cfg.model.vocab_size:
            raise ConfigError(f"key 'reward.model': the critic starts from {init_dir}, whose model.vocab_size="
                              f"{saved.model.vocab_size} differs from the policy's {cfg.model.vocab_size}; the "
                              "critic reads the policy's token ids, so use a reward model of the same tokenizer")
        critic.model = copy.deepcopy(saved.model)
        critic.model.max_seq_len = cfg.model.max_seq_len
    critic.model.value_head = True
    critic.reference.load = None
    return derive_and_validate(critic, cfg.derived.world_size)


def build_critic(cfg: Config, ps, policy_init: Optional[str], ds_module, total_optimizer_steps: int):
    """(critic DeepSpeed engine, critic Config): built, loaded and wrapped like the policy (same optimizer keys,
    LR schedule over `total_optimizer_steps`)."""
    init_dir, _ = critic_start(cfg, policy_init)
    ccfg = critic_config(cfg, init_dir)
    model = build_policy(ccfg, ps, init_dir)
    ds_cfg = build_deepspeed_config(ccfg, use_torch_adam=not torch.cuda.is_available())
    engine, *_ = ds_module.initialize(model=model, model_parameters=param_groups(model, ccfg.optimizer.weight_decay),
                                      config=ds_cfg, lr_scheduler=lambda_lr_factory(ccfg.optimizer,
                                                                                    total_optimizer_steps), mpu=ps)
    return engine, ccfg


def save_critic(engine, tag_dir: str) -> None:
    """Write the critic's DeepSpeed state into `tag_dir/critic/` (collective; ends with a barrier so the tag
    directory is complete before anyone commits it)."""
    engine.save_checkpoint(tag_dir, tag=CRITIC_TAG, save_latest=False)
    if dist.is_initialized():
        dist.barrier()


def load_critic(engine, tag_dir: str) -> None:
    """Restore the critic's module, optimizer and scheduler from `tag_dir/critic/` (collective)."""
    if not os.path.isdir(os.path.join(tag_dir, CRITIC_TAG)):
        raise CheckpointError(f"{tag_dir} has no critic state ({CRITIC_TAG}/); it was not saved by a PPO run, so this "
                          "run cannot resume from it in full; start a new stage from its weights with "
                          "checkpoint.load_optimizer=false")
    path, _ = engine.load_checkpoint(tag_dir, tag=CRITIC_TAG, load_optimizer_states=True,
                                     load_lr_scheduler_states=True)
    if path is None:
        raise CheckpointError(f"DeepSpeed could not load the critic from {os.path.join(tag_dir, CRITIC_TAG)}")
