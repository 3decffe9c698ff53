"""Rotary embeddings against transformers' reference functions (inv_freq, cos/sin, rotation)."""
import torch
from transformers import GPTNeoXConfig, LlamaConfig
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
from transformers.models.gpt_neox.modeling_gpt_neox import GPTNeoXRotaryEmbedding
from transformers.models.gpt_neox.modeling_gpt_neox import apply_rotary_pos_emb as neox_apply
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

from megatron.model.rotary import RotaryEmbedding, apply_rotary, compute_inv_freq, rotate_half

LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 64}


def test_default_inv_freq_formula():
    got = compute_inv_freq(16, 10000.0)
    want = torch.tensor([10000.0 ** (-2 * i / 16) for i in range(8)])
    torch.testing.assert_close(got, want, rtol=1e-6, atol=0)


def test_linear_and_llama3_match_transformers():
    # head_dim 32 so the llama3 branch has low, medium and high frequencies at original context 64.
    for theta in (10000.0, 500000.0):
        llama3 = LlamaConfig(hidden_size=128, num_attention_heads=4, rope_parameters={"rope_theta": theta, **LLAMA3})
        want, _ = ROPE_INIT_FUNCTIONS["llama3"](llama3)
        got = compute_inv_freq(32, theta, dict(LLAMA3))
        assert torch.equal(got, want)
        wavelen = 2 * torch.pi / compute_inv_freq(32, theta)
        assert (wavelen > 64).any() and (wavelen < 16).any() and ((wavelen >= 16) & (wavelen <= 64)).any()
    linear = GPTNeoXConfig(hidden_size=64, num_attention_heads=4, rotary_pct=0.5,
                           rope_parameters={"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.5})
    want, _ = ROPE_INIT_FUNCTIONS["linear"](linear)
    # legacy HF key "type" is accepted as well
    assert torch.equal(compute_inv_freq(8, 10000.0, {"type": "linear", "factor": 2.5}), want)


def test_cos_sin_and_full_rotation_match_llama():
    cfg = LlamaConfig(hidden_size=64, num_attention_heads=4, rope_parameters={"rope_theta": 500000.0, **LLAMA3})
    ref = LlamaRotaryEmbedding(cfg)
    ours = RotaryEmbedding(16, 1.0, 500000.0, dict(LLAMA3))
    pos = torch.tensor([[0, 1, 2, 3, 0, 1, 2, 0], [5, 6, 7, 8, 9, 10, 11, 12]])
    x = torch.randn(2, 8, 4, 16)
    cos, sin = ours(pos, x.dtype)
    rcos, rsin = ref(x, pos)
    torch.testing.assert_close(cos, rcos, rtol=0, atol=1e-6)
    torch.testing.assert_close(sin, rsin, rtol=0, atol=1e-6)
    q, k = torch.randn(2, 8, 4, 16), torch.randn(2, 8, 2, 16)
    rq, rk = neox_apply(q.transpose(1, 2), k.transpose(1, 2), rcos, rsin)
    torch.testing.assert_close(apply_rotary(q, cos, sin), rq.transpose(1, 2), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(apply_rotary(k, cos, sin), rk.transpose(1, 2), rtol=1e-6, atol=1e-6)


def test_partial_rotary_matches_neox():
    cfg = GPTNeoXConfig(hidden_size=128, num_attention_heads=4, rotary_pct=0.25,
                        rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    ref = GPTNeoXRotaryEmbedding(cfg)
    ours = RotaryEmbedding(32, 0.25, 10000.0)
    assert ours.rot_dim == 8
    pos = torch.arange(12).reshape(1, 12) % 5  # positions restarting inside the row
    q = torch.randn(1, 12, 4, 32)
    cos, sin = ours(pos)
    rcos, rsin = ref(q, pos)
    torch.testing.assert_close(cos, rcos, rtol=0, atol=1e-6)
    rq, _ = neox_apply(q.transpose(1, 2), q.transpose(1, 2), rcos, rsin)
    got = apply_rotary(q, cos, sin)
    torch.testing.assert_close(got, rq.transpose(1, 2), rtol=1e-6, atol=1e-6)
    assert torch.equal(got[..., 8:], q[..., 8:])  # the pass-through dims are untouched


def test_rotation_is_relative_and_per_token():
    # <R(m) q, R(n) k> depends on m - n only (RoFormer eq. 16): shifting both positions keeps the dot product.
    rot = RotaryEmbedding(16)
    q, k = torch.randn(1, 1, 1, 16), torch.randn(1, 1, 1, 16)
    def dot(m, n):
        cq, sq = rot(torch.tensor([[m]]))
        ck, sk = rot(torch.tensor([[n]]))
        return (apply_rotary(q, cq, sq) * apply_rotary(k, ck, sk)).sum()
    torch.testing.assert_close(dot(7, 3), dot(104, 100), rtol=1e-4, atol=1e-5)
    assert not torch.allclose(dot(7, 3), dot(7, 4))
    x = torch.randn(2, 6)
    assert torch.equal(rotate_half(x), torch.cat((-x[:, 3:], x[:, :3]), dim=-1))


def test_half_cast_does_not_touch_frequencies():
    rot = RotaryEmbedding(16, theta=500000.0)
    before = rot.inv_freq.clone()
    rot.bfloat16()
    assert rot.inv_freq.dtype == torch.float32 and torch.equal(rot.inv_freq, before)
    assert rot.state_dict() == {}
