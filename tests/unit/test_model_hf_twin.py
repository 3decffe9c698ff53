"""GPTModel against Hugging Face transformers' independent implementations (Llama, GPT-NeoX, Qwen2), with the
weights copied across: same logits (fp32, eager attention on both sides, one unpacked sequence per row)."""
from typing import Dict

import torch
from transformers import GPTNeoXConfig, GPTNeoXForCausalLM, LlamaConfig, LlamaForCausalLM, LlamaModel
from transformers import Qwen2Config, Qwen2ForCausalLM

from tests.unit.test_model_presets import build_cfg, build_model


def _randomise_norms(model) -> None:
    # norms start at ones/zeros; randomise them so a transposed or misplaced norm parameter would show
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.1 + (1.0 if name.endswith("weight") else 0.0))


def _llama_like_state(sd: Dict[str, torch.Tensor], cfg, prefix: str = "model.") -> Dict[str, torch.Tensor]:
    m, d = cfg.model, cfg.derived
    q, kv, F = m.num_attention_heads * d.head_dim, d.num_kv_heads * d.head_dim, d.ffn_hidden_size
    out = {f"{prefix}embed_tokens.weight": sd["embedding.word_embeddings.weight"],
           f"{prefix}norm.weight": sd["final_norm.weight"]}
    for i in range(m.num_layers):
        b, h = f"blocks.{i}.", f"{prefix}layers.{i}."
        out[h + "input_layernorm.weight"] = sd[b + "input_norm.weight"]
        out[h + "post_attention_layernorm.weight"] = sd[b + "post_attention_norm.weight"]
        for kind in ("weight", "bias") if m.qkv_bias else ("weight",):
            w = sd[b + f"attention.qkv.{kind}"]
            out[h + f"self_attn.q_proj.{kind}"], out[h + f"self_attn.k_proj.{kind}"], \
                out[h + f"self_attn.v_proj.{kind}"] = w[:q], w[q:q + kv], w[q + kv:]
        out[h + "self_attn.o_proj.weight"] = sd[b + "attention.dense.weight"]
        out[h + "mlp.gate_proj.weight"] = sd[b + "mlp.fc1.weight"][:F]
        out[h + "mlp.up_proj.weight"] = sd[b + "mlp.fc1.weight"][F:]
        out[h + "mlp.down_proj.weight"] = sd[b + "mlp.fc2.weight"]
    if "lm_head.weight" in sd:
        out["lm_head.weight"] = sd["lm_head.weight"]
    return out


def _neox_state(sd: Dict[str, torch.Tensor], cfg) -> Dict[str, torch.Tensor]:
    m, hd = cfg.model, cfg.derived.head_dim
    nh = m.num_attention_heads
    out = {"gpt_neox.embed_in.weight": sd["embedding.word_embeddings.weight"], "lm_head.weight": sd["lm_head.weight"],
           "gpt_neox.final_layer_norm.weight": sd["final_norm.weight"],
           "gpt_neox.final_layer_norm.bias": sd["final_norm.bias"]}
    for i in range(m.num_layers):
        b, h = f"blocks.{i}.", f"gpt_neox.layers.{i}."
        for ours, theirs in (("input_norm", "input_layernorm"), ("post_attention_norm", "post_attention_layernorm"),
                             ("attention.dense", "attention.dense"), ("mlp.fc1", "mlp.dense_h_to_4h"),
                             ("mlp.fc2", "mlp.dense_4h_to_h")):
            for kind in ("weight", "bias"):
                out[h + f"{theirs}.{kind}"] = sd[b + f"{ours}.{kind}"]
        # ours: rows [q heads | k heads | v heads]; NeoX: per head [q_h | k_h | v_h]
        for kind in ("weight", "bias"):
            w = sd[b + f"attention.qkv.{kind}"]
            w = w.reshape(3, nh, hd, *w.shape[1:]).transpose(0, 1)
            out[h + f"attention.query_key_value.{kind}"] = w.reshape(3 * nh * hd, *w.shape[3:])
    return out


def _compare(ours, theirs, cfg):
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(1, cfg.model.vocab_size, (2, 20), generator=g)
    pos = torch.arange(20).expand(2, 20)
    seg = torch.ones(2, 20, dtype=torch.long)
    for backend in ("eager", "sdpa"):
        for blk in ours.blocks:
            blk.attention.backend = backend
        got = ours(ids, pos, seg)
        want = theirs(input_ids=ids).logits
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def _hf_common(cfg) -> dict:
    m, d = cfg.model, cfg.derived
    return dict(vocab_size=d.padded_vocab_size, hidden_size=m.hidden_size, num_hidden_layers=m.num_layers,
                num_attention_heads=m.num_attention_heads, intermediate_size=d.ffn_hidden_size,
                max_position_embeddings=m.max_seq_len, tie_word_embeddings=m.tie_embeddings,
                attn_implementation="eager")


def test_llama_gqa_llama3_rope_matches_transformers():
    for tied in ("false", "true"):
        cfg = build_cfg("llama", f"model.tie_embeddings={tied}")
        ours = build_model(cfg).eval()
        _randomise_norms(ours)
        m = cfg.model
        hf = LlamaForCausalLM(LlamaConfig(**_hf_common(cfg), num_key_value_heads=cfg.derived.num_kv_heads,
                                          rms_norm_eps=m.norm_eps, hidden_act="silu",
                                          rope_parameters={"rope_theta": m.rope_theta, **m.rope_scaling})).eval()
        missing, unexpected = hf.load_state_dict(_llama_like_state(ours.state_dict(), cfg), strict=False)
        assert not unexpected and set(missing) <= {"lm_head.weight"}
        if m.tie_embeddings:
            assert hf.lm_head.weight.data_ptr() == hf.model.embed_tokens.weight.data_ptr()
        _compare(ours, hf, cfg)


def test_qwen2_qkv_bias_matches_transformers():
    cfg = build_cfg("qwen2")
    ours = build_model(cfg).eval()
    _randomise_norms(ours)
    m = cfg.model
    hf = Qwen2ForCausalLM(Qwen2Config(**_hf_common(cfg), num_key_value_heads=cfg.derived.num_kv_heads,
                                      rms_norm_eps=m.norm_eps, hidden_act="silu",
                                      rope_parameters={"rope_type": "default", "rope_theta": m.rope_theta})).eval()
    hf.load_state_dict(_llama_like_state(ours.state_dict(), cfg), strict=True)
    _compare(ours, hf, cfg)


def test_neox_parallel_residual_partial_rotary_matches_transformers():
    cfg = build_cfg("neox")
    ours = build_model(cfg).eval()
    _randomise_norms(ours)
    m = cfg.model
    hf = GPTNeoXForCausalLM(GPTNeoXConfig(**_hf_common(cfg), layer_norm_eps=m.norm_eps, hidden_act="gelu",
                                          use_parallel_residual=True, attention_bias=True,
                                          rope_parameters={"rope_type": "default", "rope_theta": m.rope_theta,
                                                           "partial_rotary_factor": m.rotary_pct})).eval()
    hf.load_state_dict(_neox_state(ours.state_dict(), cfg), strict=True)
    _compare(ours, hf, cfg)


def test_value_head_is_a_linear_on_the_final_hidden_state():
    cfg = build_cfg("llama", "model.value_head=true", "objective.name=rm")
    ours = build_model(cfg).eval()
    _randomise_norms(ours)
    m = cfg.model
    hf = LlamaModel(LlamaConfig(**_hf_common(cfg), num_key_value_heads=cfg.derived.num_kv_heads,
                                rms_norm_eps=m.norm_eps, rope_parameters={"rope_theta": m.rope_theta,
                                                                          **m.rope_scaling})).eval()
    hf.load_state_dict(_llama_like_state(ours.state_dict(), cfg, prefix=""), strict=True)
    ids = torch.randint(1, 200, (3, 12))
    values = ours(ids, torch.arange(12).expand(3, 12), torch.ones(3, 12, dtype=torch.long))
    assert values.shape == (3, 12) and values.dtype == torch.float32
    want = hf(input_ids=ids).last_hidden_state @ ours.value_head.weight[0] + ours.value_head.bias[0]
    torch.testing.assert_close(values, want, rtol=1e-5, atol=1e-5)
