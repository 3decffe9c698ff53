"""Sampling: the vocab-parallel sampler against an independent float64 reference of transformers' filters,
counter-based noise, padded vocabulary rows, and batch-size invariance of generate()."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from megatron.generation import SamplingParams, generate, sample_next, sample_uniforms
from megatron.mpu import ParallelState

V, VP = 200, 256  # real vocabulary, padded head rows


def _reference_token(logits: torch.Tensor, p: SamplingParams, u: float) -> int:
    """transformers' warpers (temperature, TopK, TopP, MinP) in float64 on the real vocabulary, then the first id
    whose cumulative probability exceeds u."""
    s = logits.double() / p.temperature
    if p.top_k:
        s = s.masked_fill(s < torch.topk(s, p.top_k).values[-1], -math.inf)
    if p.top_p < 1.0:  # TopPLogitsWarper: ascending sort, drop cumulative mass <= 1 - top_p, keep the best
        sorted_s, order = torch.sort(s, descending=False)
        cum = sorted_s.softmax(-1).cumsum(-1)
        remove = cum <= 1 - p.top_p
        remove[-1] = False
        s = s.masked_fill(remove.scatter(0, order, remove), -math.inf)
    if p.min_p > 0.0:
        probs = s.softmax(-1)
        s = s.masked_fill(probs < p.min_p * probs.max(), -math.inf)
    cdf = s.softmax(-1).cumsum(-1)
    return int(torch.searchsorted(cdf, torch.tensor([u], dtype=torch.float64), right=True))


def _logits(batch: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, VP, generator=g) * 2.0
    x[:, V:] = 50.0  # padded head rows with huge logits: must never be chosen or get probability
    return x


@pytest.mark.parametrize("params", [
    SamplingParams(temperature=1.0),
    SamplingParams(temperature=0.7),
    SamplingParams(temperature=1.3, top_k=20),
    SamplingParams(temperature=1.0, top_p=0.9),
    SamplingParams(temperature=0.8, top_k=50, top_p=0.8),
    SamplingParams(temperature=1.0, min_p=0.05),
    SamplingParams(temperature=1.0, top_p=0.95, min_p=0.02),
], ids=lambda p: f"T{p.temperature}_k{p.top_k}_p{p.top_p}_m{p.min_p}")
def test_sampler_equals_reference(params):
    B = 300
    logits = _logits(B)
    u = sample_uniforms(11, torch.arange(B), torch.zeros(B), torch.zeros(B))
    tokens, logps = sample_next(logits, params, u, ParallelState.single(), V)
    expected = [_reference_token(logits[b, :V], params, float(u[b])) for b in range(B)]
    assert tokens.tolist() == expected
    ref_lp = torch.log_softmax(logits[:, :V].double(), -1).gather(1, tokens[:, None]).squeeze(1)
    assert torch.allclose(logps.double(), ref_lp, atol=1e-5, rtol=0)
    assert len(set(expected)) > 5  # really sampling


def test_greedy_ties_and_padding():
    logits = _logits(2)
    logits[0, :V] = 0.0
    logits[0, 7] = logits[0, 3] = 5.0  # tie: the lowest id wins, as torch.argmax
    tokens, logps = sample_next(logits, SamplingParams(temperature=0.0), torch.zeros(2, dtype=torch.float64),
                                ParallelState.single(), V)
    assert tokens[0] == 3 and tokens[1] == int(logits[1, :V].argmax())
    assert torch.allclose(logps, torch.log_softmax(logits[:, :V], -1).gather(1, tokens[:, None]).squeeze(1))


def test_noise_is_uniform_and_keyed():
    n = 200_000
    u = sample_uniforms(3, torch.arange(n), torch.zeros(1), torch.zeros(1)).numpy()
    assert 0.0 < u.min() and u.max() < 1.0
    hist = np.histogram(u, bins=20, range=(0, 1))[0]
    chi2 = ((hist - n / 20) ** 2 / (n / 20)).sum()
    assert chi2 < 60.0  # 19 degrees of freedom; p < 1e-5 beyond this
    other = {
        "seed": sample_uniforms(4, torch.arange(n), torch.zeros(1), torch.zeros(1)).numpy(),
        "sample": sample_uniforms(3, torch.arange(n), torch.ones(1), torch.zeros(1)).numpy(),
        "step": sample_uniforms(3, torch.arange(n), torch.zeros(1), torch.ones(1)).numpy(),
    }
    for name, v in other.items():
        assert abs(np.corrcoef(u, v)[0, 1]) < 0.01, name
    # the same key gives the same number whatever the batch around it
    again = sample_uniforms(3, torch.tensor([12345]), torch.zeros(1), torch.zeros(1))
    assert float(again[0]) == float(u[12345])


def _tiny_model(vocab: int = V):
    from tests.unit.test_model_presets import build_cfg, build_model
    cfg = build_cfg("llama", f"model.vocab_size={vocab}", "model.max_seq_len=64")
    model = build_model(cfg).eval()
    with torch.no_grad():
        g = torch.Generator().manual_seed(2)
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.1)
    return cfg, model


PROMPTS = [[1, 5, 9, 13, 2, 7], [4], [8, 3, 3, 9, 1, 1, 2, 6, 5, 4, 10], [6, 6], [11, 12, 13]]


def test_batch_size_and_batch_mates_do_not_change_samples():
    cfg, model = _tiny_model()
    ps = ParallelState.single()
    params = SamplingParams(n=2, temperature=1.0, top_p=0.9, max_new_tokens=8, seed=7)
    big = generate(model, cfg, ps, PROMPTS, params, batch_size=16)
    one = generate(model, cfg, ps, PROMPTS, params, batch_size=1)
    # each prompt alone (keyed by its index), and the list reversed: same samples
    alone = [generate(model, cfg, ps, [p], params, prompt_indices=[i])[0] for i, p in enumerate(PROMPTS)]
    rev = generate(model, cfg, ps, PROMPTS[::-1], params, prompt_indices=list(range(len(PROMPTS)))[::-1])[::-1]
    for i in range(len(PROMPTS)):
        for s in range(2):
            ids = big[i][s].token_ids
            assert len(ids) == 8 and big[i][s].finish_reason == "length"
            for other in (one, alone, rev):
                assert other[i][s].token_ids == ids, (i, s)
                assert other[i][s].logprobs == pytest.approx(big[i][s].logprobs, abs=1e-5)
        assert big[i][0].token_ids != big[i][1].token_ids  # samples of one prompt differ
    reseeded = generate(model, cfg, ps, PROMPTS, SamplingParams(**{**params.__dict__, "seed": 8}))
    assert any(reseeded[i][0].token_ids != big[i][0].token_ids for i in range(len(PROMPTS)))


@pytest.mark.parametrize("vocab", [256, V])  # V: padded head rows (vocab 200 -> 256)
def test_logprobs_equal_training_forward(vocab):
    from megatron.data import collate
    from megatron.data.dataset import Example, SequenceData
    from megatron.engines.forward import forward_stats

    cfg, model = _tiny_model(vocab)
    ps = ParallelState.single()
    out = generate(model, cfg, ps, PROMPTS, SamplingParams(n=2, temperature=1.0, max_new_tokens=10, seed=1))
    examples, expected, flat = [], [], []
    for i, p in enumerate(PROMPTS):
        for c in out[i]:
            ids = np.array(p + c.token_ids, dtype=np.int64)
            examples.append(Example(len(examples), "sft", [SequenceData(ids, len(p), len(examples))]))
            expected.append(sum(c.logprobs))
            flat.append((ids, len(p), c.logprobs))
    batch = collate(examples, pack=True, max_seq_len=cfg.model.max_seq_len)
    with torch.no_grad():
        stats = forward_stats(model, batch, ps, value_head=False)
    assert torch.allclose(stats.logp_sum.double(), torch.tensor(expected, dtype=torch.float64), atol=1e-4, rtol=0)
    # per token, against a float64 log-softmax of the full forward's real-vocabulary logits
    for ids, n, lps in flat:
        t = torch.from_numpy(ids)
        with torch.no_grad():
            logits = model(t[None], torch.arange(len(t))[None], torch.ones(1, len(t), dtype=torch.long))[0]
        ref = torch.log_softmax(logits[:, :vocab].double(), -1)[n - 1:-1].gather(1, t[n:, None]).squeeze(1)
        assert torch.allclose(torch.tensor(lps, dtype=torch.float64), ref, atol=1e-5, rtol=0)
