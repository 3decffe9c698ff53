"""Global-batch normalisation (objectives/aggregation.py) makes losses independent of the micro-batch split.

A global batch of sequences with unequal lengths is cut into micro-batches of unequal token counts. With the
loop's GlobalCounts in every micro-batch, the MEAN of the micro-batch losses (what DeepSpeed's averaging over
accumulation steps and data-parallel ranks back-propagates) equals the full-batch loss, and so do the
gradients; without them (per-micro-batch means) it does not. Checked for SFT, DPO with RPO's NLL term,
ORPO, SimPO with its NLL term and every `agg_token_loss` mode, against float64 formulas written out here.
"""
import math
import random

import pytest
import torch

from megatron.config.schema import ObjectiveConfig
from megatron.objectives import build_objective, sequence_stats
from megatron.objectives.aggregation import (AGG_MODES, GLOBAL_COUNTS, GlobalCounts, agg_token_loss, global_counts,
                                             local_counts)

S = 12


def make_sequences(seed, n):
    """n sequences: (length, scored tokens, per-token log-probs as a float64 leaf tensor [length])."""
    rnd = random.Random(seed)
    out = []
    for _ in range(n):
        length = rnd.randint(3, S)
        scored = rnd.randint(1, length - 1)
        logps = torch.tensor([-rnd.uniform(0.05, 3.0) for _ in range(length)], dtype=torch.float64,
                             requires_grad=True)
        out.append((length, scored, logps))
    return out


def make_batch(seqs, pairwise):
    """One row per sequence (unpacked layout), padded to S; returns (batch dict, token_logps [B,S])."""
    b = len(seqs)
    seq_id = torch.full((b, S), -1, dtype=torch.long)
    mask = torch.zeros(b, S)
    rows = []
    last = []
    for i, (length, scored, logps) in enumerate(seqs):
        seq_id[i, :length] = i
        mask[i, length - scored:length] = 1.0
        rows.append(torch.cat([logps, torch.full((S - length,), float("nan"), dtype=torch.float64)]))
        last.append(i * S + length - 1)
    batch = {"seq_id": seq_id, "loss_mask": mask, "seq_last_pos": torch.tensor(last)}
    if pairwise:
        batch["chosen_idx"] = torch.arange(0, b, 2)
        batch["rejected_idx"] = torch.arange(1, b, 2)
    return batch, torch.stack(rows)


def split(seqs, sizes):
    out, start = [], 0
    for k in sizes:
        out.append(seqs[start:start + k])
        start += k
    assert start == len(seqs)
    return out


def objective(**kw):
    return build_objective(ObjectiveConfig(**kw), None)


def run_loss(obj, seqs, pairwise, counts, ref_shift):
    """(loss, metrics) of `obj` on one micro-batch of `seqs` (reference = policy sums + fixed shifts)."""
    batch, token_logps = make_batch(seqs, pairwise)
    if counts is not None:
        batch[GLOBAL_COUNTS] = counts
    policy = sequence_stats(token_logps, batch)
    reference = sequence_stats(token_logps.detach(), batch)
    reference.logp_sum = reference.logp_sum + torch.tensor(ref_shift[:len(seqs)], dtype=torch.float64)
    return obj.loss(policy, reference, batch)


CASES = [
    ("sft", dict(name="sft"), False),
    ("dpo+nll", dict(name="dpo", beta=0.3, nll_weight=0.7), True),
    ("ipo+nll", dict(name="dpo", beta=0.3, loss_type="ipo", nll_weight=0.5), True),
    ("orpo", dict(name="orpo", beta=0.2, orpo_lambda=0.4), True),
    ("simpo+nll", dict(name="simpo", beta=2.0, gamma=0.5, nll_weight=1.0), True),
]


@pytest.mark.parametrize("name,kw,pairwise", CASES, ids=[c[0] for c in CASES])
def test_split_micro_batches_give_the_full_batch_loss_and_gradient(name, kw, pairwise):
    n = 12  # sequences: 12 SFT examples or 6 pairs
    seqs = make_sequences(len(name) * 7 + int(pairwise), n)
    rnd = random.Random(5)
    shifts = [rnd.gauss(0.0, 2.0) for _ in range(n)]
    obj = objective(**kw)

    full_loss, full_metrics = run_loss(obj, seqs, pairwise, None, shifts)
    full_grads = torch.autograd.grad(full_loss, [s[2] for s in seqs])

    # Unequal micro-batches (in sequences, hence in tokens): 2 "ranks" x 2 "accumulation steps".
    sizes = [6, 2, 2, 2] if pairwise else [5, 1, 2, 4]
    parts = split(seqs, sizes)
    part_shifts = split(shifts, sizes)
    counts = global_counts([local_counts(make_batch(p, pairwise)[0]) for p in parts], ps=None)
    assert counts.contributors == 4
    results = [run_loss(obj, p, pairwise, counts, sh) for p, sh in zip(parts, part_shifts)]
    mean_loss = sum(loss for loss, _ in results) / len(results)  # DeepSpeed: / grad_accum, then mean over dp
    split_grads = torch.autograd.grad(mean_loss, [s[2] for s in seqs])
    assert mean_loss.item() == pytest.approx(full_loss.item(), abs=1e-12, rel=1e-12)
    for got, want in zip(split_grads, full_grads):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14)
    for key, value in full_metrics.items():  # metrics average the same way to their global values
        got = sum(float(m[key]) for _, m in results) / len(results)
        assert got == pytest.approx(float(value), abs=1e-12, rel=1e-12), key

    # Without global counts (each micro-batch normalised by its own counts) the mean differs: the test can fail.
    local = [run_loss(obj, p, pairwise, None, sh)[0] for p, sh in zip(parts, part_shifts)]
    assert abs(sum(x.item() for x in local) / len(local) - full_loss.item()) > 1e-6


def test_sft_metrics_are_global():
    seqs = make_sequences(3, 6)
    parts = split(seqs, [1, 5])
    counts = global_counts([local_counts(make_batch(p, False)[0]) for p in parts], ps=None)
    total_tokens = sum(s[1] for s in seqs)
    assert counts.units == {"tokens": total_tokens, "sequences": 6.0, "examples": 6.0, "chosen_tokens": 0.0}
    obj = objective(name="sft")
    metrics = [run_loss(obj, p, False, counts, [0.0] * 6)[1] for p in parts]
    assert all(float(m["tokens"]) == total_tokens for m in metrics)
    nll = -sum(float(s[2][s[0] - s[1]:].detach().sum()) for s in seqs) / total_tokens
    mean = obj.summarize_metrics({"nll": sum(float(m["nll"]) for m in metrics) / 2})
    assert mean["nll"] == pytest.approx(nll, rel=1e-12) and mean["ppl"] == pytest.approx(math.exp(nll), rel=1e-12)


def test_pairwise_counts():
    seqs = make_sequences(4, 6)
    batch, _ = make_batch(seqs, True)
    c = local_counts(batch)
    assert c["examples"] == 3 and c["sequences"] == 6
    assert c["tokens"] == sum(s[1] for s in seqs)
    assert c["chosen_tokens"] == sum(seqs[i][1] for i in (0, 2, 4))


def _agg_reference(seqs, values, mode, norm_len):
    """float64 formula for one global batch: values[i] is the list of per-token losses of sequence i."""
    scored = [v[len(v) - s[1]:] for s, v in zip(seqs, values)]
    if mode == "token-mean":
        return sum(sum(x) for x in scored) / sum(len(x) for x in scored)
    per_seq = {"seq-mean-token-sum": lambda x: sum(x), "seq-mean-token-mean": lambda x: sum(x) / len(x),
               "seq-mean-token-sum-norm": lambda x: sum(x) / norm_len}[mode]
    return sum(per_seq(x) for x in scored) / len(scored)


@pytest.mark.parametrize("mode", AGG_MODES)
def test_agg_token_loss_modes(mode):
    seqs = make_sequences(11, 7)
    values = [[float(x) * 1.7 + 0.3 for x in s[2].detach()] for s in seqs]
    want = _agg_reference(seqs, values, mode, norm_len=S)
    batch, _ = make_batch(seqs, False)
    per_token = torch.full((len(seqs), S), float("inf"), dtype=torch.float64)  # unscored: never read
    for i, v in enumerate(values):
        per_token[i, :len(v)] = torch.tensor(v, dtype=torch.float64)
    per_token.requires_grad_(True)
    whole = agg_token_loss(per_token, batch, mode, norm_len=S)
    assert whole.item() == pytest.approx(want, rel=1e-12)
    (grad_whole,) = torch.autograd.grad(whole, per_token)
    # Split into 3 micro-batches of unequal size: the mean of the shares is the same value and gradient.
    sizes, starts = [3, 1, 3], [0, 3, 4]
    parts = [make_batch(seqs[s:s + k_], False)[0] for s, k_ in zip(starts, sizes)]
    counts = global_counts([local_counts(p) for p in parts], ps=None)
    shares = []
    for p, s, k_ in zip(parts, starts, sizes):
        p[GLOBAL_COUNTS] = counts
        shares.append(agg_token_loss(per_token[s:s + k_], p, mode, norm_len=S))
    mean = sum(shares) / len(shares)
    assert mean.item() == pytest.approx(want, rel=1e-12)
    (grad_split,) = torch.autograd.grad(mean, per_token)
    torch.testing.assert_close(grad_split, grad_whole, rtol=1e-12, atol=1e-15)
    assert torch.isfinite(grad_whole).all()


def test_errors_name_the_fix():
    seqs = make_sequences(1, 2)
    batch, logps = make_batch(seqs, False)
    with pytest.raises(ValueError, match="unknown mode 'token-avg'"):
        agg_token_loss(logps, batch, "token-avg")
    with pytest.raises(ValueError, match="norm_len"):
        agg_token_loss(logps, batch, "seq-mean-token-sum-norm")
    batch[GLOBAL_COUNTS] = GlobalCounts({"tokens": 3.0}, contributors=1)
    with pytest.raises(KeyError, match="count_units"):
        agg_token_loss(logps, batch, "seq-mean-token-mean")
