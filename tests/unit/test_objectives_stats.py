"""sequence_stats / precomputed_reference against a plain loop over tokens."""
import math
import random

import torch

from megatron.objectives import SequenceStats, precomputed_reference, sequence_stats, token_counts


def packed_batch(seed, n_seq=8, rows=3, seqlen=14):
    """Pack n_seq sequences into `rows` rows (first-fit), with prompt tokens and random holes unscored,
    -1 padding, and 1s in loss_mask at some padding positions (must be ignored)."""
    rnd = random.Random(seed)
    seq_id = [[-1] * seqlen for _ in range(rows)]
    mask = [[0.0] * seqlen for _ in range(rows)]
    fill = [0] * rows
    last = []
    for n in range(n_seq):
        length = rnd.randint(2, 5)
        row = min((r for r in range(rows) if fill[r] + length <= seqlen), key=lambda r: fill[r])
        start = fill[row]
        prompt = rnd.randint(0, length - 1)
        for t in range(start, start + length):
            seq_id[row][t] = n
            scored = t - start >= prompt and rnd.random() > 0.15
            mask[row][t] = 1.0 if scored else 0.0
        fill[row] += length
        last.append(row * seqlen + start + length - 1)
    for r in range(rows):  # garbage mask in padding
        for t in range(fill[r], seqlen):
            if rnd.random() < 0.5:
                mask[r][t] = 1.0
    return {
        "seq_id": torch.tensor(seq_id, dtype=torch.long),
        "loss_mask": torch.tensor(mask, dtype=torch.float32),
        "seq_last_pos": torch.tensor(last, dtype=torch.long),
    }


def loop_stats(token_logps, values, batch):
    seq_id, mask = batch["seq_id"].tolist(), batch["loss_mask"].tolist()
    n = len(batch["seq_last_pos"])
    sums, counts = [0.0] * n, [0.0] * n
    for b in range(len(seq_id)):
        for t in range(len(seq_id[b])):
            s = seq_id[b][t]
            if s >= 0 and mask[b][t] != 0:
                sums[s] += float(token_logps[b][t]) * mask[b][t]
                counts[s] += mask[b][t]
    seqlen = len(seq_id[0])
    scores = [float(values[p // seqlen][p % seqlen]) for p in batch["seq_last_pos"].tolist()]
    return sums, counts, scores


def test_sequence_stats_matches_loop_and_ignores_padding():
    for seed in range(3):
        batch = packed_batch(seed)
        g = torch.Generator().manual_seed(seed)
        logps = -torch.rand(batch["seq_id"].shape, generator=g, dtype=torch.float64) * 5
        values = torch.randn(batch["seq_id"].shape, generator=g, dtype=torch.float64)
        # non-finite values where nothing is scored must not leak into sums or gradients
        unscored = (batch["seq_id"] < 0) | (batch["loss_mask"] == 0)
        logps = torch.where(unscored, torch.full_like(logps, -math.inf), logps)
        sums, counts, scores = loop_stats(logps.tolist(), values.tolist(), batch)
        st = sequence_stats(logps, batch, values)
        assert st.logp_sum.dtype == torch.float64 and st.logp_sum.shape == (8,)
        assert torch.allclose(st.logp_sum, torch.tensor(sums, dtype=torch.float64), atol=1e-12, rtol=0)
        assert torch.equal(st.token_count, torch.tensor(counts, dtype=torch.float64))
        assert torch.allclose(st.scores, torch.tensor(scores, dtype=torch.float64), atol=0, rtol=0)
        assert torch.isfinite(st.logp_sum).all()
        assert st.token_count.sum() > 0 and (st.token_count < torch.tensor([5.0] * 8, dtype=torch.float64) + 1).all()


def test_sequence_stats_gradients():
    batch = packed_batch(7)
    g = torch.Generator().manual_seed(7)
    logps = (-torch.rand(batch["seq_id"].shape, generator=g, dtype=torch.float64) * 3).requires_grad_()
    values = torch.randn(batch["seq_id"].shape, generator=g, dtype=torch.float64).requires_grad_()
    w = torch.randn(8, generator=g, dtype=torch.float64)
    v = torch.randn(8, generator=g, dtype=torch.float64)
    st = sequence_stats(logps, batch, values)
    ((st.logp_sum * w).sum() + (st.scores * v).sum()).backward()
    seq_id, mask = batch["seq_id"].tolist(), batch["loss_mask"].tolist()
    seqlen = len(seq_id[0])
    last = {p: i for i, p in enumerate(batch["seq_last_pos"].tolist())}
    for b in range(len(seq_id)):
        for t in range(seqlen):
            s = seq_id[b][t]
            expect = w[s].item() * mask[b][t] if s >= 0 else 0.0
            assert abs(logps.grad[b, t].item() - expect) < 1e-12
            p = b * seqlen + t
            expect_v = v[last[p]].item() if p in last else 0.0
            assert abs(values.grad[b, t].item() - expect_v) < 1e-12


def test_low_precision_promoted_to_fp32_and_no_scores():
    batch = packed_batch(3)
    logps = -torch.rand(batch["seq_id"].shape).to(torch.bfloat16)
    st = sequence_stats(logps, batch)
    assert st.logp_sum.dtype == torch.float32 and st.token_count.dtype == torch.float32
    assert st.scores is None
    sums, counts, _ = loop_stats(logps.float().tolist(), logps.float().tolist(), batch)
    assert torch.allclose(st.logp_sum, torch.tensor(sums), atol=1e-5)


def test_precomputed_reference_counts_equal_policy():
    batch = packed_batch(11)
    ref = -torch.rand(8, dtype=torch.float64) * 10
    batch["ref_logps"] = ref
    st = precomputed_reference(batch)
    pol = sequence_stats(-torch.rand(batch["seq_id"].shape, dtype=torch.float64), batch)
    assert torch.equal(st.logp_sum, ref)
    assert torch.equal(st.token_count, pol.token_count)
    assert torch.equal(token_counts(batch, torch.float64), pol.token_count)
    assert not st.logp_sum.requires_grad
    _, counts, _ = loop_stats(torch.zeros(batch["seq_id"].shape).tolist(), torch.zeros(batch["seq_id"].shape).tolist(), batch)
    assert st.token_count.tolist() == counts


def test_mean_logp_zero_count():
    st = SequenceStats(torch.tensor([-3.0, 0.0]), torch.tensor([2.0, 0.0]))
    assert st.mean_logp().tolist() == [-1.5, 0.0]
    assert st.num_sequences == 2
