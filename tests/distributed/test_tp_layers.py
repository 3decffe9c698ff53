"""Tensor-parallel layers, cross-entropy and sequence parallelism at tp=2 on 2 real gloo ranks, compared
with plain torch modules built from the same seed; and the group layout on 4 ranks."""
import torch
import torch.distributed as dist
import torch.nn.functional as F

from megatron.mpu import (ColumnParallelLinear, ParallelState, RowParallelLinear, VocabParallelEmbedding,
                          gather_from_sequence_parallel_region, initialize_parallel,
                          scatter_to_sequence_parallel_region, vocab_parallel_cross_entropy,
                          vocab_parallel_logprobs)
from megatron.testing.distributed import run_distributed

TOL = dict(atol=1e-5, rtol=1e-5)


def close(actual, expected, what, **tol):
    torch.testing.assert_close(actual, expected, **(tol or TOL), msg=lambda m: f"{what}: {m}")


def _master(seed, *shape):
    """The full weight a layer must draw after torch.manual_seed(seed): plain normal(0, 0.02)."""
    torch.manual_seed(seed)
    return torch.empty(*shape).normal_(0.0, 0.02)


def _check_column(ps, r):
    B, S, IN, OUT = 2, 3, 6, 8
    w = _master(10, OUT, IN)
    half = slice(r * OUT // 2, (r + 1) * OUT // 2)
    for gather in (False, True):
        torch.manual_seed(10)
        layer = ColumnParallelLinear(IN, OUT, ps, gather_output=gather)
        close(layer.weight.data, w[half], "column weight shard")
        b = torch.randn(OUT)
        layer.bias.data.copy_(b[half])
        x = torch.randn(B, S, IN)
        g = torch.randn(B, S, OUT)
        xr = x.clone().requires_grad_()
        ref_w = w.clone().requires_grad_()
        (F.linear(xr, ref_w, b) * g).sum().backward()
        xt = x.clone().requires_grad_()
        y = layer(xt)
        ref_y = F.linear(x, w, b)
        if gather:
            close(y, ref_y, "column gathered output")
            (y * g).sum().backward()
        else:
            close(y, ref_y[..., half], "column output shard")
            (y * g[..., half]).sum().backward()
        close(xt.grad, xr.grad, f"column input grad gather={gather}")
        close(layer.weight.grad, ref_w.grad[half], f"column weight grad gather={gather}")
        close(layer.bias.grad, g.sum((0, 1))[half], "column bias grad")


def _check_fused_chunks(ps, r):
    IN, chunks = 4, [8, 4, 4]  # e.g. q (4 heads of 2), k, v (2 heads of 2)
    w = _master(11, 16, IN)
    b = torch.randn(16)
    mine = [i for start, n in ((0, 8), (8, 4), (12, 4)) for i in range(start + r * n // 2, start + (r + 1) * n // 2)]
    for gather in (False, True):
        torch.manual_seed(11)
        layer = ColumnParallelLinear(IN, 16, ps, chunks=chunks, gather_output=gather)
        close(layer.weight.data, w[mine], "fused weight rows [q_r | k_r | v_r]")
        layer.bias.data.copy_(b[mine])
        x = torch.randn(2, 3, IN)
        xr, xt = x.clone().requires_grad_(), x.clone().requires_grad_()
        g = torch.randn(2, 3, 16)
        ref_w = w.clone().requires_grad_()
        (F.linear(xr, ref_w, b) * g).sum().backward()
        y = layer(xt)
        if gather:
            close(y, F.linear(x, w, b), "fused gathered output in the full layout")
            (y * g).sum().backward()
        else:
            close(y, F.linear(x, w, b)[..., mine], "fused output shard")
            (y * g[..., mine]).sum().backward()
        close(xt.grad, xr.grad, "fused input grad")
        close(layer.weight.grad, ref_w.grad[mine], "fused weight grad")
    # stride=2 is two equal chunks
    torch.manual_seed(11)
    strided = ColumnParallelLinear(IN, 16, ps, stride=2)
    close(strided.weight.data, w[[i for s in (0, 8) for i in range(s + 4 * r, s + 4 * r + 4)]], "stride=2 rows")


def _check_row(ps, r):
    B, S, IN, OUT = 2, 3, 8, 5
    w = _master(12, OUT, IN)
    cols = slice(r * IN // 2, (r + 1) * IN // 2)
    for parallel_input in (True, False):
        torch.manual_seed(12)
        layer = RowParallelLinear(IN, OUT, ps, input_is_parallel=parallel_input)
        close(layer.weight.data, w[:, cols], "row weight shard")
        b = torch.randn(OUT)
        layer.bias.data.copy_(b)
        x, g = torch.randn(B, S, IN), torch.randn(B, S, OUT)
        xr, ref_w = x.clone().requires_grad_(), w.clone().requires_grad_()
        ref_y = F.linear(xr, ref_w, b)
        (ref_y * g).sum().backward()
        xt = (x[..., cols] if parallel_input else x).clone().requires_grad_()
        y = layer(xt)
        close(y, ref_y.detach(), "row output (bias added once)")
        (y * g).sum().backward()
        close(xt.grad, xr.grad[..., cols] if parallel_input else xr.grad, "row input grad")
        close(layer.weight.grad, ref_w.grad[:, cols], "row weight grad")
        close(layer.bias.grad, g.sum((0, 1)), "row bias grad")


def _check_embedding(ps, r):
    V, H = 10, 4
    w = _master(13, V, H)
    ids = torch.tensor([[0, 9, 4, 5], [5, 1, 8, 0]])  # both halves, both boundaries
    for sp in (False, True):
        torch.manual_seed(13)
        emb = VocabParallelEmbedding(V, H, ps, sequence_parallel=sp)
        rows = slice(r * V // 2, (r + 1) * V // 2)
        close(emb.weight.data, w[rows], "embedding rows")
        ref_w = w.clone().requires_grad_()
        g = torch.randn(2, 4, H)
        ref = F.embedding(ids, ref_w)
        (ref * g).sum().backward()
        out = emb(ids)
        seq = slice(r * 2, r * 2 + 2) if sp else slice(None)
        close(out, ref.detach()[:, seq], f"embedding output sp={sp}")
        (out * g[:, seq]).sum().backward()
        # with SP each rank's loss covers its own tokens; the backward all-gather makes the shard's
        # gradient the full one for its rows
        close(emb.weight.grad, ref_w.grad[rows], f"embedding weight grad sp={sp}")


def _check_cross_entropy(ps, r):
    B, S, V = 2, 5, 12
    torch.manual_seed(14)
    full = torch.randn(B, S, V) * 4
    target = torch.tensor([[0, 11, 5, 6, 3], [7, 2, 9, 6, 5]])
    weights = torch.rand(B, S)
    cols = slice(r * V // 2, (r + 1) * V // 2)
    ref_logits = full.clone().requires_grad_()
    ref = F.cross_entropy(ref_logits.view(-1, V), target.view(-1), reduction="none").view(B, S)
    (ref * weights).sum().backward()
    for chunk in (None, 3, 100):
        shard = full[..., cols].clone().requires_grad_()
        loss = vocab_parallel_cross_entropy(shard, target, ps, chunk_size=chunk)
        assert loss.dtype == torch.float32
        close(loss, ref.detach(), f"CE values chunk={chunk}")
        (loss * weights).sum().backward()
        close(shard.grad, ref_logits.grad[..., cols], f"CE grad chunk={chunk}")
    lp_logits = full.clone().requires_grad_()
    ref_lp = torch.log_softmax(lp_logits, -1).gather(-1, target[..., None]).squeeze(-1)
    (ref_lp * weights).sum().backward()
    shard = full[..., cols].clone().requires_grad_()
    lp = vocab_parallel_logprobs(shard, target, ps, chunk_size=4)
    close(lp, ref_lp.detach(), "logprob values")
    (lp * weights).sum().backward()
    close(shard.grad, lp_logits.grad[..., cols], "logprob grad")
    # bf16 logits: fp32 math on the rounded values, gradient returned in bf16
    shard = full[..., cols].bfloat16().requires_grad_()
    rounded = full.bfloat16().float().requires_grad_()
    ref16 = F.cross_entropy(rounded.view(-1, V), target.view(-1), reduction="none").view(B, S)
    (ref16 * weights).sum().backward()
    loss16 = vocab_parallel_cross_entropy(shard, target, ps, chunk_size=3)
    close(loss16, ref16.detach(), "bf16 CE values")
    (loss16 * weights).sum().backward()
    assert shard.grad.dtype == torch.bfloat16
    close(shard.grad.float(), rounded.grad[..., cols], "bf16 CE grad", atol=1e-2, rtol=1e-2)


def _column_row(ps, sp, x, g, biases):
    """Column(6->8) -> gelu -> Row(8->6) built from seed 15; returns (output, grads dict)."""
    torch.manual_seed(15)
    col = ColumnParallelLinear(6, 8, ps, sequence_parallel=sp)
    row = RowParallelLinear(8, 6, ps, sequence_parallel=sp)
    r = ps.tp_rank
    col.bias.data.copy_(biases[0][r * 4:(r + 1) * 4])
    row.bias.data.copy_(biases[1])
    x = x.clone().requires_grad_()
    y = row(F.gelu(col(x)))
    (y * g).sum().backward()
    return y.detach(), {"x": x.grad, "col.w": col.weight.grad, "col.b": col.bias.grad,
                        "row.w": row.weight.grad, "row.b": row.bias.grad}


def _check_sequence_parallel(ps, r):
    B, S = 2, 4
    torch.manual_seed(16)
    x, g = torch.randn(B, S, 6), torch.randn(B, S, 6)
    biases = (torch.randn(8), torch.randn(6))
    seq = slice(r * S // 2, (r + 1) * S // 2)
    y, grads = _column_row(ps, False, x, g, biases)
    y_sp, grads_sp = _column_row(ps, True, x[:, seq], g[:, seq], biases)
    assert y_sp.shape == (B, S // 2, 6)
    close(y_sp, y[:, seq], "SP output vs non-SP")
    close(grads_sp["x"], grads["x"][:, seq], "SP input grad")
    for k in ("col.w", "col.b", "row.w", "row.b"):
        close(grads_sp[k], grads[k], f"SP grad {k}")
    # plain-torch reference for the non-SP pair
    w1, w2 = _master(15, 8, 6), torch.empty(6, 8).normal_(0.0, 0.02)
    close(y, F.linear(F.gelu(F.linear(x, w1, biases[0])), w2, biases[1]), "column->row vs plain torch")
    # the raw mappings: scatter then gather is the identity; replicated-consumer gather splits its grad
    t = torch.randn(B, S, 3).requires_grad_()
    back = gather_from_sequence_parallel_region(scatter_to_sequence_parallel_region(t, ps.tp_group), ps.tp_group,
                                                tensor_parallel_output_grad=False)
    close(back, t.detach(), "scatter/gather round trip")
    (back * g[..., :3]).sum().backward()
    close(t.grad, g[..., :3], "split-backward gather grad")


def tp2_worker(rank, world_size):
    ps = initialize_parallel(tensor=2, pipeline=1)
    assert (ps.tp_size, ps.tp_rank, ps.dp_size) == (2, rank, 1)
    for check in (_check_column, _check_fused_chunks, _check_row, _check_embedding, _check_cross_entropy,
                  _check_sequence_parallel):
        check(ps, ps.tp_rank)
    # TP-invariance: the tp=1 layer drawn after the same seed is the concatenation of the shards
    torch.manual_seed(20)
    shard = ColumnParallelLinear(4, 6, ps, chunks=[2, 4]).weight.data
    torch.manual_seed(20)
    full = ColumnParallelLinear(4, 6, ParallelState.single(), chunks=[2, 4]).weight.data
    parts = [torch.empty_like(shard) for _ in range(2)]
    dist.all_gather(parts, shard, group=ps.tp_group)
    close(torch.cat([parts[0][:1], parts[1][:1], parts[0][1:], parts[1][1:]]), full, "tp=2 vs tp=1 model")
    return True


def grid_worker(rank, world_size):
    out = {}
    try:
        initialize_parallel(tensor=3, pipeline=1)
        raise AssertionError("tensor=3 on 4 ranks must raise")
    except ValueError as e:
        assert "4" in str(e) and "3" in str(e)
    for tp, pp in ((2, 1), (2, 2)):
        ps = initialize_parallel(tensor=tp, pipeline=pp)
        sums = {}
        for name in ("tp", "dp", "pp", "mp"):
            group = getattr(ps, f"{name}_group")
            t = torch.tensor([float(rank)])
            dist.all_reduce(t, group=group)
            sums[name] = t.item()
            assert dist.get_world_size(group) == len(getattr(ps, f"{name}_ranks"))
            assert dist.get_rank(group) == getattr(ps, f"{name}_ranks").index(rank)
        out[(tp, pp)] = dict(tp=ps.tp_ranks, dp=ps.dp_ranks, pp=ps.pp_ranks, mp=ps.mp_ranks, sums=sums,
                             coords=(ps.pp_rank, ps.dp_rank, ps.tp_rank), first=ps.is_first_stage,
                             last=ps.is_last_stage,
                             ds=(ps.get_data_parallel_rank(), ps.get_data_parallel_world_size(),
                                 ps.get_tensor_model_parallel_rank(), ps.get_tensor_model_parallel_world_size(),
                                 ps.get_pipeline_model_parallel_rank(), ps.get_pipeline_model_parallel_world_size(),
                                 ps.get_model_parallel_rank(), ps.get_model_parallel_world_size()))
        assert ps.get_data_parallel_group() is ps.dp_group and ps.get_model_parallel_group() is ps.mp_group
        assert ps.get_tensor_model_parallel_group() is ps.tp_group
        assert ps.get_pipeline_model_parallel_group() is ps.pp_group
    return out


def test_tp2_layers_cross_entropy_and_sequence_parallel():
    assert run_distributed(tp2_worker, 2) == [True, True]


def test_group_membership_4_ranks():
    res = run_distributed(grid_worker, 4)
    # tp=2 x dp=2: rank = dp*2 + tp
    tp_groups = {0: [0, 1], 1: [0, 1], 2: [2, 3], 3: [2, 3]}
    dp_groups = {0: [0, 2], 1: [1, 3], 2: [0, 2], 3: [1, 3]}
    for r in range(4):
        a = res[r][(2, 1)]
        assert a["tp"] == tp_groups[r] and a["dp"] == dp_groups[r] and a["pp"] == [r] and a["mp"] == tp_groups[r]
        assert a["sums"] == {"tp": sum(tp_groups[r]), "dp": sum(dp_groups[r]), "pp": r, "mp": sum(tp_groups[r])}
        assert a["coords"] == (0, r // 2, r % 2) and a["first"] and a["last"]
        assert a["ds"] == (r // 2, 2, r % 2, 2, 0, 1, r % 2, 2)
        # tp=2 x pp=2 (dp=1): rank = pp*2 + tp
        b = res[r][(2, 2)]
        assert b["tp"] == tp_groups[r] and b["pp"] == [r % 2, r % 2 + 2] and b["dp"] == [r] and b["mp"] == [0, 1, 2, 3]
        assert b["sums"] == {"tp": sum(tp_groups[r]), "dp": r, "pp": 2 * (r % 2) + 2, "mp": 6}
        assert b["coords"] == (r // 2, 0, r % 2)
        assert (b["first"], b["last"]) == (r < 2, r >= 2)
        assert b["ds"] == (0, 1, r % 2, 2, r // 2, 2, r, 4)
