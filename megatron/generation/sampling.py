"""Sampling parameters and vocab-parallel token selection.

Each tensor-parallel rank holds the logits of its vocabulary slice `[B, Vl]`, ids `[r*Vl, (r+1)*Vl)`; ids
>= model.vocab_size are padding rows of the embedding/head and get -inf before anything becomes a
probability. Methods and what crosses the tensor-parallel group:

- greedy (temperature 0): each rank's (max, argmax); one all-gather of [B, 2] scalars. Ties -> lowest id.
- temperature (and min-p): inverse-CDF sampling in token-id order with one uniform per row
  (`noise.sample_uniforms`): the global max (all-reduce), each shard's probability mass (all-gather [B]),
  then the shard that holds the uniform's quantile finds the token in its own cumulative sum (all-reduce of
  the id). The vocabulary is never gathered.
- top-k: each rank's top-k candidates are gathered ([B, tp*k]) and the global top-k kept; top-p alone
  gathers the full row (the nucleus needs the global sort). Then top-p / min-p filter the candidates and
  the same inverse CDF in token-id order picks one.

Every method is a function of the full-vocabulary logits and the row's uniform only, so tensor=1 and
tensor=N choose the same tokens (up to float round-off in the logits themselves). Filters follow
transformers' order and semantics: temperature, then top-k, top-p (the smallest top set with mass >= p,
at least one token), min-p (keep p >= min_p * p_max).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import List, Optional, Sequence

import torch
import torch.distributed as dist

from megatron.config import ConfigError
from megatron.mpu import group_rank, group_size, vocab_parallel_logprobs


@dataclass
class SamplingParams:
    """What to generate per prompt. temperature 0 = greedy; top_k 0 = off; top_p 1 = off; min_p 0 = off.

    stop: strings that end a completion (the text is cut before the first one); stop_token_ids: ids that
    end it besides EOS (kept in token_ids); ignore_eos: EOS does not stop (benchmarks); seed: with the prompt
    index and sample index, the only input of a sample's randomness."""
    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    max_new_tokens: int = 256
    stop: List[str] = field(default_factory=list)
    stop_token_ids: List[int] = field(default_factory=list)
    ignore_eos: bool = False
    seed: int = 0

    def validate(self, where: str = "generation") -> "SamplingParams":
        """Raise ConfigError naming `<where>.<key>` for an impossible value; returns self."""
        checks = [
            ("n", self.n >= 1, "must be >= 1"),
            ("temperature", self.temperature >= 0.0, "must be >= 0 (0 = greedy)"),
            ("top_p", 0.0 < self.top_p <= 1.0, "must be in (0, 1] (1 = off)"),
            ("top_k", self.top_k >= 0, "must be >= 0 (0 = off)"),
            ("min_p", 0.0 <= self.min_p < 1.0, "must be in [0, 1) (0 = off)"),
            ("max_new_tokens", self.max_new_tokens >= 1, "must be >= 1"),
            ("stop", all(isinstance(s, str) and s for s in self.stop), "must be non-empty strings"),
        ]
        for key, ok, why in checks:
            if not ok:
                raise ConfigError(f"key '{where}.{key}': {why}, got {getattr(self, key)!r}")
        return self

    @classmethod
    def from_config(cls, gen_cfg, stop_token_ids: Sequence[int] = ()) -> "SamplingParams":
        """From a `generation:` config section (megatron.config.schema.GenerationConfig), validated."""
        return cls(n=gen_cfg.n, temperature=gen_cfg.temperature, top_p=gen_cfg.top_p, top_k=gen_cfg.top_k,
                   min_p=gen_cfg.min_p, max_new_tokens=gen_cfg.max_new_tokens, stop=list(gen_cfg.stop),
                   stop_token_ids=list(stop_token_ids), ignore_eos=gen_cfg.ignore_eos,
                   seed=gen_cfg.seed).validate()


def mask_padded_vocab(logits: torch.Tensor, vocab_size: int, vocab_start: int) -> torch.Tensor:
    """logits [..., Vl] of ids [vocab_start, vocab_start+Vl) with ids >= vocab_size set to -inf (a new tensor
    only when this shard holds padding)."""
    first_pad = vocab_size - vocab_start
    if first_pad >= logits.shape[-1]:
        return logits
    out = logits.clone()
    out[..., max(first_pad, 0):] = float("-inf")
    return out


def _gather(x: torch.Tensor, group) -> torch.Tensor:
    """[tp, *x.shape]: every rank's x in rank order (x itself on one rank)."""
    if group_size(group) == 1:
        return x[None]
    parts = [torch.empty_like(x) for _ in range(group_size(group))]
    dist.all_gather(parts, x.contiguous(), group=group)
    return torch.stack(parts)


def _all_reduce(x: torch.Tensor, group, op=dist.ReduceOp.SUM) -> torch.Tensor:
    if group_size(group) > 1:
        dist.all_reduce(x, op=op, group=group)
    return x


def _greedy(logits: torch.Tensor, vocab_start: int, group) -> torch.Tensor:
    """Global argmax ids [B] of vocab-sharded logits [B, Vl]; ties go to the lowest id."""
    val, idx = logits.max(dim=-1)
    vals = _gather(val, group)                      # [tp, B]
    ids = _gather(idx + vocab_start, group)         # [tp, B]
    best = vals.argmax(dim=0)                       # first (lowest-id) rank among equal maxima
    return ids.gather(0, best[None]).squeeze(0)


def _inverse_cdf(weights: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Index [B] of the first position whose cumulative weight exceeds u * total (weights [B, K] >= 0, rows
    with positive mass; u [B] in (0, 1)), float64 sums. Never returns a zero-weight position."""
    cum = weights.double().cumsum(dim=-1)
    target = (u * cum[:, -1])[:, None]
    idx = torch.searchsorted(cum, target, right=True).squeeze(1)
    # Round-off can put the target at the very end; fall back to the last position with mass.
    last = (weights > 0).long().cumsum(dim=-1).argmax(dim=-1)
    return torch.minimum(idx, last)


def _sample_sharded(scaled: torch.Tensor, u: torch.Tensor, vocab_start: int, group) -> torch.Tensor:
    """Temperature sampling without gathering the vocabulary: ids [B] from scaled logits [B, Vl] (-inf =
    excluded) and uniforms u [B], in global token-id order."""
    gmax = _all_reduce(scaled.max(dim=-1).values.clone(), group, dist.ReduceOp.MAX)
    weights = torch.exp(scaled - gmax[:, None]).double()             # [B, Vl], 0 where excluded
    mass = _gather(weights.sum(dim=-1), group)                       # [tp, B] per-shard mass
    ends = mass.cumsum(dim=0)
    target = u * ends[-1]
    owner = (ends <= target[None]).sum(dim=0)
    # Round-off: never pick a rank past the last one with mass.
    last_with_mass = (mass > 0).long().cumsum(dim=0).argmax(dim=0)
    owner = torch.minimum(owner, last_with_mass)
    me = group_rank(group)
    local_target = target - (ends[me] - mass[me])                   # quantile inside this shard
    cum = weights.cumsum(dim=-1)
    idx = torch.searchsorted(cum, local_target[:, None], right=True).squeeze(1)
    last = (weights > 0).long().cumsum(dim=-1).argmax(dim=-1)
    idx = torch.minimum(idx, last)
    mine = owner == me
    token = torch.where(mine, idx + vocab_start, torch.full_like(idx, -1))
    return _all_reduce(token, group, dist.ReduceOp.MAX)


def _candidates(scaled: torch.Tensor, top_k: int, vocab_start: int, group):
    """(values [B, K], global ids [B, K]) sorted by value, descending: the global top-k (top_k > 0) from each
    rank's top-k, or the whole gathered row (top_k == 0)."""
    B, Vl = scaled.shape
    if top_k > 0:
        vals, idx = scaled.topk(min(top_k, Vl), dim=-1)
        idx = idx + vocab_start
    else:
        vals, idx = scaled, torch.arange(vocab_start, vocab_start + Vl, device=scaled.device).expand(B, Vl)
    if group_size(group) > 1:
        vals = _gather(vals, group).permute(1, 0, 2).reshape(B, -1)   # rank-major = id-major order
        idx = _gather(idx.contiguous(), group).permute(1, 0, 2).reshape(B, -1)
    k = min(top_k, vals.shape[-1]) if top_k > 0 else vals.shape[-1]
    vals, order = vals.topk(k, dim=-1) if top_k > 0 else vals.sort(dim=-1, descending=True, stable=True)
    return vals, idx.gather(1, order)


def _filtered_sample(scaled: torch.Tensor, params: SamplingParams, u: torch.Tensor, vocab_start: int,
                     group) -> torch.Tensor:
    """top-k / top-p (then min-p) sampling: ids [B]. Candidates are identical on every rank after the gather."""
    vals, ids = _candidates(scaled, params.top_k, vocab_start, group)
    keep = torch.isfinite(vals)
    if params.top_p < 1.0:
        probs = torch.softmax(vals.double(), dim=-1)
        before = probs.cumsum(dim=-1) - probs                       # mass of strictly better candidates
        keep &= before < params.top_p
        keep[:, 0] = True
    if params.min_p > 0.0:
        keep &= vals >= vals[:, :1] + math.log(params.min_p)
    weights = torch.where(keep, torch.exp(vals - vals[:, :1]), torch.zeros_like(vals))
    order = ids.argsort(dim=-1)                                      # canonical token-id order
    pick = _inverse_cdf(weights.gather(1, order), u)
    return ids.gather(1, order).gather(1, pick[:, None]).squeeze(1)


def sample_next(logits: torch.Tensor, params: SamplingParams, u: torch.Tensor, ps, vocab_size: int):
    """Choose the next token of every row from vocab-parallel logits.

    logits: [B, Vl] this rank's shard (any float dtype); u: float64 [B] uniforms (ignored when greedy);
    vocab_size: the real vocabulary (cfg.model.vocab_size; ids beyond it are padding, masked).
    Returns (token ids Long[B], log-probs fp32 [B]): the log-prob is the raw model's (temperature 1, padding
    masked), as the training forward computes it. Identical on every rank of the tensor-parallel group.
    """
    group = ps.tp_group
    vocab_start = ps.tp_rank * logits.shape[-1]
    raw = mask_padded_vocab(logits.float(), vocab_size, vocab_start)
    if params.temperature == 0.0:
        tokens = _greedy(raw, vocab_start, group)
    else:
        scaled = raw / params.temperature if params.temperature != 1.0 else raw
        if params.top_k > 0 or params.top_p < 1.0:
            tokens = _filtered_sample(scaled, params, u, vocab_start, group)
        else:
            if params.min_p > 0.0:
                gmax = _all_reduce(scaled.max(dim=-1).values.clone(), group, dist.ReduceOp.MAX)
                scaled = scaled.masked_fill(scaled < gmax[:, None] + math.log(params.min_p), float("-inf"))
            tokens = _sample_sharded(scaled, u, vocab_start, group)
    logps = vocab_parallel_logprobs(raw[:, None, :], tokens[:, None], ps)[:, 0]
    return tokens, logps
