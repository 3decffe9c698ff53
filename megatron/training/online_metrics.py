"""Per-step metrics of the online loop, global over data-parallel ranks (tensor-parallel peers hold the same
rollouts and agree already).

    reward/mean, reward/std      total reward (after weights and shaping) over the step's completions; std with n-1
    reward/<source>              mean reward of each source over the completions it scored (NaN-free)
    response_length/mean         generated tokens per completion
    advantage/mean               mean advantage over the scored (trained) tokens
    rollout/kept_fraction        completions that train (DAPO dynamic sampling drops constant-reward groups)
    generate/tokens_per_s        generated tokens of all ranks / the slowest rank's generation time
    time/generate_s, time/score_s, time/prepare_s, time/train_s, time/step_s   wall-clock split of the step
"""
from __future__ import annotations

import math
from typing import Dict, List, Mapping

import torch
import torch.distributed as dist


def dp_reduce(values: Mapping[str, float], ps, op: str = "sum") -> Dict[str, float]:
    """`values` summed (op 'sum') or maximised (op 'max') over the data-parallel group, as float64."""
    if not values:
        return {}
    keys = sorted(values)
    t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64)
    if ps.dp_size > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX, group=ps.dp_group)
    return dict(zip(keys, t.tolist()))


def rollout_metrics(rewards: torch.Tensor, per_source: Mapping[str, torch.Tensor], lengths: torch.Tensor,
                    keep: torch.Tensor, ps) -> Dict[str, float]:
    """Reward and length metrics of the step (module docstring). Collective over the data-parallel group.

    rewards Float64[N] (totals), per_source name -> Float64[N] (NaN where unscored), lengths Long[N], keep Bool[N].
    """
    r = rewards.double()
    local = {"n": float(r.numel()), "sum": float(r.sum()), "sumsq": float((r * r).sum()),
             "len": float(lengths.sum()), "kept": float(keep.sum())}
    names: List[str] = list(per_source)
    for i, name in enumerate(names):
        s = per_source[name].double()
        ok = ~torch.isnan(s)
        local[f"src{i}_sum"] = float(s[ok].sum())
        local[f"src{i}_n"] = float(ok.sum())
    g = dp_reduce(local, ps)
    n = max(g["n"], 1.0)
    mean = g["sum"] / n
    var = (g["sumsq"] - n * mean * mean) / max(n - 1.0, 1.0)
    out = {"reward/mean": mean, "reward/std": math.sqrt(max(var, 0.0)), "response_length/mean": g["len"] / n,
           "rollout/kept_fraction": g["kept"] / n}
    for i, name in enumerate(names):
        out[f"reward/{name}"] = g[f"src{i}_sum"] / max(g[f"src{i}_n"], 1.0)
    return out


def token_mean(grid: torch.Tensor, mask: torch.Tensor, ps) -> float:
    """Mean of grid Float[N,T] over the positions where mask Float[N,T] is 1, on all data-parallel ranks."""
    g = dp_reduce({"s": float((grid.double() * mask.double()).sum()), "n": float(mask.sum())}, ps)
    return g["s"] / max(g["n"], 1.0)


def mean_metrics(rows: List[Mapping[str, float]]) -> Dict[str, float]:
    """Per-key mean over `rows` (keys missing in a row are averaged over the rows that have them)."""
    sums: Dict[str, float] = {}
    counts: Dict[str, int] = {}
    for row in rows:
        for k, v in row.items():
            sums[k] = sums.get(k, 0.0) + float(v)
            counts[k] = counts.get(k, 0) + 1
    return {k: sums[k] / counts[k] for k in sums}
