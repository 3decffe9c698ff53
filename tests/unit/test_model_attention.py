"""Attention backends: eager vs an independent per-sequence twin, sdpa == eager on packed rows with padding,
GQA, the varlen (flash) plumbing through a plain-torch varlen kernel, and backend selection."""
import math

import pytest
import torch

from megatron.model.attention_backends import (core_attention, eager_attention, packed_causal_mask,
                                               resolve_backend, sdpa_attention)
from megatron.model.varlen import varlen_attention, varlen_index

# two rows: [seq1(5) seq2(4) seq3(3) pad(4)] and [seq1(9) pad(7)]
SEG = torch.tensor([[1] * 5 + [2] * 4 + [3] * 3 + [0] * 4, [1] * 9 + [0] * 7])


def _qkv(nq=4, nkv=2, hd=8, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    B, S = SEG.shape
    return [torch.randn(B, S, n, hd, generator=g, dtype=dtype).requires_grad_() for n in (nq, nkv, nkv)]


def _plain_causal(q, k, v):
    """One sequence, q [S, nq, hd], k/v [S, nkv, hd]: textbook causal softmax attention, heads looped."""
    S, nq, hd = q.shape
    rep = nq // k.shape[1]
    out = torch.empty_like(q)
    for h in range(nq):
        s = q[:, h] @ k[:, h // rep].T / math.sqrt(hd)
        s = s + torch.full((S, S), float("-inf")).triu(1)
        out[:, h] = torch.softmax(s, -1) @ v[:, h // rep]
    return out


def _per_sequence_reference(q, k, v, seg):
    out = torch.zeros_like(q)
    for b in range(seg.shape[0]):
        for s in seg[b].unique().tolist():
            if s == 0:
                continue
            idx = (seg[b] == s).nonzero().squeeze(1)
            out[b, idx] = _plain_causal(q[b, idx], k[b, idx], v[b, idx])
    return out


def test_eager_matches_per_sequence_twin_with_gqa():
    q, k, v = _qkv()
    torch.testing.assert_close(eager_attention(q, k, v, SEG), _per_sequence_reference(q, k, v, SEG),
                               rtol=1e-5, atol=1e-5)


def test_sdpa_equals_eager_forward_and_backward():
    for nq, nkv in ((4, 4), (4, 1), (6, 2)):
        q, k, v = _qkv(nq, nkv, seed=nq + nkv)
        ref = eager_attention(q, k, v, SEG)
        ref_grads = torch.autograd.grad((ref * ref.detach().sin()).sum(), (q, k, v))
        out = sdpa_attention(q, k, v, SEG)
        grads = torch.autograd.grad((out * out.detach().sin()).sum(), (q, k, v))
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
        for g, r in zip(grads, ref_grads):
            assert torch.isfinite(g).all()
            torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-5)
        pad = SEG == 0
        assert torch.equal(out[pad], torch.zeros_like(out[pad]))


def test_mask_is_block_diagonal_causal():
    m = packed_causal_mask(torch.tensor([[1, 1, 2, 2, 0]]))[0].int()
    want = torch.tensor([[1, 0, 0, 0, 0],
                         [1, 1, 0, 0, 0],
                         [0, 0, 1, 0, 0],
                         [0, 0, 1, 1, 0],
                         [0, 0, 0, 0, 1]])  # padding may only see itself (finite softmax, zeroed later)
    assert torch.equal(m, want)


def test_varlen_index():
    idx = varlen_index(SEG)
    assert idx.cu_seqlens.dtype == torch.int32
    assert idx.cu_seqlens.tolist() == [0, 5, 9, 12, 21]
    assert idx.max_seqlen == 9
    assert idx.token_index.tolist() == list(range(12)) + list(range(16, 25))
    # adjacent rows whose segment ids match across the row boundary are still different sequences
    assert varlen_index(torch.tensor([[1, 1], [1, 1]])).cu_seqlens.tolist() == [0, 2, 4]


def _torch_varlen_kernel(q, k, v, cu_q, cu_k, max_q, max_k, dropout_p=0.0, softmax_scale=None, causal=True):
    """flash_attn_varlen_func's contract in plain torch (the twin for the flash plumbing)."""
    assert causal and dropout_p == 0.0 and torch.equal(cu_q, cu_k)
    assert softmax_scale == pytest.approx(1 / math.sqrt(q.shape[-1]))
    bounds = cu_q.tolist()
    assert max_q == max(b - a for a, b in zip(bounds, bounds[1:]))
    return torch.cat([_plain_causal(q[a:b], k[a:b], v[a:b]) for a, b in zip(bounds, bounds[1:])])


def test_varlen_plumbing_equals_eager():
    q, k, v = _qkv(4, 2, seed=5)
    out = varlen_attention(q, k, v, SEG, 1 / math.sqrt(8), _torch_varlen_kernel)
    torch.testing.assert_close(out, eager_attention(q, k, v, SEG), rtol=1e-5, atol=1e-5)
    out.sum().backward()
    assert torch.isfinite(q.grad).all() and q.grad[SEG == 0].abs().sum() == 0


def test_backend_selection():
    q = torch.zeros(1, 2, 1, 8)
    assert resolve_backend("auto", q) == "segments"  # no flash-attn on CPU: per-segment SDPA
    assert resolve_backend("eager", q) == "eager"
    with pytest.raises(RuntimeError, match="flash"):
        resolve_backend("flash", q)
    with pytest.raises(ValueError):
        resolve_backend("xformers", q)
    q, k, v = _qkv(seed=9)
    torch.testing.assert_close(core_attention(q, k, v, SEG, "auto"), eager_attention(q, k, v, SEG),
                               rtol=1e-5, atol=1e-5)
