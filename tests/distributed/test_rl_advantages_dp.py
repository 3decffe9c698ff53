"""Batch-wide advantage statistics over 2 data-parallel gloo ranks equal one process holding every rollout:
GRPO's scale_rewards=batch std, REINFORCE++'s and GAE's global whitening (each rank holds whole groups)."""
import pytest
import torch
import torch.distributed as dist

from megatron.config.schema import ObjectiveConfig
from megatron.objectives import compute_advantages
from megatron.testing.distributed import run_distributed
from tests.unit.test_rl_advantages import rollouts

CASES = [("grpo", dict(scale_rewards="batch", kl_coef=0.1)), ("reinforce_pp", dict(kl_coef=0.1, group_baseline=True)),
         ("reinforce_pp", dict(kl_coef=0.2)), ("gae", dict(kl_coef=0.1, lam=0.9))]
SEEDS = (101, 202)  # rank r holds rollouts(SEEDS[r])


def flat(ro, seq_offset=0, group_offset=0):
    seq = ro["seq_id"].reshape(-1)
    return dict(rewards=ro["rewards"], group_ids=ro["group_ids"] + group_offset,
                seq_id=torch.where(seq >= 0, seq + seq_offset, seq), mask=ro["mask"].reshape(-1),
                kl=ro["kl"].reshape(-1), values=ro["values"].reshape(-1))


def run(name, kw, d, group=None):
    return compute_advantages(name, d["rewards"], d["group_ids"], d["seq_id"], d["mask"], ObjectiveConfig(**kw),
                              kl=d["kl"], values=d["values"], group=group)


def _rank(rank, world):
    d = flat(rollouts(SEEDS[rank]))
    return [run(name, kw, d, dist.group.WORLD).advantages for name, kw in CASES]


@pytest.mark.slow
def test_batch_statistics_over_data_parallel_ranks():
    per_rank = run_distributed(_rank, 2)
    a, b = rollouts(SEEDS[0]), rollouts(SEEDS[1])
    da, db = flat(a), flat(b, seq_offset=a["n"], group_offset=10 ** 6)
    whole = {k: torch.cat([da[k], db[k]]) for k in da}
    size = da["mask"].numel()
    for i, (name, kw) in enumerate(CASES):
        one = run(name, kw, whole).advantages
        torch.testing.assert_close(per_rank[0][i], one[:size], rtol=1e-12, atol=1e-12, msg=f"{name} {kw} rank 0")
        torch.testing.assert_close(per_rank[1][i], one[size:], rtol=1e-12, atol=1e-12, msg=f"{name} {kw} rank 1")
        # the per-rank statistics alone would differ
        assert not torch.allclose(run(name, kw, da).advantages, one[:size])
