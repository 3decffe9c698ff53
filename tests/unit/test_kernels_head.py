"""The LM head + log-prob kernels on one process: the chunked vocab-parallel log-prob / entropy and the fused
linear + log-prob against independent float64 computations (values and gradients), padded vocabulary rows
masked, odd shapes, and the fused head's peak memory bounded by its chunk at vocab 128k."""
import weakref

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from megatron.mpu import (ParallelState, fused_linear_logprobs, mask_padded_vocab, valid_vocab_columns,
                          vocab_parallel_entropy, vocab_parallel_log_softmax, vocab_parallel_logprobs,
                          vocab_parallel_logprobs_entropy)

PS = ParallelState.single()


def reference(logits: torch.Tensor, target: torch.Tensor, vocab_size: int):
    """float64 log p(target) and entropy over the first vocab_size columns only (padding sliced away)."""
    logp_all = torch.log_softmax(logits.double()[..., :vocab_size], dim=-1)
    logp = logp_all.gather(-1, target[..., None]).squeeze(-1)
    return logp, -(logp_all.exp() * logp_all).sum(-1)


def test_padding_helpers():
    assert valid_vocab_columns(500, 0, 512) == 500 and valid_vocab_columns(500, 256, 256) == 244
    assert valid_vocab_columns(200, 256, 256) == 0 and valid_vocab_columns(None, 256, 256) == 256
    x = torch.randn(3, 256)
    assert mask_padded_vocab(x, 512, 256) is x  # nothing to mask: no copy
    m = mask_padded_vocab(x, 300, 256)
    assert torch.isinf(m[:, 44:]).all() and torch.equal(m[:, :44], x[:, :44])


@pytest.mark.parametrize("chunk", [None, 7])
@pytest.mark.parametrize("vocab", [123, 128])  # 123: the padded columns 123..127 must take no mass
def test_logprobs_and_entropy_match_float64(chunk, vocab):
    g = torch.Generator().manual_seed(0)
    logits = (torch.randn(3, 11, 128, generator=g) * 3).requires_grad_()
    target = torch.randint(0, vocab, (3, 11), generator=g)
    w1, w2 = torch.randn(3, 11, generator=g, dtype=torch.float64), torch.randn(3, 11, generator=g, dtype=torch.float64)
    logp, ent = vocab_parallel_logprobs_entropy(logits, target, PS, chunk_size=chunk, vocab_size=vocab)
    ref_lp, ref_ent = reference(logits, target, vocab)
    assert (logp.double() - ref_lp).abs().max() < 1e-5 and (ent.double() - ref_ent).abs().max() < 1e-5
    (logp.double() * w1 + ent.double() * w2).sum().backward()
    ours = logits.grad.clone()
    logits.grad = None
    (ref_lp * w1 + ref_ent * w2).sum().backward()
    assert (ours - logits.grad).abs().max() < 1e-5
    assert not ours[..., vocab:].any()  # no gradient reaches padding
    lp_only = vocab_parallel_logprobs(logits, target, PS, chunk_size=chunk, vocab_size=vocab)
    assert torch.equal(lp_only, logp.detach())
    assert torch.allclose(vocab_parallel_entropy(logits, PS, chunk, vocab), ent, atol=1e-6)
    full = vocab_parallel_log_softmax(logits, PS, vocab)
    assert torch.isinf(full[..., vocab:]).all()
    assert (full[..., :vocab].double() - torch.log_softmax(logits.double()[..., :vocab], -1)).abs().max() < 1e-5


def test_unpadded_call_is_the_old_cross_entropy():
    """vocab_size=None keeps every column (the previous behaviour), ignore_index gives exact zeros."""
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 5, 64, generator=g, requires_grad=True)
    target = torch.randint(0, 64, (2, 5), generator=g)
    target[0, 1] = -100
    lp = vocab_parallel_logprobs(logits, target, PS, chunk_size=3, ignore_index=-100)
    ref = -F.cross_entropy(logits.double().reshape(-1, 64), target.reshape(-1), ignore_index=-100,
                           reduction="none").view(2, 5)
    assert (lp.double() - ref).abs().max() < 1e-6 and lp[0, 1] == 0
    lp.sum().backward()
    assert logits.grad[0, 1].abs().max() == 0


@pytest.mark.parametrize("with_entropy", [False, True])
@pytest.mark.parametrize("shape", [(47, 31, 123), (4, 64, 256)])  # (tokens, hidden, vocab): odd sizes too
def test_fused_head_matches_plain_head(with_entropy, shape):
    T, H, V = shape
    padded = 128 * ((V + 127) // 128)
    g = torch.Generator().manual_seed(2)
    h = torch.randn(T, H, generator=g, requires_grad=True)
    w = torch.randn(padded, H, generator=g) * 0.3
    w[V:] = 0  # padding rows as the checkpoint holds them
    w.requires_grad_()
    target = torch.randint(0, V, (T,), generator=g)
    gl, ge = torch.randn(T, generator=g), torch.randn(T, generator=g)
    logp, ent = fused_linear_logprobs(h, w, target, PS, vocab_size=V, chunk_size=5, with_entropy=with_entropy)
    loss = (logp * gl).sum() + ((ent * ge).sum() if with_entropy else 0)
    loss.backward()
    fused = (logp.detach(), h.grad.clone(), w.grad.clone())
    h.grad = w.grad = None
    # the plain twin: full logits, then the chunked log-prob
    logits = F.linear(h, w)
    lp2, ent2 = vocab_parallel_logprobs_entropy(logits, target, PS, vocab_size=V)
    ((lp2 * gl).sum() + ((ent2 * ge).sum() if with_entropy else 0)).backward()
    assert (fused[0] - lp2.detach()).abs().max() < 1e-5
    if with_entropy:
        assert (ent.detach() - ent2.detach()).abs().max() < 1e-5
    assert (fused[1] - h.grad).abs().max() < 1e-5 and (fused[2] - w.grad).abs().max() < 1e-5
    assert not fused[2][V:].any()
    # and float64 from first principles
    ref_lp, _ = reference(F.linear(h.detach().double(), w.detach().double()), target, V)
    assert (fused[0].double() - ref_lp).abs().max() < 1e-5


def test_fused_head_bf16_close_to_fp32():
    g = torch.Generator().manual_seed(3)
    h, w = torch.randn(33, 64, generator=g), torch.randn(256, 64, generator=g) * 0.1
    target = torch.randint(0, 250, (33,), generator=g)
    lp32, _ = fused_linear_logprobs(h, w, target, PS, vocab_size=250, chunk_size=8)
    lp16, _ = fused_linear_logprobs(h.bfloat16(), w.bfloat16(), target, PS, vocab_size=250, chunk_size=8)
    assert lp16.dtype == torch.float32 and (lp16 - lp32).abs().max() < 0.1  # bf16 inputs, fp32 softmax


class LiveTensorBytes(TorchDispatchMode):
    """Counts the bytes of tensor storages created by aten ops while active (forward and backward: CPU autograd
    runs on the calling thread) and still alive; `peak` is the largest such total. A storage is released when
    its last user dies (weakref on the preserved storage object), so tensors saved by autograd count until
    backward frees them."""

    def __init__(self):
        super().__init__()
        self.live = self.peak = 0
        self.seen = set()

    def _release(self, key, nbytes):
        self.live -= nbytes
        self.seen.discard(key)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in torch.utils._pytree.tree_leaves((args, kwargs))
                  if isinstance(t, torch.Tensor)}
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.device.type == "cpu":
                st = t.untyped_storage()
                key = st.data_ptr()
                if key not in self.seen and key not in inputs and st.nbytes() > 0:  # new storage, not a view
                    self.seen.add(key)
                    self.live += st.nbytes()
                    self.peak = max(self.peak, self.live)
                    weakref.finalize(st, self._release, key, st.nbytes())
        return out


def _peak_alloc_bytes(fn) -> int:
    """Peak bytes of tensors allocated (and still alive) while `fn` runs."""
    with LiveTensorBytes() as mode:
        fn()
    return mode.peak


def test_fused_head_peak_memory_is_bounded_by_the_chunk_at_vocab_128k():
    """Vocab 128256 (Llama 3): forward + backward of the fused head allocate the fp32 weight gradient plus two
    fp32 [chunk, V] buffers, whatever the number of tokens T; the plain head holds [T, V] logits and more."""
    V, H, chunk = 128256, 16, 64
    g = torch.Generator().manual_seed(4)
    w = (torch.randn(V, H, generator=g) * 0.02).requires_grad_()
    chunk_bytes, weight_grad = 4 * chunk * V, 4 * V * H

    def peak(T, fused):
        h = torch.randn(T, H, generator=g).requires_grad_()
        target = torch.randint(0, V, (T,), generator=g)

        def step():
            if fused:
                logp, _ = fused_linear_logprobs(h, w, target, PS, vocab_size=V, chunk_size=chunk)
            else:
                logp = vocab_parallel_logprobs(h @ w.t(), target, PS, chunk_size=chunk, vocab_size=V)
            logp.sum().backward()
        out = _peak_alloc_bytes(step)
        w.grad = None
        return out

    small, large = peak(128, True), peak(512, True)
    assert large <= weight_grad + 2 * chunk_bytes + 512 * H * 16, (large, chunk_bytes)  # + O(T) scalars, dh
    assert large - small < 384 * H * 16  # growth with T: only O(T * H) (the input gradient), no [T, V] term
    plain = peak(128, False)
    assert plain >= 4 * 128 * V + weight_grad  # the plain head's fp32 logits alone are [T, V]
