"""Sampling parameters and vocab-parallel token selection.

Each tensor-parallel rank holds the logits of its vocabulary slice `[B, Vl]`, ids `[r*Vl, (r+1)*Vl)`; ids
>= model.vocab_size are padding rows of the embedding/head and get -inf before anything becomes a
probability. One step, per row:

    raw logits -> global max (all-reduce MAX) -> w = exp(raw - max) -> log-sum-exp (all-reduce SUM)
    greedy: the global argmax (each rank's (max, argmax), one all-gather; ties -> the lowest id)
    sampled: weights exp((raw - max) / T), filtered by top-k / top-p / min-p, then inverse-CDF sampling in
             token-id order with ONE uniform per row (`noise.sample_uniforms`)
    log-prob of the chosen token = its raw logit - log-sum-exp (temperature 1, padding masked), as the
             training forward computes it

Inverse CDF without gathering the vocabulary: every rank sums its weights in blocks of 128 ids (block sums
are the same numbers at any tensor size: Vl is a multiple of 128), the per-rank masses are all-gathered
([tp, B] scalars), and the rank holding the uniform's quantile finds the block, then the token, in its own
cumulative sums; the id is all-reduced. top-k gathers each rank's top-k candidates ([B, tp*k]); top-p alone
first tries the global top-64, then top-1024 candidates (exact whenever their mass reaches top_p, the usual
case for trained models) and only otherwise gathers the full row and sorts it. Every method is a function of
the full-vocabulary logits and the row's uniform only, so tensor=1 and tensor=N choose the same tokens (up to
float round-off in the logits themselves). Filters follow transformers' order and semantics: temperature,
top-k, top-p (the smallest top set with mass >= top_p, at least one token, renormalised after top-k), min-p
(keep p >= min_p * p_max).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist

from megatron.config import ConfigError
from megatron.mpu import group_rank, group_size, mask_padded_vocab

BLOCK = 128  # ids per block of the two-level inverse CDF (every shard width is a multiple of 128)
TOP_P_TRIES = (64, 1024)  # candidate counts tried for top-p before sorting the full row


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


# ------------------------------------------------------------------------------------------ collectives
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


def _gather_rows(x: torch.Tensor, group) -> torch.Tensor:
    """[B, K] per rank -> [B, tp*K], rank-major along the last dim (= token-id order for vocab shards)."""
    if group_size(group) == 1:
        return x
    return _gather(x, group).permute(1, 0, 2).reshape(x.shape[0], -1)


# ------------------------------------------------------------------------------------------ inverse CDF
def _last_positive(w: torch.Tensor) -> torch.Tensor:
    """Index [B] of the last position with w > 0 along the last dim (0 when none)."""
    return (w > 0).long().cumsum(dim=-1).argmax(dim=-1)


def _inverse_cdf(weights: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Index [B] of the first position whose cumulative weight exceeds target[b] (weights [B, K] >= 0, float64
    sums), never a zero-weight position (round-off at the very end falls back to the last one with weight)."""
    cum = weights.double().cumsum(dim=-1)
    idx = torch.searchsorted(cum, target[:, None].double(), right=True).squeeze(1)
    return torch.minimum(idx, _last_positive(weights))


def _sample_sharded(w: torch.Tensor, u: torch.Tensor, vocab_start: int, group) -> torch.Tensor:
    """Inverse-CDF sampling in global token-id order from vocab-sharded weights w [B, Vl] (>= 0, rows with
    mass) and uniforms u [B]: ids [B], identical on every rank. Only [B]-sized scalars cross ranks."""
    B, Vl = w.shape
    if Vl % BLOCK:  # widths that are not shards of a padded vocabulary (direct callers): pad with zeros
        w = torch.cat([w, w.new_zeros(B, BLOCK - Vl % BLOCK)], dim=-1)
    blocks = w.view(B, -1, BLOCK)
    bsum = blocks.sum(dim=-1).double()                               # [B, nb]
    mass = _gather(bsum.sum(dim=-1), group)                          # [tp, B]
    ends = mass.cumsum(dim=0)
    target = u.double() * ends[-1]
    owner = torch.minimum((ends <= target[None]).sum(dim=0), _last_positive(mass.t()))
    me = group_rank(group)
    local = target - (ends[me] - mass[me])                           # the quantile inside this rank's shard
    cb = bsum.cumsum(dim=-1)
    blk = torch.searchsorted(cb, local[:, None], right=True).squeeze(1)
    blk = torch.minimum(blk, _last_positive(bsum))
    rows = torch.arange(B, device=w.device)
    inside = local - (cb[rows, blk] - bsum[rows, blk])
    idx = blk * BLOCK + _inverse_cdf(blocks[rows, blk], inside)
    token = torch.where(owner == me, idx + vocab_start, torch.full_like(idx, -1))
    return _all_reduce(token, group, dist.ReduceOp.MAX)


# ------------------------------------------------------------------------------------------ filters
def _top_candidates(w: torch.Tensor, k: int, vocab_start: int, group) -> Tuple[torch.Tensor, torch.Tensor]:
    """The global top-k of vocab-sharded weights: (weights [B, k'] descending, global ids [B, k']), k' = min(k,
    V); identical on every rank (each rank's top-k gathered, then the top-k of those)."""
    vals, idx = w.topk(min(k, w.shape[-1]), dim=-1)
    vals, idx = _gather_rows(vals, group), _gather_rows(idx + vocab_start, group)
    if vals.shape[-1] > k:
        vals, order = vals.topk(k, dim=-1)
        idx = idx.gather(1, order)
    return vals, idx


def _keep_top_p(probs_desc: torch.Tensor, top_p: float) -> torch.Tensor:
    """Bool mask over probabilities sorted descending: the smallest prefix with mass >= top_p (>= 1 token)."""
    before = probs_desc.double().cumsum(dim=-1) - probs_desc.double()  # mass of strictly better tokens
    keep = before < top_p
    keep[:, 0] = True
    return keep


def _sample_candidates(vals: torch.Tensor, ids: torch.Tensor, keep: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Inverse CDF over the kept candidates, in token-id order: ids [B]."""
    order = ids.argsort(dim=-1)
    weights = torch.where(keep, vals, torch.zeros_like(vals)).gather(1, order)
    total = weights.double().sum(dim=-1)
    pick = _inverse_cdf(weights, u.double() * total)
    return ids.gather(1, order).gather(1, pick[:, None]).squeeze(1)


def _min_p_keep(vals_desc: torch.Tensor, min_p: float) -> torch.Tensor:
    return vals_desc >= min_p * vals_desc[:, :1]


def _filtered_sample(w: torch.Tensor, params: SamplingParams, u: torch.Tensor, vocab_start: int,
                     group) -> torch.Tensor:
    """top-k and/or top-p (then min-p) sampling from vocab-sharded weights w [B, Vl]: ids [B], same on all ranks."""
    if params.top_k > 0:  # top-p (if any) renormalises over the top-k set, as transformers does
        vals, ids = _top_candidates(w, params.top_k, vocab_start, group)
        keep = vals > 0
        if params.top_p < 1.0:
            keep &= _keep_top_p(vals / vals.sum(dim=-1, keepdim=True), params.top_p)
        if params.min_p > 0.0:
            keep &= _min_p_keep(vals, params.min_p)
        return _sample_candidates(vals, ids, keep, u)
    total = _all_reduce(w.sum(dim=-1, dtype=torch.float64), group)  # the global normaliser
    for k in TOP_P_TRIES:  # the nucleus is usually small: exact whenever the top-k's mass reaches top_p
        if k >= w.shape[-1] * group_size(group):
            break
        vals, ids = _top_candidates(w, k, vocab_start, group)
        probs = vals.double() / total[:, None]
        if bool((probs.sum(dim=-1) >= params.top_p).all()):
            keep = _keep_top_p(probs, params.top_p)
            if params.min_p > 0.0:
                keep &= _min_p_keep(vals, params.min_p)
            return _sample_candidates(vals, ids, keep, u)
    full = _gather_rows(w, group)                                     # [B, V] in token-id order
    vals, order = full.sort(dim=-1, descending=True)
    keep = _keep_top_p(vals.double() / total[:, None], params.top_p)
    if params.min_p > 0.0:
        keep &= _min_p_keep(vals, params.min_p)
    kept = torch.zeros_like(keep).scatter(1, order, keep)
    return _sample_sharded(torch.where(kept, full, torch.zeros_like(full)), u, 0, None)


def _greedy(local_max: torch.Tensor, local_arg: torch.Tensor, vocab_start: int, group) -> torch.Tensor:
    """Global argmax ids [B] from each rank's (max, argmax); ties go to the lowest id (as torch.argmax)."""
    vals = _gather(local_max, group)               # [tp, B]
    ids = _gather(local_arg + vocab_start, group)  # [tp, B]
    best = vals.argmax(dim=0)                      # first (lowest-id) rank among equal maxima
    return ids.gather(0, best[None]).squeeze(0)


def _token_logit(raw: torch.Tensor, tokens: torch.Tensor, vocab_start: int, group) -> torch.Tensor:
    """raw[b, tokens[b]] [B] from vocab-sharded raw logits (the owning rank contributes it; one all-reduce)."""
    local = tokens - vocab_start
    mine = (local >= 0) & (local < raw.shape[-1])
    val = raw.gather(1, local.clamp(0, raw.shape[-1] - 1)[:, None]).squeeze(1)
    return _all_reduce(torch.where(mine, val, torch.zeros_like(val)), group)


def sample_next(logits: torch.Tensor, params: SamplingParams, u: Optional[torch.Tensor], ps, vocab_size: int):
    """Choose the next token of every row from vocab-parallel logits.

    logits: [B, Vl] this rank's shard (any float dtype); u: float64 [B] uniforms (None when greedy);
    vocab_size: the real vocabulary (cfg.model.vocab_size; ids beyond it are padding, masked).
    Returns (token ids Long[B], log-probs fp32 [B]): the log-prob is the raw model's (temperature 1, padding
    masked), as the training forward computes it. Identical on every rank of the tensor-parallel group.
    """
    group = ps.tp_group
    vocab_start = ps.tp_rank * logits.shape[-1]
    raw = mask_padded_vocab(logits.float(), vocab_size, vocab_start)
    local_max, local_arg = raw.max(dim=-1)
    gmax = _all_reduce(local_max.clone(), group, dist.ReduceOp.MAX)
    shifted = raw - gmax[:, None]
    w = torch.exp(shifted)                                            # [B, Vl], 1 at the global max
    lse = gmax + torch.log(_all_reduce(w.sum(dim=-1), group))
    if params.temperature == 0.0:
        tokens = _greedy(local_max, local_arg, vocab_start, group)
    else:
        if params.temperature != 1.0:
            w = torch.exp(shifted.div_(params.temperature))
        if params.top_k > 0 or params.top_p < 1.0:
            tokens = _filtered_sample(w, params, u, vocab_start, group)
        else:
            if params.min_p > 0.0:  # p / p_max = w (the max weight is exactly 1)
                w = w.masked_fill(w < params.min_p, 0.0)
            tokens = _sample_sharded(w, u, vocab_start, group)
    return tokens, _token_logit(raw, tokens, vocab_start, group) - lse
