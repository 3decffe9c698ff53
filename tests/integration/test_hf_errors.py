"""Conversion errors say what is wrong and what would work (GQA vs tensor size, architectures, files)."""
from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from megatron.config import load_config
from megatron.interop.convert import hf_to_megatron, megatron_to_hf, reshard_checkpoint
from megatron.interop.hf_config import ConversionError
from megatron.checkpoint import weights_io as wio
from tests.integration.test_hf_logits import make_hf
from tests.integration.test_hf_roundtrip import load_script


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("err") / "llama"
    make_hf("llama_gqa", str(d), seed=1)
    return str(d)


def test_gqa_kv_heads_below_tensor_size_rejected(llama_dir, tmp_path, capsys):
    with pytest.raises(ConversionError, match=r"num_kv_heads=2.*tensor=4.*--tp must divide 2"):
        hf_to_megatron(llama_dir, str(tmp_path / "o"), tp=4)
    cli = load_script("convert_hf_to_megatron")
    assert cli.main(["--hf-dir", llama_dir, "--out", str(tmp_path / "o2"), "--tp", "4"]) == 1
    assert "num_kv_heads=2" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "o2" / "latest")


def test_unsupported_architecture_lists_supported(tmp_path, capsys):
    d = tmp_path / "gpt2"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"}))
    with pytest.raises(ConversionError, match=r"unsupported architecture 'GPT2LMHeadModel'.*LlamaForCausalLM.*"
                                              r"GPTNeoXForCausalLM"):
        hf_to_megatron(str(d), str(tmp_path / "o"))
    assert load_script("convert_hf_to_megatron").main(["--hf-dir", str(d), "--out", str(tmp_path / "o")]) == 1
    assert "Qwen2ForCausalLM" in capsys.readouterr().err


def test_missing_config_and_weights(llama_dir, tmp_path):
    with pytest.raises(ConversionError, match=r"missing file: .*nowhere.*config\.json"):
        hf_to_megatron(str(tmp_path / "nowhere"), str(tmp_path / "o"))
    d = tmp_path / "noweights"
    d.mkdir()
    (d / "config.json").write_text(open(os.path.join(llama_dir, "config.json")).read())
    with pytest.raises(ConversionError, match=r"no weights in .*noweights.*model\.safetensors"):
        hf_to_megatron(str(d), str(tmp_path / "o"))
    index = {"metadata": {}, "weight_map": {"model.norm.weight": "model-00001-of-00002.safetensors"}}
    (d / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ConversionError, match=r"missing weights file: .*model-00001-of-00002\.safetensors"):
        hf_to_megatron(str(d), str(tmp_path / "o"))


def test_missing_and_unmapped_tensors(llama_dir, tmp_path):
    sd = load_file(os.path.join(llama_dir, "model.safetensors"))
    d = tmp_path / "bad"
    d.mkdir()
    (d / "config.json").write_text(open(os.path.join(llama_dir, "config.json")).read())
    save_file({k: v for k, v in sd.items() if k != "model.layers.1.self_attn.k_proj.weight"},
              str(d / "model.safetensors"))
    with pytest.raises(ConversionError, match=r"'model\.layers\.1\.self_attn\.k_proj\.weight' is missing"):
        hf_to_megatron(str(d), str(tmp_path / "o"))
    save_file({**sd, "model.layers.0.mystery.weight": torch.zeros(3)}, str(d / "model.safetensors"))
    with pytest.raises(ConversionError, match=r"does not map: \['model\.layers\.0\.mystery\.weight'\]"):
        hf_to_megatron(str(d), str(tmp_path / "o"))


def test_export_errors(llama_dir, tmp_path, capsys):
    ck = str(tmp_path / "ck")
    hf_to_megatron(llama_dir, ck, tp=2)
    with pytest.raises(wio.CheckpointError, match=r"tag 'step9' not found.*release"):
        megatron_to_hf(ck, str(tmp_path / "out"), tag="step9")
    with pytest.raises(ConversionError, match="cannot be exported as gpt_neox"):
        megatron_to_hf(ck, str(tmp_path / "out"), architecture="gpt_neox")
    cli = load_script("convert_megatron_to_hf")
    assert cli.main(["--ckpt", str(tmp_path / "nothing"), "--out", str(tmp_path / "out")]) == 1
    assert "does not exist" in capsys.readouterr().err
    # a model whose switches no HF family expresses: arch 'gpt' needs --architecture
    cfg = load_config([], ["model.arch=gpt", "model.vocab_size=200", "train.micro_batch_size=1",
                           "train.global_batch_size=1"], world_size=1)
    full = {k: torch.zeros(s) for k, s in wio.canonical_shapes(cfg, 1).items()}
    wio.write_checkpoint(str(tmp_path / "gpt"), "step1", cfg, {(0, 0): full}, {"step": 1})
    with pytest.raises(ConversionError, match="pass --architecture"):
        megatron_to_hf(str(tmp_path / "gpt"), str(tmp_path / "out"))
    cfg.model.qkv_bias = True
    full = {k: torch.zeros(s) for k, s in wio.canonical_shapes(cfg, 1).items()}
    wio.write_checkpoint(str(tmp_path / "gpt2"), "step1", cfg, {(0, 0): full}, {"step": 1})
    with pytest.raises(ConversionError, match="try --architecture qwen2"):
        megatron_to_hf(str(tmp_path / "gpt2"), str(tmp_path / "out"), architecture="llama")


def test_reshard_errors(llama_dir, tmp_path):
    ck = str(tmp_path / "ck")
    hf_to_megatron(llama_dir, ck, tp=1)
    with pytest.raises(ConversionError, match="num_kv_heads=2"):
        reshard_checkpoint(ck, str(tmp_path / "o"), tp=4, pp=1)
    with pytest.raises(ConversionError, match="pipeline=3"):
        reshard_checkpoint(ck, str(tmp_path / "o"), tp=1, pp=3)
    with pytest.raises(ValueError, match=r"blocks_per_stage=\[2, 1\]"):
        reshard_checkpoint(ck, str(tmp_path / "o"), tp=1, pp=2, blocks_per_stage=[2, 1])
