"""HF -> ours: our GPTModel on the converted weights gives the transformers logits (tp=1 and tp=2).

Also holds the tiny random HF model builders the other test_hf_* files import.
"""
from __future__ import annotations

import copy
import os

import pytest
import torch

from megatron.interop.convert import hf_to_megatron
from megatron.model import GPTModel
from megatron.mpu import ParallelState
from megatron.testing.distributed import run_distributed
from megatron.checkpoint import weights_io as wio

VOCAB = 200
_COMMON = dict(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
               max_position_embeddings=128)
_LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
           "original_max_position_embeddings": 16}
CASES = {
    "llama_gqa": ("LlamaConfig", "LlamaForCausalLM", dict(num_key_value_heads=2, intermediate_size=128,
                                                         rms_norm_eps=1e-5)),
    "llama3_rope_tied": ("LlamaConfig", "LlamaForCausalLM", dict(num_key_value_heads=2, intermediate_size=128,
                                                                rope_scaling=_LLAMA3, rope_theta=500000.0,
                                                                tie_word_embeddings=True)),
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(num_key_value_heads=2, intermediate_size=128,
                                                           sliding_window=4096)),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(num_key_value_heads=2, intermediate_size=128)),
    "gpt_neox": ("GPTNeoXConfig", "GPTNeoXForCausalLM", dict(intermediate_size=256, rotary_pct=0.25,
                                                            use_parallel_residual=True, rotary_emb_base=1000)),
    "gpt_neox_serial": ("GPTNeoXConfig", "GPTNeoXForCausalLM", dict(intermediate_size=256, rotary_pct=0.5,
                                                                   use_parallel_residual=False)),
}


def randomize(model: torch.nn.Module, seed: int) -> None:
    """Give every parameter random values (norm weights near 1, everything else ~N(0, 0.15)), so that a
    mis-mapped norm, bias or row order cannot hide behind HF's ones/zeros initialisation."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g) * 0.15
            p.copy_(1.0 + noise if ("norm" in name and name.endswith("weight")) else noise)


def make_hf(case: str, out_dir: str, seed: int = 0, seq_cls: bool = False):
    """Build a tiny random transformers model for `case`, save it to `out_dir`; returns the model (eval)."""
    import transformers
    cfg_name, cls_name, extra = CASES[case]
    config = getattr(transformers, cfg_name)(**_COMMON, **copy.deepcopy(extra))  # transformers edits dicts
    if seq_cls:
        cls_name = cls_name.replace("ForCausalLM", "ForSequenceClassification")
        config.num_labels = 1
        config.pad_token_id = 0
    torch.manual_seed(seed)
    model = getattr(transformers, cls_name)(config)
    randomize(model, seed)
    model.eval()
    model.save_pretrained(out_dir)
    return model


def tokens(seed: int = 1, batch: int = 2, seq: int = 24) -> torch.Tensor:
    """Random token ids in 1..VOCAB-1, [batch, seq]."""
    return torch.randint(1, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(seed))


def our_forward(cfg, state: dict, ids: torch.Tensor, ps=None) -> torch.Tensor:
    """Our GPTModel with `state` loaded strictly: ids [B, S] -> logits shard / values, one packed sequence per row."""
    model = GPTModel(cfg, ps or ParallelState.single())
    model.load_state_dict(state, strict=True)
    model.eval()
    pos = torch.arange(ids.shape[1]).expand_as(ids)
    with torch.no_grad():
        return model(ids, pos, torch.ones_like(ids))


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """{case: (hf_logits, ids, ckpt tp=1, ckpt tp=2)} for every case."""
    root = tmp_path_factory.mktemp("hf_logits")
    out = {}
    for i, case in enumerate(CASES):
        hf = make_hf(case, str(root / case), seed=i)
        ids = tokens(seed=i)
        with torch.no_grad():
            logits = hf(ids).logits
        assert logits.abs().max() > 1.0  # random weights give logits far from zero
        ck1, ck2 = str(root / f"{case}_tp1"), str(root / f"{case}_tp2")
        hf_to_megatron(str(root / case), ck1, tp=1)
        hf_to_megatron(str(root / case), ck2, tp=2)
        out[case] = (logits, ids, ck1, ck2)
    return out


@pytest.mark.parametrize("case", sorted(CASES))
def test_tp1_logits_match_transformers(converted, case):
    logits, ids, ck1, _ = converted[case]
    tag_dir = os.path.join(ck1, "release")
    cfg = wio.read_config(tag_dir)
    state = wio.load_shard(wio.weights_file(tag_dir, 0, 0))
    ours = our_forward(cfg, state, ids)
    assert ours.shape == (2, 24, cfg.derived.padded_vocab_size)
    diff = (ours[..., :VOCAB] - logits).abs().max().item()
    assert diff < 1e-4, (case, diff)


def _tp2_worker(rank, world_size, cases):
    import torch.distributed as dist
    from megatron.mpu import initialize_parallel
    ps = initialize_parallel(2, 1)
    diffs = {}
    for case, (logits, ids, ckpt) in cases.items():
        tag_dir = wio.resolve_tag_dir(ckpt)
        cfg = wio.read_config(tag_dir)
        state = wio.load_shard(wio.weights_file(tag_dir, ps.tp_rank, 0))
        shard = our_forward(cfg, state, ids, ps).contiguous()
        parts = [torch.empty_like(shard) for _ in range(2)]
        dist.all_gather(parts, shard)
        full = torch.cat(parts, dim=-1)
        diffs[case] = (full[..., :VOCAB] - logits).abs().max().item()
    return diffs


def test_tp2_logits_match_transformers(converted):
    cases = {c: (v[0], v[1], v[3]) for c, v in converted.items()}
    diffs = run_distributed(_tp2_worker, 2, cases)
    assert set(diffs[0]) == set(CASES)
    for rank in range(2):
        for case, d in diffs[rank].items():
            assert d < 1e-4, (rank, case, d)


def test_converted_config_fields(converted):
    cfg = wio.read_config(os.path.join(converted["gpt_neox"][3], "release"))
    m = cfg.model
    assert (m.arch, m.norm, m.activation, m.rotary_pct, m.rope_theta) == ("gpt_neox", "layernorm", "gelu", 0.25, 1000.0)
    assert m.parallel_residual and m.qkv_bias and m.linear_bias and cfg.parallel.tensor == 2
    cfg = wio.read_config(os.path.join(converted["llama3_rope_tied"][2], "release"))
    assert cfg.model.tie_embeddings and cfg.model.num_kv_heads == 2 and cfg.model.rope_theta == 500000.0
    assert cfg.model.rope_scaling == dict(_LLAMA3)
    assert wio.read_config(os.path.join(converted["qwen2"][2], "release")).model.qkv_bias
