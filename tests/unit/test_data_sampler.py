"""Sampler: deterministic, epochs reshuffled, DP shards cover each global batch once, exact resume."""
from __future__ import annotations

import itertools

import numpy as np
import pytest

from megatron.config import ConfigError
from megatron.data import MicroBatchSampler


def take(sampler, k):
    return list(itertools.islice(iter(sampler), k))


def make(n=50, G=12, m=2, rank=0, dp=3, seed=11, shuffle=True, consumed=0):
    return MicroBatchSampler(n, G, m, rank, dp, seed, shuffle, consumed)


def test_deterministic_and_seed_dependent():
    assert take(make(), 20) == take(make(), 20)
    assert take(make(), 20) != take(make(seed=12), 20)


def test_epoch_permutations_seeded_with_seed_plus_epoch():
    s = make(n=50)
    for epoch in range(3):
        assert np.array_equal(s.permutation(epoch), np.random.default_rng(11 + epoch).permutation(50))
    assert not np.array_equal(s.permutation(0), s.permutation(1))
    assert make(shuffle=False).samples(45, 10) == list(range(45, 50)) + list(range(5))


@pytest.mark.parametrize("dp,m", [(1, 4), (2, 2), (3, 2), (4, 1)])
def test_dp_ranks_cover_each_global_batch_exactly_once(dp, m):
    G, n = 12, 50
    ranks = [make(n=n, G=G, m=m, rank=r, dp=dp) for r in range(dp)]
    grad_accum = G // (m * dp)
    assert all(r.grad_accum == grad_accum for r in ranks)
    streams = [take(r, grad_accum * 9) for r in ranks]
    for step in range(9):
        per_rank = [sum(s[step * grad_accum:(step + 1) * grad_accum], []) for s in streams]
        assert all(len(x) == G // dp for x in per_rank)
        # rank r takes the r-th contiguous slice of the global batch, no overlap, nothing missing
        assert sum(per_rank, []) == make(n=n, G=G, m=m, dp=dp).global_batch(step * G)
        for mb in streams[0][step * grad_accum:(step + 1) * grad_accum]:
            assert len(mb) == m


def test_epoch_visits_every_example_once():
    s = make(n=48, G=12, m=2, dp=1)
    seen = sum(take(s, 4 * 6), [])
    assert sorted(seen) == list(range(48))
    assert s.consumed_samples == 48


@pytest.mark.parametrize("steps_done", [0, 1, 3, 4, 7])
def test_resume_from_consumed_samples_continues_exactly(steps_done):
    n, G, m, dp = 50, 12, 2, 3  # 50 is not a multiple of 12: steps straddle epoch boundaries
    for rank in range(dp):
        full = make(n=n, G=G, m=m, rank=rank, dp=dp)
        it = iter(full)
        accum = full.grad_accum
        before = list(itertools.islice(it, steps_done * accum))
        state = full.state_dict()
        assert len(before) == steps_done * accum and state == {"consumed_samples": steps_done * G}
        expected = list(itertools.islice(it, 5 * accum))
        resumed = make(n=n, G=G, m=m, rank=rank, dp=dp, consumed=state["consumed_samples"])
        assert take(resumed, 5 * accum) == expected


def test_consumed_counts_complete_steps_only():
    s = make(G=12, m=2, dp=3)  # grad_accum 2
    it = iter(s)
    next(it)
    assert s.consumed_samples == 0
    next(it)
    assert s.consumed_samples == 12


def test_bad_sizes():
    with pytest.raises(ConfigError, match="global_batch_size"):
        make(G=10, m=2, dp=3)
    with pytest.raises(ValueError):
        make(rank=3, dp=3)
