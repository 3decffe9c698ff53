"""KV cache: ragged prefill + incremental decode give the logits of a full unpadded forward (fp32, 1e-5), for the
Llama (GQA), GPT-NeoX (partial rotary, parallel residual) and Qwen2 options; decoding 4 tokens equals 3 + 1."""
from __future__ import annotations

import pytest
import torch

from megatron.generation import KVCache, SamplingParams, generate
from megatron.mpu import ParallelState
from tests.unit.test_model_presets import PRESETS, build_cfg, build_model

LENS = [19, 11, 4]  # ragged rows


def _random_model(preset: str, *extra: str):
    cfg = build_cfg(preset, "model.attention=eager", *extra)
    model = build_model(cfg).eval()
    with torch.no_grad():  # away from the init's near-zero logits, so a wrong mask or position shows
        g = torch.Generator().manual_seed(5)
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.1)
    return cfg, model


def _full(model, ids: torch.Tensor) -> torch.Tensor:
    """Logits [S, Vp] of one unpadded sequence ids [S]."""
    S = ids.shape[0]
    return model(ids[None], torch.arange(S)[None], torch.ones(1, S, dtype=torch.long))[0]


@pytest.mark.parametrize("preset", sorted(PRESETS))
@torch.no_grad()
def test_prefill_and_decode_equal_full_forward(preset):
    cfg, model = _random_model(preset)
    g = torch.Generator().manual_seed(0)
    seqs = [torch.randint(1, 200, (n,), generator=g) for n in LENS]
    full = [_full(model, s) for s in seqs]
    cache = KVCache.for_model(cfg, ParallelState.single(), len(seqs), 24, torch.float32)
    assert cache.keys[0].shape == (3, cfg.derived.num_kv_heads, 24, cfg.derived.head_dim)
    prompt = [3, 6, 2]  # ragged, right-padded prefill of each row's first tokens
    ids = torch.zeros(3, 6, dtype=torch.long)
    for b, n in enumerate(prompt):
        ids[b, :n] = seqs[b][:n]
    pos = cache.begin(torch.tensor(prompt), 6)
    out = model(ids, pos, None, cache=cache)
    cache.commit()
    assert cache.lengths.tolist() == prompt
    for b, n in enumerate(prompt):
        assert torch.allclose(out[b, :n], full[b][:n], atol=1e-5, rtol=0), preset
    worst = 0.0
    for _ in range(max(LENS) - min(prompt)):  # one token per row per step; rows at their end repeat the last token
        t = cache.lengths.clone()
        nxt = torch.stack([seqs[b][min(int(t[b]), LENS[b] - 1)] for b in range(3)])
        pos = cache.begin(torch.ones(3, dtype=torch.long), 1)
        assert torch.equal(pos[:, 0], t)
        out = model(nxt[:, None], pos, None, cache=cache)
        cache.commit()
        for b in range(3):
            if int(t[b]) < LENS[b]:
                worst = max(worst, (out[b, 0] - full[b][int(t[b])]).abs().max().item())
    assert worst < 1e-5, (preset, worst)


@torch.no_grad()
def test_logit_index_and_tied_head_through_cache():
    cfg, model = _random_model("llama", "model.tie_embeddings=true")
    seq = torch.randint(1, 200, (9,), generator=torch.Generator().manual_seed(1))
    cache = KVCache.for_model(cfg, ParallelState.single(), 1, 16, torch.float32)
    pos = cache.begin(torch.tensor([9]), 9)
    last = model(seq[None], pos, None, logit_index=torch.tensor([8]), cache=cache)
    cache.commit()
    assert last.shape == (1, cfg.derived.padded_vocab_size)
    assert torch.allclose(last[0], _full(model, seq)[8], atol=1e-5, rtol=0)


@torch.no_grad()
def test_four_tokens_equal_three_plus_one():
    """transformers' test_generate_continue_from_past_key_values idea: greedy 4 == greedy 3 then 1 more."""
    cfg, model = _random_model("qwen2")
    ps = ParallelState.single()
    prompts = [[5, 9, 17, 3], [8, 8]]
    greedy = lambda n: SamplingParams(temperature=0.0, max_new_tokens=n)
    four = generate(model, cfg, ps, prompts, greedy(4))
    three = generate(model, cfg, ps, prompts, greedy(3))
    for p, f, t in zip(prompts, four, three):
        one = generate(model, cfg, ps, [p + t[0].token_ids], greedy(1))[0][0]
        assert f[0].token_ids == t[0].token_ids + one.token_ids
        assert f[0].logprobs[:3] == pytest.approx(t[0].logprobs, abs=1e-5)
        assert f[0].logprobs[3] == pytest.approx(one.logprobs[0], abs=1e-5)


def test_cache_guards():
    cache = KVCache(1, 2, 1, 4, max_len=3)
    with pytest.raises(ValueError, match="overflow"):
        cache.begin(torch.tensor([4, 4]), 4)
    cache.begin(torch.tensor([1, 2]), 2)
    with pytest.raises(RuntimeError, match="twice"):
        cache.begin(torch.tensor([1, 1]), 1)
    cache.commit()
    cache.select(torch.tensor([1, 1, 0]))
    assert cache.lengths.tolist() == [2, 2, 1] and cache.keys[0].shape[0] == 3
