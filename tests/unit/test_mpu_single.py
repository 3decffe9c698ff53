"""Single-process (tp=1) behaviour: layers equal plain torch modules, the shard helpers, the CE."""
import pytest
import torch
import torch.nn.functional as F

from megatron.mpu import (ColumnParallelLinear, ParallelState, RowParallelLinear, VocabParallelEmbedding,
                          copy_to_tp_region, gather_from_sequence_parallel_region, reduce_from_tp_region,
                          shard_tensor, unshard_tensor, vocab_parallel_cross_entropy, vocab_parallel_logprobs)


def test_tp1_layers_draw_the_plain_master_weight():
    ps = ParallelState.single()
    torch.manual_seed(3)
    col = ColumnParallelLinear(6, 10, ps, chunks=[4, 3, 3])
    row = RowParallelLinear(10, 6, ps)
    emb = VocabParallelEmbedding(12, 6, ps, init_method=lambda w: torch.nn.init.uniform_(w, -1, 1))
    after = torch.rand(3)
    torch.manual_seed(3)
    w_col = torch.empty(10, 6).normal_(0, 0.02)
    w_row = torch.empty(6, 10).normal_(0, 0.02)
    w_emb = torch.empty(12, 6).uniform_(-1, 1)
    torch.testing.assert_close(torch.rand(3), after)  # the same amount of randomness was consumed
    torch.testing.assert_close(col.weight.data, w_col, rtol=0, atol=0)
    torch.testing.assert_close(row.weight.data, w_row, rtol=0, atol=0)
    torch.testing.assert_close(emb.weight.data, w_emb, rtol=0, atol=0)
    assert torch.count_nonzero(col.bias) == 0 and torch.count_nonzero(row.bias) == 0
    x = torch.randn(2, 3, 6)
    torch.testing.assert_close(row(col(x)), F.linear(F.linear(x, w_col), w_row))
    ids = torch.tensor([[0, 11, 5]])
    torch.testing.assert_close(emb(ids), w_emb[ids])


def test_mappings_are_identity_without_group():
    x = torch.randn(2, 4, 3)
    for y in (copy_to_tp_region(x, None), reduce_from_tp_region(x, None), gather_from_sequence_parallel_region(x, None)):
        assert y is x


def test_shard_unshard_chunks():
    full = torch.arange(24.).view(12, 2)
    r0 = shard_tensor(full, 0, 2, chunks=[4, 4, 4])
    r1 = shard_tensor(full, 1, 2, chunks=[4, 4, 4])
    idx0 = [0, 1, 4, 5, 8, 9]
    idx1 = [2, 3, 6, 7, 10, 11]
    torch.testing.assert_close(r0, full[idx0])
    torch.testing.assert_close(r1, full[idx1])
    torch.testing.assert_close(unshard_tensor([r0, r1], chunks=[4, 4, 4]), full)
    torch.testing.assert_close(shard_tensor(full, 1, 2, dim=1), full[:, 1:])
    torch.testing.assert_close(shard_tensor(full, 1, 3), full[4:8])
    with pytest.raises(ValueError):
        shard_tensor(full, 0, 2, chunks=[3, 9])
    with pytest.raises(ValueError):
        shard_tensor(full, 0, 2, chunks=[4, 4])


@pytest.mark.parametrize("dtype,chunk", [(torch.float32, None), (torch.float32, 4), (torch.bfloat16, 5)])
def test_cross_entropy_tp1_matches_torch(dtype, chunk):
    torch.manual_seed(0)
    logits = (torch.randn(2, 7, 33) * 3).to(dtype).requires_grad_()
    target = torch.randint(0, 33, (2, 7))
    weights = torch.rand(2, 7)
    ps = ParallelState.single()
    loss = vocab_parallel_cross_entropy(logits, target, ps, chunk_size=chunk)
    assert loss.dtype == torch.float32 and loss.shape == (2, 7)
    (loss * weights).sum().backward()
    ref_logits = logits.detach().float().requires_grad_()
    ref = F.cross_entropy(ref_logits.view(-1, 33), target.view(-1), reduction="none").view(2, 7)
    (ref * weights).sum().backward()
    torch.testing.assert_close(loss, ref, atol=1e-5, rtol=1e-5)
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    assert logits.grad.dtype == dtype
    torch.testing.assert_close(logits.grad.float(), ref_logits.grad, atol=tol, rtol=tol)
    logp = vocab_parallel_logprobs(logits.detach(), target, ps, chunk_size=chunk)
    ref_logp = torch.log_softmax(ref_logits.detach(), -1).gather(-1, target[..., None]).squeeze(-1)
    torch.testing.assert_close(logp, ref_logp, atol=1e-5, rtol=1e-5)


def test_cross_entropy_rejects_shape_mismatch():
    with pytest.raises(ValueError):
        vocab_parallel_cross_entropy(torch.randn(2, 3, 5), torch.zeros(2, 4, dtype=torch.long), ParallelState.single())
