"""KTO over 2 data-parallel gloo ranks (2 examples each) equals 1 rank holding all 4 examples."""
import math
import types

import torch
import torch.distributed as dist

from megatron.config.schema import ObjectiveConfig
from megatron.objectives import SequenceStats, build_objective
from megatron.testing.distributed import run_distributed

BETA, DW, UW = 0.7, 1.2, 0.9


def global_data():
    """4 examples: targets 0..3 and KL sequences 4..7 (float64). The two halves have very different KL
    means, so a per-rank z0 would differ from the global one."""
    g = torch.Generator().manual_seed(5)
    logp = -torch.rand(8, generator=g, dtype=torch.float64) * 30
    ref = logp - torch.randn(8, generator=g, dtype=torch.float64) * 2
    ref[4:6] = logp[4:6] - torch.tensor([3.0, 2.5], dtype=torch.float64)   # pi - ref ~ +3 on rank 0's KL
    ref[6:8] = logp[6:8] - torch.tensor([-1.0, -0.5], dtype=torch.float64)  # ~ -1 on rank 1's KL
    counts = torch.randint(1, 30, (8,), generator=g).to(torch.float64)
    labels = [1.0, 0.0, 0.0, 1.0]
    return logp, ref, counts, labels


def local_batch(examples, logp, ref, counts, labels, order):
    """Build the micro-batch of `examples` with its sequences laid out in `order` (a permutation)."""
    seqs = [e for e in examples] + [4 + e for e in examples]          # global sequence ids
    seqs = [seqs[i] for i in order]
    pos = {s: i for i, s in enumerate(seqs)}
    pol = SequenceStats(logp[seqs].clone().requires_grad_(), counts[seqs].clone())
    refs = SequenceStats(ref[seqs].clone(), counts[seqs].clone())
    batch = {"target_idx": torch.tensor([pos[e] for e in examples]),
             "kl_idx": torch.tensor([pos[4 + e] for e in examples]),
             "kto_label": torch.tensor([labels[e] for e in examples], dtype=torch.float64)}
    return pol, refs, batch, seqs


def run_kto(examples, ps, order):
    logp, ref, counts, labels = global_data()
    obj = build_objective(ObjectiveConfig(name="kto", beta=BETA, desirable_weight=DW, undesirable_weight=UW), ps)
    pol, refs, batch, seqs = local_batch(examples, logp, ref, counts, labels, order)
    loss, metrics = obj.loss(pol, refs, batch)
    loss.backward()
    grads = {s: pol.logp_sum.grad[i].item() for i, s in enumerate(seqs)}
    return loss.item(), metrics["kl"].item(), grads


def rank_fn(rank, world_size):
    group = dist.new_group(list(range(world_size)))
    ps = types.SimpleNamespace(dp_group=group, dp_size=world_size, dp_rank=rank)
    examples = [2 * rank, 2 * rank + 1]
    return run_kto(examples, ps, order=[3, 0, 2, 1] if rank == 0 else [1, 2, 3, 0])


def formula():
    """Independent float64 value of the global KTO loss and z0."""
    logp, ref, counts, labels = global_data()
    z0 = max(0.0, sum(logp[k].item() - ref[k].item() for k in range(4, 8)) / 4)
    total = 0.0
    for e in range(4):
        r = logp[e].item() - ref[e].item()
        if labels[e] == 1.0:
            total += DW * (1 - 1 / (1 + math.exp(-BETA * (r - z0))))
        else:
            total += UW * (1 - 1 / (1 + math.exp(-BETA * (z0 - r))))
    return total / 4, z0


def test_kto_two_ranks_equal_one_rank():
    results = run_distributed(rank_fn, 2)
    single_loss, single_z0, single_grads = run_kto([0, 1, 2, 3], None, order=[5, 2, 7, 0, 3, 6, 1, 4])
    want_loss, want_z0 = formula()
    assert abs(single_loss - want_loss) < 1e-10 and abs(single_z0 - want_z0) < 1e-10
    assert want_z0 > 0
    for _, z0, _ in results:
        assert abs(z0 - single_z0) < 1e-10
    assert abs(sum(r[0] for r in results) / 2 - single_loss) < 1e-10
    # data-parallel gradient averaging reproduces the single-rank gradients
    for rank, (_, _, grads) in enumerate(results):
        for s, gval in grads.items():
            assert abs(gval / 2 - single_grads[s]) < 1e-10, (rank, s)
    # a per-rank z0 (no all-reduce) would differ: the test data separates the two
    local_kl = [run_kto([2 * r, 2 * r + 1], None, order=[0, 1, 2, 3])[1] for r in range(2)]
    assert all(abs(k - single_z0) > 0.5 for k in local_kl)
