"""Architecture presets (shared by the model tests) and their build / forward / backward checks."""
from typing import Dict, List, Tuple

import torch

from megatron.config import load_config
from megatron.model import GPTModel
from megatron.mpu import ParallelState

BASE = ["model.hidden_size=64", "model.num_layers=2", "model.num_attention_heads=4", "model.vocab_size=200",
        "model.max_seq_len=32", "model.attention=sdpa", "train.micro_batch_size=2", "train.global_batch_size=2"]

PRESETS: Dict[str, List[str]] = {
    # Llama: RMSNorm, SwiGLU, GQA, untied head, llama3 rope scaling
    "llama": ["model.norm=rmsnorm", "model.activation=swiglu", "model.num_kv_heads=2", "model.rope_theta=500000.0",
              "model.rope_scaling={rope_type: llama3, factor: 8.0, low_freq_factor: 1.0, high_freq_factor: 4.0, "
              "original_max_position_embeddings: 16}"],
    # GPT-NeoX / Pythia: LayerNorm, exact GeLU, parallel residual, 25% rotary, biases everywhere
    "neox": ["model.norm=layernorm", "model.activation=gelu", "model.parallel_residual=true", "model.rotary_pct=0.25",
             "model.linear_bias=true", "model.qkv_bias=true", "model.tie_embeddings=false"],
    # Qwen2: Llama layout plus bias on the fused QKV only
    "qwen2": ["model.qkv_bias=true", "model.num_kv_heads=2", "model.rope_theta=1000000.0", "model.norm_eps=1e-6"],
}


def build_cfg(preset: str, *extra: str, tensor: int = 1):
    """A validated Config for `preset` plus overrides, for a world of `tensor` ranks."""
    return load_config([], BASE + PRESETS[preset] + [f"parallel.tensor={tensor}", *extra], world_size=tensor)


def packed_batch(seed: int = 0) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Two rows of 16: [seq 7 | seq 6 | pad 3] and [seq 16]. Returns input_ids, position_ids, segment_ids."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 200, (2, 16), generator=g)
    lengths = [[7, 6], [16]]
    pos, seg = torch.zeros(2, 16, dtype=torch.long), torch.zeros(2, 16, dtype=torch.long)
    for b, row in enumerate(lengths):
        t = 0
        for s, n in enumerate(row, start=1):
            pos[b, t:t + n] = torch.arange(n)
            seg[b, t:t + n] = s
            t += n
    ids[seg == 0] = 0
    return ids, pos, seg


def build_model(cfg, seed: int = 1234, ps=None) -> GPTModel:
    torch.manual_seed(seed)
    return GPTModel(cfg, ps or ParallelState.single())


def test_presets_forward_backward():
    ids, pos, seg = packed_batch()
    for preset in PRESETS:
        for extra in ([], ["model.tie_embeddings=true"], ["model.value_head=true", "objective.name=rm"]):
            cfg = build_cfg(preset, *extra)
            model = build_model(cfg)
            out = model(ids, pos, seg)
            if cfg.model.value_head:
                assert out.shape == (2, 16) and out.dtype == torch.float32
            else:
                assert out.shape == (2, 16, cfg.derived.padded_vocab_size) == (2, 16, 256)
            assert torch.isfinite(out).all()
            (out.float() * torch.randn_like(out.float())).sum().backward()
            for name, p in model.named_parameters():
                assert p.grad is not None and torch.isfinite(p.grad).all(), (preset, extra, name)
                assert p.grad.abs().sum() > 0, (preset, extra, name)


def test_preset_switches_reach_the_modules():
    neox = build_model(build_cfg("neox"))
    blk = neox.blocks[0]
    assert blk.parallel_residual and blk.input_norm.kind == "layernorm" and not blk.mlp.swiglu
    assert blk.attention.rotary.rot_dim == 4 and blk.attention.dense.bias is not None
    llama = build_model(build_cfg("llama"))
    assert llama.blocks[1].attention.num_kv_heads == 2 and llama.blocks[1].attention.qkv.bias is None
    assert build_model(build_cfg("qwen2")).blocks[0].attention.qkv.bias.shape == (128,)
