"""Advantage estimators of the online RL objectives: a registry with ONE signature, a vectorised implementation and
a plain-loop reference twin for each.

    estimator(rewards, group_ids, seq_id, mask, cfg, *, kl=None, values=None, group=None) -> AdvantageOutput

    rewards    Float[N]   scalar reward of each completion (after reward weights and penalties)
    group_ids  Long[N]    the prompt of each completion (any integers; completions of one prompt share it)
    seq_id     Long[*]    per token position: the completion 0..N-1 it belongs to, -1 for none (padding)
    mask       Float[*]   per token position: 1 where the token is scored (a response token), else 0
    cfg        ObjectiveConfig (scale_rewards, kl_coef, discount, lam, group_baseline)
    kl         Float[*]   per-token KL estimate log(pi_old / pi_ref) (or k2/k3) at rollout time. When given, the KL
                          is part of the reward: sequence-level estimators use R - kl_coef * sum_t kl_t, token-level
                          ones add -kl_coef * kl_t to each token's reward. Objectives pass it only when their KL is
                          in the reward (`objective.kl_in_reward`).
    values     Float[*]   per-token critic values at rollout time (gae only)
    group      a torch.distributed process group (the data-parallel group) for batch-wide statistics, or None

Token tensors may have any shape (the packed micro-batch [B,S], a concatenation of micro-batches flattened to [L]
with sequence ids offset, or right-padded [N,T]); each completion's positions must run forward in time along the
flattened order. Only scored positions are time steps: values, KL and rewards at unscored positions never change
a result (multi-turn masks carry the recursions across them, as verl's GAE does). AdvantageOutput.advantages has
the shape of `mask` (0 at unscored positions); `returns` (gae, reinforce_pp) is the target of a critic or the
un-whitened return. Rewards at the last scored token of each completion (the end of the episode).

Estimators:
  grpo          (R - mean_g R) / (std_g R + eps), scale_rewards group | batch (std of the whole global batch) |
                none (no division: Dr. GRPO). Shao et al. 2024 (arXiv:2402.03300); Liu et al. 2025
                (arXiv:2503.20783). std is the unbiased (n-1) one, as TRL and verl use; a group of one gets 0.
  rloo          R_i - mean_{j != i, same group} R_j. Ahmadian et al. 2024 (arXiv:2402.14740).
  mdloo         the same leave-one-out advantage of the KL-regularised reward R - kl_coef * sum_t kl_t (Apple
                Foundation Models 2024, arXiv:2407.21075, section 5.2.2).
  reinforce_pp  token returns G_t = sum_{s >= t} discount^(s-t) r_s with r_s = -kl_coef kl_s + [s last] R
                (R - mean_g R with cfg.group_baseline: REINFORCE++-baseline), whitened over every scored token of
                the global batch. Hu 2025 (arXiv:2501.03262).
  gae           delta_t = r_t + discount V_{t+1} - V_t (V after the last token = 0), A_t = delta_t + discount lam
                A_{t+1}, returns = A + V, advantages whitened over the global batch. Schulman et al. 2016 (GAE,
                arXiv:1506.02438), as PPO for RLHF uses it (Ouyang et al. 2022).
Whitening: (x - mean) / (std + eps) with the population std over all scored tokens (all ranks of `group`).
"""
from __future__ import annotations

import difflib
import math
from typing import Any, Callable, Dict, List, NamedTuple, Optional, Tuple

import torch
import torch.distributed as dist

from megatron.config import ConfigError

ADV_EPS = 1e-6  # added to standard deviations before dividing
SCALE_REWARDS = ("group", "batch", "none")


class AdvantageOutput(NamedTuple):
    """advantages: Float[shape of mask], 0 at unscored positions; returns: the same shape or None."""
    advantages: torch.Tensor
    returns: Optional[torch.Tensor] = None


Estimator = Callable[..., AdvantageOutput]
_ESTIMATORS: Dict[str, Tuple[Estimator, Estimator]] = {}


def register_advantage(name: str, reference: Estimator) -> Callable[[Estimator], Estimator]:
    """Decorator registering a vectorised estimator under `name` with its plain-loop twin `reference`.

    A second registration of a taken name raises ValueError.
    """
    def deco(fn: Estimator) -> Estimator:
        if name in _ESTIMATORS and _ESTIMATORS[name][0].__qualname__ != fn.__qualname__:
            raise ValueError(f"advantage estimator '{name}' is already registered")
        _ESTIMATORS[name] = (fn, reference)
        return fn
    return deco


def registered_advantage_estimators() -> List[str]:
    """Sorted names of the registered estimators."""
    return sorted(_ESTIMATORS)


def get_advantage_estimator(name: str, impl: str = "vectorised") -> Estimator:
    """The estimator `name`, impl 'vectorised' (the one the loop uses) or 'loop' (the reference twin).

    An unknown name raises ConfigError with a did-you-mean and the registered names.
    """
    if name not in _ESTIMATORS:
        close = difflib.get_close_matches(str(name), list(_ESTIMATORS), n=1, cutoff=0.5)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise ConfigError(f"unknown advantage estimator {name!r}{hint}; registered: "
                          f"{', '.join(registered_advantage_estimators())}")
    if impl not in ("vectorised", "loop"):
        raise ValueError(f"get_advantage_estimator: impl must be 'vectorised' or 'loop', got {impl!r}")
    return _ESTIMATORS[name][0 if impl == "vectorised" else 1]


def varying_groups(rewards: torch.Tensor, group_ids: torch.Tensor) -> torch.Tensor:
    """DAPO's dynamic sampling filter (Yu et al. 2025, arXiv:2503.14476): Bool[N], True for the completions of
    groups whose rewards are not all equal (a group with one reward value gives every advantage 0 and no gradient).
    """
    inv, g = _group_index(group_ids)
    r = rewards.detach().to(torch.float64)
    hi = torch.full((g,), -math.inf, dtype=torch.float64).scatter_reduce(0, inv, r, "amax")
    lo = torch.full((g,), math.inf, dtype=torch.float64).scatter_reduce(0, inv, r, "amin")
    return (hi > lo)[inv]


# ----------------------------------------------------------------------------------------- shared pieces
def _group_index(group_ids: torch.Tensor) -> Tuple[torch.Tensor, int]:
    """Map arbitrary group ids Long[N] to 0..G-1 -> (Long[N], G)."""
    uniq, inv = torch.unique(group_ids.detach().cpu(), return_inverse=True)
    return inv.to(group_ids.device), int(uniq.numel())


def _check(rewards: torch.Tensor, group_ids: torch.Tensor, seq_id: torch.Tensor, mask: torch.Tensor,
           kl: Optional[torch.Tensor], values: Optional[torch.Tensor]) -> None:
    n = rewards.shape[0] if rewards.dim() == 1 else -1
    if n < 0 or group_ids.shape != rewards.shape:
        raise ValueError(f"advantages: rewards must be Float[N] and group_ids Long[N], got {tuple(rewards.shape)} "
                         f"and {tuple(group_ids.shape)}")
    if seq_id.shape != mask.shape:
        raise ValueError(f"advantages: seq_id {tuple(seq_id.shape)} and mask {tuple(mask.shape)} must have one shape")
    for name, t in (("kl", kl), ("values", values)):
        if t is not None and t.shape != mask.shape:
            raise ValueError(f"advantages: {name} has shape {tuple(t.shape)}, expected the mask's {tuple(mask.shape)}")
    if seq_id.numel() and int(seq_id.max()) >= n:
        raise ValueError(f"advantages: seq_id refers to completion {int(seq_id.max())} but there are {n} rewards")
    if not bool(torch.isfinite(rewards).all()):
        bad = int((~torch.isfinite(rewards)).nonzero()[0])
        raise ValueError(f"advantages: reward of completion {bad} is {float(rewards[bad])}; rewards must be finite")


def _f64(x: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    return None if x is None else x.detach().reshape(-1).to(torch.float64)


def _out_dtype(rewards: torch.Tensor) -> torch.dtype:
    return torch.promote_types(rewards.dtype, torch.float32)


def _scored(seq_id: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Bool[L]: flat positions that are time steps (scored and inside a completion)."""
    return (seq_id.reshape(-1) >= 0) & (mask.reshape(-1) != 0)


def _seq_sums(x: torch.Tensor, seq_id: torch.Tensor, mask: torch.Tensor, n: int) -> torch.Tensor:
    """sum_t x[t] * mask[t] over each completion's scored positions -> Float64[N]."""
    sel = _scored(seq_id, mask)
    return torch.zeros(n, dtype=torch.float64, device=x.device).index_add(
        0, seq_id.reshape(-1)[sel], x[sel] * _f64(mask)[sel])


def _kl_regularised(rewards: torch.Tensor, seq_id, mask, cfg, kl) -> torch.Tensor:
    """R - kl_coef * sum_t kl_t (when kl is given) -> Float64[N]."""
    r = _f64(rewards)
    if kl is not None and cfg.kl_coef:
        r = r - cfg.kl_coef * _seq_sums(_f64(kl), seq_id, mask, r.numel())
    return r


def _broadcast(per_seq: torch.Tensor, seq_id: torch.Tensor, mask: torch.Tensor, dtype) -> torch.Tensor:
    """Float64[N] -> the mask's shape: per_seq[seq_id] at scored positions, 0 elsewhere."""
    sel = _scored(seq_id, mask)
    out = torch.zeros(mask.numel(), dtype=torch.float64, device=mask.device)
    out[sel] = per_seq[seq_id.reshape(-1)[sel]]
    return out.reshape(mask.shape).to(dtype)


def _all_reduce(t: torch.Tensor, group: Any) -> torch.Tensor:
    if group is not None and dist.is_initialized() and dist.get_world_size(group) > 1:
        dist.all_reduce(t, group=group)
    return t


def _whiten(x: torch.Tensor, sel: torch.Tensor, group: Any) -> torch.Tensor:
    """(x - mean) / (population std + eps) over the selected positions of all ranks of `group`; 0 elsewhere."""
    vals = x[sel]
    s = _all_reduce(torch.stack([vals.sum(), vals.new_tensor(float(vals.numel()))]), group)
    mean = s[0] / s[1].clamp(min=1.0)
    sq = _all_reduce(((vals - mean) ** 2).sum().reshape(1), group)[0]
    std = torch.sqrt(sq / s[1].clamp(min=1.0))
    out = torch.zeros_like(x)
    out[sel] = (vals - mean) / (std + ADV_EPS)
    return out


def _layout(seq_id: torch.Tensor, mask: torch.Tensor, n: int):
    """Scored positions as a right-padded [N, T] grid: (flat positions Long[M], row Long[M], col Long[M], T).

    col = index of the token among its completion's scored tokens, in flat (time) order.
    """
    sel = _scored(seq_id, mask)
    pos = sel.nonzero().reshape(-1)
    rows = seq_id.reshape(-1)[pos]
    sorted_rows, order = torch.sort(rows, stable=True)
    first = torch.searchsorted(sorted_rows, sorted_rows)
    cols = torch.empty_like(rows)
    cols[order] = torch.arange(rows.numel(), device=rows.device) - first
    t = int(torch.bincount(rows, minlength=n).max()) if rows.numel() else 0
    return pos, rows, cols, t


def _reverse_scan(rewards_grid: torch.Tensor, values_grid: torch.Tensor, valid: torch.Tensor,
                  gamma: float, lam: float) -> torch.Tensor:
    """GAE over a right-padded grid [N, T], one vectorised step per time column (backwards):
    delta_t = r_t + gamma V_{t+1} - V_t, A_t = delta_t + gamma lam A_{t+1}; positions past a row's end stay 0."""
    n, t_max = rewards_grid.shape
    adv = torch.zeros_like(rewards_grid)
    next_v = torch.zeros(n, dtype=rewards_grid.dtype, device=rewards_grid.device)
    next_a = torch.zeros_like(next_v)
    for t in range(t_max - 1, -1, -1):
        ok = valid[:, t]
        v = values_grid[:, t]
        a = rewards_grid[:, t] + gamma * next_v - v + gamma * lam * next_a
        a = torch.where(ok, a, torch.zeros_like(a))
        adv[:, t] = a
        next_v = torch.where(ok, v, next_v)
        next_a = a
    return adv


def _token_rewards_grid(rewards_seq: torch.Tensor, seq_id, mask, cfg, kl, layout) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per-token rewards on the [N, T] grid: -kl_coef * kl_t at every scored token, + R at each row's last one."""
    pos, rows, cols, t_max = layout
    n = rewards_seq.numel()
    grid = torch.zeros(n, t_max, dtype=torch.float64, device=rewards_seq.device)
    valid = torch.zeros(n, t_max, dtype=torch.bool, device=rewards_seq.device)
    valid[rows, cols] = True
    if kl is not None and cfg.kl_coef:
        grid[rows, cols] = -cfg.kl_coef * _f64(kl)[pos] * _f64(mask)[pos]
    lengths = valid.sum(1)
    has = lengths > 0
    last = (lengths - 1).clamp(min=0)
    idx = torch.arange(n, device=grid.device)[has]
    grid[idx, last[has]] += rewards_seq[has]
    return grid, valid


def _from_grid(grid: torch.Tensor, mask: torch.Tensor, layout) -> torch.Tensor:
    pos, rows, cols, _ = layout
    out = torch.zeros(mask.numel(), dtype=torch.float64, device=mask.device)
    out[pos] = grid[rows, cols]
    return out


def _group_mean(r: torch.Tensor, group_ids: torch.Tensor) -> torch.Tensor:
    inv, g = _group_index(group_ids)
    cnt = torch.zeros(g, dtype=torch.float64, device=r.device).index_add(0, inv, torch.ones_like(r))
    return (torch.zeros(g, dtype=torch.float64, device=r.device).index_add(0, inv, r) / cnt)[inv]


# ------------------------------------------------------------------------------------ plain-loop twins
def _loop_positions(seq_id: torch.Tensor, mask: torch.Tensor, n: int) -> List[List[int]]:
    """For each completion, its scored flat positions in time order (a Python loop over every position)."""
    sid, m = seq_id.reshape(-1).tolist(), mask.reshape(-1).tolist()
    out: List[List[int]] = [[] for _ in range(n)]
    for p, (s, w) in enumerate(zip(sid, m)):
        if s >= 0 and w != 0:
            out[s].append(p)
    return out


def _loop_rewards(rewards, seq_id, mask, cfg, kl) -> List[float]:
    r = [float(x) for x in rewards.tolist()]
    if kl is not None and cfg.kl_coef:
        klv, m = kl.reshape(-1).tolist(), mask.reshape(-1).tolist()
        for i, ps in enumerate(_loop_positions(seq_id, mask, len(r))):
            r[i] -= cfg.kl_coef * sum(klv[p] * m[p] for p in ps)
    return r


def _loop_groups(group_ids) -> Dict[int, List[int]]:
    groups: Dict[int, List[int]] = {}
    for i, g in enumerate(group_ids.tolist()):
        groups.setdefault(int(g), []).append(i)
    return groups


def _loop_broadcast(per_seq: List[float], seq_id, mask, dtype) -> torch.Tensor:
    out = [0.0] * mask.numel()
    for i, ps in enumerate(_loop_positions(seq_id, mask, len(per_seq))):
        for p in ps:
            out[p] = per_seq[i]
    return torch.tensor(out, dtype=torch.float64).reshape(mask.shape).to(dtype)


def _loop_whiten(x: List[float], positions: List[int]) -> List[float]:
    vals = [x[p] for p in positions]
    mean = sum(vals) / max(len(vals), 1)
    std = math.sqrt(sum((v - mean) ** 2 for v in vals) / max(len(vals), 1))
    out = [0.0] * len(x)
    for p in positions:
        out[p] = (x[p] - mean) / (std + ADV_EPS)
    return out


def _loop_returns(terminal: List[float], seq_id, mask, cfg, kl, values, lam: float) -> Tuple[List[float], List[float]]:
    """Per-token advantages (GAE with `values`, discounted returns without) by a backward loop per completion."""
    m = mask.reshape(-1).tolist()
    klv = kl.reshape(-1).tolist() if (kl is not None and cfg.kl_coef) else None
    vals = values.reshape(-1).tolist() if values is not None else None
    adv = [0.0] * mask.numel()
    for i, ps in enumerate(_loop_positions(seq_id, mask, len(terminal))):
        next_v, next_a = 0.0, 0.0
        for k in range(len(ps) - 1, -1, -1):
            p = ps[k]
            r = (-cfg.kl_coef * klv[p] * m[p]) if klv is not None else 0.0
            if k == len(ps) - 1:
                r += terminal[i]
            v = vals[p] if vals is not None else 0.0
            a = r + cfg.discount * next_v - v + cfg.discount * lam * next_a
            adv[p] = a
            next_v, next_a = v, a
    return adv, (vals if vals is not None else [0.0] * mask.numel())


def _not_distributed(group: Any, name: str) -> None:
    if group is not None and dist.is_initialized() and dist.get_world_size(group) > 1:
        raise ValueError(f"the loop twin of '{name}' is single-process; use the vectorised estimator with a group")


# ---------------------------------------------------------------------------------------------- GRPO
def _scale_rewards(cfg) -> str:
    value = getattr(cfg, "scale_rewards", "group")
    if value not in SCALE_REWARDS:
        raise ConfigError(f"key 'objective.scale_rewards': {value!r} is not one of {', '.join(SCALE_REWARDS)}")
    return value


def grpo_loop(rewards, group_ids, seq_id, mask, cfg, *, kl=None, values=None, group=None) -> AdvantageOutput:
    """Plain-loop twin of `grpo_advantages`."""
    _check(rewards, group_ids, seq_id, mask, kl, values)
    _not_distributed(group, "grpo")
    mode = _scale_rewards(cfg)
    r = _loop_rewards(rewards, seq_id, mask, cfg, kl)
    adv = [0.0] * len(r)
    batch_std = None
    if mode == "batch":
        mu = sum(r) / len(r)
        batch_std = math.sqrt(sum((x - mu) ** 2 for x in r) / (len(r) - 1)) if len(r) > 1 else 0.0
    for members in _loop_groups(group_ids).values():
        vals = [r[i] for i in members]
        mu = sum(vals) / len(vals)
        std = math.sqrt(sum((x - mu) ** 2 for x in vals) / (len(vals) - 1)) if len(vals) > 1 else 0.0
        for i in members:
            adv[i] = r[i] - mu
            if mode == "group":
                adv[i] /= std + ADV_EPS
            elif mode == "batch":
                adv[i] /= batch_std + ADV_EPS
    return AdvantageOutput(_loop_broadcast(adv, seq_id, mask, _out_dtype(rewards)))


@register_advantage("grpo", reference=grpo_loop)
def grpo_advantages(rewards, group_ids, seq_id, mask, cfg, *, kl=None, values=None, group=None) -> AdvantageOutput:
    """Group-normalised advantages (module docstring); scale_rewards 'batch' reduces over `group`."""
    _check(rewards, group_ids, seq_id, mask, kl, values)
    mode = _scale_rewards(cfg)
    r = _kl_regularised(rewards, seq_id, mask, cfg, kl)
    inv, g = _group_index(group_ids)
    cnt = torch.zeros(g, dtype=torch.float64, device=r.device).index_add(0, inv, torch.ones_like(r))
    mean = torch.zeros(g, dtype=torch.float64, device=r.device).index_add(0, inv, r) / cnt
    dev = r - mean[inv]
    if mode == "group":
        var = torch.zeros(g, dtype=torch.float64, device=r.device).index_add(0, inv, dev * dev) / (cnt - 1).clamp(min=1)
        dev = dev / (torch.sqrt(var)[inv] + ADV_EPS)
    elif mode == "batch":
        s = _all_reduce(torch.stack([r.sum(), r.new_tensor(float(r.numel()))]), group)
        mu = s[0] / s[1]
        sq = _all_reduce(((r - mu) ** 2).sum().reshape(1), group)[0]
        std = torch.sqrt(sq / (s[1] - 1).clamp(min=1))  # unbiased; a batch of one has sq = 0
        dev = dev / (std + ADV_EPS)
    return AdvantageOutput(_broadcast(dev, seq_id, mask, _out_dtype(rewards)))


# ------------------------------------------------------------------------------------- RLOO and MDLOO
def rloo_loop(rewards, group_ids, seq_id, mask, cfg, *, kl=None, values=None, group=None) -> AdvantageOutput:
    """Plain-loop twin of `rloo_advantages`."""
    _check(rewards, group_ids, seq_id, mask, kl, values)
    r = _loop_rewards(rewards, seq_id, mask, cfg, kl)
    adv = [0.0] * len(r)
    for members in _loop_groups(group_ids).values():
        if len(members) < 2:
            continue
        for i in members:
            others = [r[j] for j in members if j != i]
            adv[i] = r[i] - sum(others) / len(others)
    return AdvantageOutput(_loop_broadcast(adv, seq_id, mask, _out_dtype(rewards)))


@register_advantage("rloo", reference=rloo_loop)
def rloo_advantages(rewards, group_ids, seq_id, mask, cfg, *, kl=None, values=None, group=None) -> AdvantageOutput:
    """Leave-one-out advantages R_i - mean of the other rewards of its group (0 for a group of one)."""
    _check(rewards, group_ids, seq_id, mask, kl, values)
    r = _kl_regularised(rewards, seq_id, mask, cfg, kl)
    inv, g = _group_index(group_ids)
    cnt = torch.zeros(g, dtype=torch.float64, device=r.device).index_add(0, inv, torch.ones_like(r))[inv]
    total = torch.zeros(g, dtype=torch.float64, device=r.device).index_add(0, inv, r)[inv]
    adv = torch.where(cnt > 1, r - (total - r) / (cnt - 1).clamp(min=1), torch.zeros_like(r))
    return AdvantageOutput(_broadcast(adv, seq_id, mask, _out_dtype(rewards)))


# MDLOO's advantage is the leave-one-out advantage of the KL-regularised reward (the objective always passes kl).
register_advantage("mdloo", reference=rloo_loop)(rloo_advantages)


# ----------------------------------------------------------------------------------------- REINFORCE++
def reinforce_pp_loop(rewards, group_ids, seq_id, mask, cfg, *, kl=None, values=None, group=None) -> AdvantageOutput:
    """Plain-loop twin of `reinforce_pp_advantages`."""
    _check(rewards, group_ids, seq_id, mask, kl, values)
    _not_distributed(group, "reinforce_pp")
    r = [float(x) for x in rewards.tolist()]
    if getattr(cfg, "group_baseline", False):
        centred = list(r)
        for members in _loop_groups(group_ids).values():
            mu = sum(r[i] for i in members) / len(members)
            for i in members:
                centred[i] = r[i] - mu
        r = centred
    returns, _ = _loop_returns(r, seq_id, mask, cfg, kl, None, lam=1.0)
    positions = [p for ps in _loop_positions(seq_id, mask, len(r)) for p in ps]
    adv = _loop_whiten(returns, positions)
    dtype = _out_dtype(rewards)
    as_t = lambda xs: torch.tensor(xs, dtype=torch.float64).reshape(mask.shape).to(dtype)  # noqa: E731
    pset = set(positions)
    return AdvantageOutput(as_t(adv), as_t([returns[p] if p in pset else 0.0 for p in range(len(returns))]))


@register_advantage("reinforce_pp", reference=reinforce_pp_loop)
def reinforce_pp_advantages(rewards, group_ids, seq_id, mask, cfg, *, kl=None, values=None,
                            group=None) -> AdvantageOutput:
    """REINFORCE++ token returns, whitened over the global batch (module docstring); returns = G before whitening."""
    _check(rewards, group_ids, seq_id, mask, kl, values)
    r = _f64(rewards)
    if getattr(cfg, "group_baseline", False):
        r = r - _group_mean(r, group_ids)
    layout = _layout(seq_id, mask, r.numel())
    grid, valid = _token_rewards_grid(r, seq_id, mask, cfg, kl, layout)
    returns = _from_grid(_reverse_scan(grid, torch.zeros_like(grid), valid, cfg.discount, 1.0), mask, layout)
    adv = _whiten(returns, _scored(seq_id, mask), group)
    dtype = _out_dtype(rewards)
    return AdvantageOutput(adv.reshape(mask.shape).to(dtype), returns.reshape(mask.shape).to(dtype))


# ------------------------------------------------------------------------------------------------- GAE
def gae_loop(rewards, group_ids, seq_id, mask, cfg, *, kl=None, values=None, group=None) -> AdvantageOutput:
    """Plain-loop twin of `gae_advantages`."""
    _check(rewards, group_ids, seq_id, mask, kl, values)
    _not_distributed(group, "gae")
    if values is None:
        raise ValueError("gae needs the critic's per-token values")
    n = rewards.shape[0]
    adv, vals = _loop_returns([float(x) for x in rewards.tolist()], seq_id, mask, cfg, kl, values, lam=cfg.lam)
    positions = [p for ps in _loop_positions(seq_id, mask, n) for p in ps]
    pset = set(positions)
    returns = [adv[p] + vals[p] if p in pset else 0.0 for p in range(len(adv))]
    white = _loop_whiten(adv, positions)
    dtype = _out_dtype(rewards)
    as_t = lambda xs: torch.tensor(xs, dtype=torch.float64).reshape(mask.shape).to(dtype)  # noqa: E731
    return AdvantageOutput(as_t(white), as_t(returns))


@register_advantage("gae", reference=gae_loop)
def gae_advantages(rewards, group_ids, seq_id, mask, cfg, *, kl=None, values=None, group=None) -> AdvantageOutput:
    """GAE(discount, lam) over each completion's scored tokens; advantages whitened over the global batch,
    returns = GAE + values (the critic's target)."""
    _check(rewards, group_ids, seq_id, mask, kl, values)
    if values is None:
        raise ValueError("gae needs the critic's per-token values (values=Float like mask)")
    r = _f64(rewards)
    layout = _layout(seq_id, mask, r.numel())
    grid, valid = _token_rewards_grid(r, seq_id, mask, cfg, kl, layout)
    pos, rows, cols, t_max = layout
    v_grid = torch.zeros_like(grid)
    v_grid[rows, cols] = _f64(values)[pos]
    adv = _from_grid(_reverse_scan(grid, v_grid, valid, cfg.discount, cfg.lam), mask, layout)
    sel = _scored(seq_id, mask)
    returns = torch.where(sel, adv + _f64(values), torch.zeros_like(adv))
    dtype = _out_dtype(rewards)
    white = _whiten(adv, sel, group)
    return AdvantageOutput(white.reshape(mask.shape).to(dtype), returns.reshape(mask.shape).to(dtype))


def compute_advantages(name: str, rewards: torch.Tensor, group_ids: torch.Tensor, seq_id: torch.Tensor,
                       mask: torch.Tensor, cfg: Any, *, kl: Optional[torch.Tensor] = None,
                       values: Optional[torch.Tensor] = None, group: Any = None, impl: str = "vectorised"
                       ) -> AdvantageOutput:
    """Run the registered estimator `name` (the signature in the module docstring)."""
    return get_advantage_estimator(name, impl)(rewards, group_ids, seq_id, mask, cfg, kl=kl, values=values, group=group)
