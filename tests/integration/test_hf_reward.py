"""Reward models: our value-head GPTModel exports as *ForSequenceClassification (num_labels=1) with our score
at the last token; the value-head bias rule; HF sequence-classification models import back."""
from __future__ import annotations

import copy
import json
import os

import pytest
import torch

from megatron.config import derive_and_validate, load_config
from megatron.interop.convert import hf_to_megatron, megatron_to_hf
from megatron.interop.hf_config import ConversionError
from megatron.model import GPTModel
from megatron.mpu import ParallelState
from megatron.checkpoint import weights_io as wio
from tests.integration.test_hf_logits import make_hf, our_forward, randomize, tokens

_ARCH_MODEL = {
    "llama": dict(num_kv_heads=2, ffn_hidden_size=128),
    "qwen2": dict(num_kv_heads=2, ffn_hidden_size=128, qkv_bias=True),
    "gpt_neox": dict(norm="layernorm", activation="gelu", qkv_bias=True, linear_bias=True, ffn_hidden_size=256,
                     rotary_pct=0.25, parallel_residual=True),
}


def _reward_cfg(arch: str):
    fields = dict(arch=arch, hidden_size=64, num_layers=2, num_attention_heads=4, vocab_size=200, max_seq_len=64,
                  value_head=True, **_ARCH_MODEL[arch])
    sets = [f"model.{k}={v}" for k, v in fields.items()] + ["objective.name=rm", "train.micro_batch_size=1",
                                                            "train.global_batch_size=1"]
    return load_config([], sets, world_size=1)


def _reward_checkpoint(tmp_path, arch: str, bias: float = 0.0):
    cfg = _reward_cfg(arch)
    torch.manual_seed(0)
    model = GPTModel(cfg, ParallelState.single())
    randomize(model, seed=11)
    with torch.no_grad():
        model.value_head.bias.fill_(bias)
    full = {k: v.detach().clone() for k, v in model.state_dict().items()}
    ck = str(tmp_path / f"rm_{arch}")
    layout_cfg = copy.deepcopy(cfg)
    layout_cfg.parallel.tensor = layout_cfg.parallel.pipeline = 2
    derive_and_validate(layout_cfg, world_size=4)
    wio.write_checkpoint(ck, "step3", layout_cfg, wio.reshard(full, layout_cfg, 2, 2), {"step": 3})
    return cfg, full, ck


@pytest.mark.parametrize("arch", sorted(_ARCH_MODEL))
def test_reward_export_gives_our_last_token_score(tmp_path, arch):
    from transformers import AutoModelForSequenceClassification
    cfg, full, ck = _reward_checkpoint(tmp_path, arch)
    out = str(tmp_path / "hf_rm")
    megatron_to_hf(ck, out)
    config = json.load(open(os.path.join(out, "config.json")))
    assert config["architectures"][0].endswith("ForSequenceClassification") and len(config["id2label"]) == 1
    assert not os.path.exists(os.path.join(out, "generation_config.json"))
    hf = AutoModelForSequenceClassification.from_pretrained(out).eval()
    ids = tokens(seed=2, batch=1, seq=20)
    with torch.no_grad():
        hf_score = hf(ids).logits  # [1, 1], the score at the last token
    ours = our_forward(cfg, full, ids)  # [1, 20]
    assert ours.shape == (1, 20)
    assert abs(hf_score[0, 0].item() - ours[0, -1].item()) < 1e-4
    assert abs(ours[0, -1].item()) > 1e-3


def test_nonzero_value_bias_needs_drop_flag(tmp_path):
    from transformers import AutoModelForSequenceClassification
    cfg, full, ck = _reward_checkpoint(tmp_path, "llama", bias=0.25)
    with pytest.raises(ConversionError, match="--drop-value-bias"):
        megatron_to_hf(ck, str(tmp_path / "out"))
    megatron_to_hf(ck, str(tmp_path / "out"), drop_value_bias=True)
    hf = AutoModelForSequenceClassification.from_pretrained(str(tmp_path / "out")).eval()
    ids = tokens(seed=3, batch=1, seq=12)
    with torch.no_grad():
        shifted = hf(ids).logits[0, 0].item()
    assert abs(shifted - (our_forward(cfg, full, ids)[0, -1].item() - 0.25)) < 1e-4


@pytest.mark.parametrize("case", ["llama_gqa", "gpt_neox"])
def test_hf_sequence_classification_imports_as_value_head(tmp_path, case):
    hf = make_hf(case, str(tmp_path / "hf"), seed=9, seq_cls=True)
    ck = str(tmp_path / "ck")
    hf_to_megatron(str(tmp_path / "hf"), ck, tp=2)
    full, meta, cfg = wio.read_weights(ck)
    assert cfg.model.value_head and cfg.objective.name == "rm" and torch.equal(full["value_head.bias"], torch.zeros(1))
    ids = tokens(seed=4, batch=1, seq=16)
    with torch.no_grad():
        want = hf(ids).logits[0, 0].item()
    cfg.parallel.tensor = 1
    assert abs(our_forward(cfg, full, ids)[0, -1].item() - want) < 1e-4
