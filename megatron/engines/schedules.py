"""Learning-rate schedules: constant, linear and cosine decay, each with linear warmup and a floor."""
from __future__ import annotations

import math

from megatron.config import OptimizerConfig


def lr_at(step: int, opt: OptimizerConfig, total_iters: int) -> float:
    """Learning rate (absolute units) to use for optimizer step `step` (0-based) of `total_iters`.

    Warmup rises linearly from lr/warmup to lr over `warmup_iters` steps; afterwards `constant` keeps lr,
    `linear` and `cosine` decay to `min_lr` at the last step (cosine: min + (lr-min)*(1+cos(pi*t))/2).
    """
    if opt.warmup_iters > 0 and step < opt.warmup_iters:
        return opt.lr * (step + 1) / opt.warmup_iters
    if opt.schedule == "constant":
        return opt.lr
    decay_steps = max(1, total_iters - opt.warmup_iters - 1)
    frac = min(1.0, max(0.0, (step - opt.warmup_iters) / decay_steps))
    if opt.schedule == "linear":
        return opt.lr - (opt.lr - opt.min_lr) * frac
    return opt.min_lr + (opt.lr - opt.min_lr) * 0.5 * (1.0 + math.cos(math.pi * frac))


def lambda_lr_factory(opt: OptimizerConfig, total_iters: int):
    """A callable `optimizer -> torch LambdaLR` giving `lr_at` (DeepSpeed accepts a scheduler factory)."""
    import torch

    def build(optimizer):
        base = opt.lr if opt.lr > 0 else 1.0
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_at(s, opt, total_iters) / base)

    return build
