"""Vocab-parallel cross-entropy at tensor=2 with ignored positions equals F.cross_entropy(ignore_index)."""
import torch
import torch.nn.functional as F

from megatron.testing.distributed import run_distributed

IGNORE = -100


def _check(rank, world_size):
    from megatron.mpu import initialize_parallel, vocab_parallel_cross_entropy, vocab_parallel_logprobs

    ps = initialize_parallel(tensor=2, pipeline=1)
    torch.manual_seed(0)
    B, S, V = 3, 7, 64
    full = torch.randn(B, S, V, dtype=torch.float64) * 3
    target = torch.randint(0, V, (B, S))
    target[0, :3] = IGNORE
    target[2, -2:] = IGNORE
    ref_logits = full.clone().requires_grad_(True)
    ref = F.cross_entropy(ref_logits.reshape(-1, V), target.reshape(-1), ignore_index=IGNORE, reduction="sum")
    ref.backward()
    shard = full[..., rank * V // 2:(rank + 1) * V // 2].clone().requires_grad_(True)
    ours = vocab_parallel_cross_entropy(shard, target, ps, chunk_size=5, ignore_index=IGNORE)
    assert bool((ours[target == IGNORE] == 0).all())
    ours.sum().backward()
    logp = vocab_parallel_logprobs(shard.detach(), target, ps, ignore_index=IGNORE)
    return (float((ours.sum() - ref).abs()),
            float((shard.grad - ref_logits.grad[..., rank * V // 2:(rank + 1) * V // 2]).abs().max()),
            float((logp + ours.detach()).abs().max()))


def test_cross_entropy_with_ignored_positions():
    for loss_err, grad_err, logp_err in run_distributed(_check, 2):
        assert loss_err < 1e-5 and grad_err < 1e-6 and logp_err == 0.0  # fp32 math inside
