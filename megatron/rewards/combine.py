"""Several reward sources at once, weighted: `build_reward_set(cfg)` from the `reward:` section, and
`RewardSet.score(...)`, the one call the online loop makes per step.

    total[i] = sum over the sources that score completion i of weight_s * reward_s[i]

(TRL's nansum over functions: a source returning None for i does not count; a completion no source scores gets
total 0 and scored False, so the loop can drop it.)
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional, Sequence

import torch

from megatron.config import ConfigError

from .registry import load_reward_function
from .sources import FunctionReward, RewardSource


@dataclass
class RewardScores:
    """total Float64[N]; per_source name -> Float64[N] (NaN = not scored by it); scored Bool[N]."""
    total: torch.Tensor
    per_source: Dict[str, torch.Tensor]
    scored: torch.Tensor


class RewardSet:
    """Reward sources and their weights."""

    def __init__(self, sources: Sequence[RewardSource], weights: Optional[Sequence[float]] = None):
        """sources: at least one; weights: one per source (default 1 each)."""
        if not sources:
            raise ValueError("RewardSet needs at least one reward source")
        weights = [1.0] * len(sources) if not weights else [float(w) for w in weights]
        if len(weights) != len(sources):
            raise ValueError(f"RewardSet: {len(weights)} weights for {len(sources)} sources")
        names = [s.name for s in sources]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ConfigError(f"key 'reward.function': {dup[0]!r} is listed twice")
        self.sources = list(sources)
        self.weights = weights

    @property
    def names(self) -> List[str]:
        """The sources' names, in order."""
        return [s.name for s in self.sources]

    def score(self, prompts: Sequence[str], completions: Sequence[str], columns: Mapping[str, Sequence[Any]],
              token_ids: Optional[Sequence[Sequence[int]]] = None,
              prompt_index: Optional[Sequence[int]] = None) -> RewardScores:
        """Score N completions with every source (arguments as `RewardSource.score`) and combine them."""
        n = len(completions)
        total = torch.zeros(n, dtype=torch.float64)
        scored = torch.zeros(n, dtype=torch.bool)
        per_source: Dict[str, torch.Tensor] = {}
        for source, w in zip(self.sources, self.weights):
            r = source.score(prompts, completions, columns, token_ids, prompt_index).to(torch.float64).reshape(-1)
            if r.numel() != n:
                raise ValueError(f"reward source '{source.name}' scored {r.numel()} of {n} completions")
            per_source[source.name] = r
            ok = ~torch.isnan(r)
            total = total + torch.where(ok, w * r, torch.zeros_like(r))
            scored |= ok
        return RewardScores(total=total, per_source=per_source, scored=scored)


def build_reward_set(cfg: Any, model_source: Optional[RewardSource] = None) -> RewardSet:
    """The `reward:` section as a RewardSet: each `reward.function` entry (built-in or file), then the reward model.

    cfg: the full Config (or its `reward` section). model_source: the online loop's reward-model source when
    `reward.model` is set (it runs on the loop's engine); required then.
    """
    rcfg = getattr(cfg, "reward", cfg)
    sources: List[RewardSource] = [FunctionReward(fn, name) for name, fn in
                                   (load_reward_function(spec, rcfg) for spec in rcfg.function)]
    if rcfg.model:
        if model_source is None:
            raise ConfigError(f"key 'reward.model': {rcfg.model!r} is scored on the online loop's reward-model "
                              "engine; build it there and pass it as model_source")
        sources.append(model_source)
    elif model_source is not None:
        raise ValueError("build_reward_set: model_source given but reward.model is not set")
    if not sources:
        raise ConfigError("section 'reward': no reward source; set reward.function and/or reward.model")
    if rcfg.weights and len(rcfg.weights) != len(sources):
        raise ConfigError(f"key 'reward.weights': {len(rcfg.weights)} weights for {len(sources)} reward sources")
    return RewardSet(sources, rcfg.weights or None)
