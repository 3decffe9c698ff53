"""Norms against hand-written formulas and Hugging Face's LlamaRMSNorm numerics."""
import pytest
import torch

from megatron.config import load_config
from megatron.model.norm import LayerNorm, Norm, RMSNorm, build_norm


def _randomise(norm: Norm, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in norm.parameters():
            p.copy_(torch.randn(p.shape, generator=g))


def test_rmsnorm_matches_formula():
    torch.manual_seed(0)
    x = torch.randn(2, 5, 64) * 3
    norm = RMSNorm(64, eps=1e-6)
    _randomise(norm)
    want = x / torch.sqrt((x * x).mean(-1, keepdim=True) + 1e-6) * norm.weight
    torch.testing.assert_close(norm(x), want, rtol=1e-5, atol=1e-6)
    assert norm.bias is None and [n for n, _ in norm.named_parameters()] == ["weight"]


def test_rmsnorm_bf16_matches_llama_rounding():
    # Llama casts the fp32-normalised value to the input dtype before the weight multiply.
    torch.manual_seed(1)
    x = torch.randn(3, 64).bfloat16()
    norm = RMSNorm(64, eps=1e-5).bfloat16()
    _randomise(norm)
    x32 = x.float()
    want = norm.weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + 1e-5)).bfloat16()
    got = norm(x)
    assert got.dtype == torch.bfloat16
    assert torch.equal(got, want)


def test_layernorm_matches_formula():
    torch.manual_seed(2)
    x = torch.randn(4, 7, 64) + 0.5
    norm = LayerNorm(64, eps=1e-5)
    _randomise(norm, 3)
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    want = (x - mean) / torch.sqrt(var + 1e-5) * norm.weight + norm.bias
    torch.testing.assert_close(norm(x), want, rtol=1e-5, atol=1e-5)
    assert sorted(n for n, _ in norm.named_parameters()) == ["bias", "weight"]


def test_build_norm_follows_config():
    cfg = load_config([], ["model.norm=layernorm", "model.norm_eps=1e-3", "model.hidden_size=32",
                           "model.num_attention_heads=4"], world_size=1)
    norm = build_norm(cfg)
    assert norm.kind == "layernorm" and norm.eps == 1e-3 and norm.weight.shape == (32,)
    with pytest.raises(ValueError):
        Norm(8, "batchnorm")
