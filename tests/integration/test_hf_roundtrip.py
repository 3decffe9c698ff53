"""HF -> ours (tensor=2, pipeline=2) -> HF is bit-identical; resharding and the CLIs keep every tensor."""
from __future__ import annotations

import importlib.util
import json
import os

import pytest
import torch
from safetensors.torch import load_file

from megatron.interop.convert import hf_to_megatron, megatron_to_hf
from megatron.checkpoint import weights_io as wio
from tests.integration.test_hf_logits import CASES, make_hf, tokens

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ROUND_TRIP_CASES = ["llama_gqa", "llama3_rope_tied", "mistral", "qwen2", "gpt_neox"]


def load_script(name: str):
    """Import tools/ckpts/<name>.py as a module (the scripts are not a package)."""
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "tools", "ckpts", f"{name}.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _make_tokenizer(out_dir: str) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    vocab = {f"w{i}": i for i in range(190)}
    vocab["<unk>"] = 190
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>").save_pretrained(out_dir)


@pytest.mark.parametrize("case", ROUND_TRIP_CASES)
def test_round_trip_tp2_pp2_bit_identical(tmp_path, case):
    from transformers import AutoModelForCausalLM
    hf_dir, ck, back = str(tmp_path / "hf"), str(tmp_path / "ck"), str(tmp_path / "back")
    hf = make_hf(case, hf_dir, seed=3)
    hf_to_megatron(hf_dir, ck, tp=2, pp=2)
    assert sorted(os.listdir(os.path.join(ck, "release", "weights"))) == \
        ["tp00_pp00.safetensors", "tp00_pp01.safetensors", "tp01_pp00.safetensors", "tp01_pp01.safetensors"]
    megatron_to_hf(ck, back)
    a, b = load_file(os.path.join(hf_dir, "model.safetensors")), load_file(os.path.join(back, "model.safetensors"))
    assert set(a) == set(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
    ca, cb = (json.load(open(os.path.join(d, "config.json"))) for d in (hf_dir, back))
    for key in ("architectures", "model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                "num_attention_heads", "num_key_value_heads", "rope_parameters", "tie_word_embeddings",
                "rms_norm_eps", "layer_norm_eps", "use_parallel_residual", "attention_bias", "max_position_embeddings",
                "bos_token_id", "eos_token_id", "sliding_window"):
        assert ca.get(key) == cb.get(key), key
    assert os.path.isfile(os.path.join(back, "generation_config.json"))
    reloaded = AutoModelForCausalLM.from_pretrained(back).eval()
    ids = tokens(seed=5)
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, hf(ids).logits)


def test_cli_round_trip_with_reshard_bf16_and_tokenizer(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    hf_dir = str(tmp_path / "hf")
    make_hf("qwen2", hf_dir, seed=4)
    _make_tokenizer(hf_dir)
    ck, ck2, back = str(tmp_path / "ck"), str(tmp_path / "ck2"), str(tmp_path / "back")
    to_ours, to_hf, reshard = (load_script(n) for n in ("convert_hf_to_megatron", "convert_megatron_to_hf",
                                                         "reshard"))
    assert to_ours.main(["--hf-dir", hf_dir, "--out", ck, "--tp", "2", "--dtype", "bf16"]) == 0
    assert open(os.path.join(ck, "latest")).read().strip() == "release"
    assert os.path.isfile(os.path.join(ck, "tokenizer", "tokenizer.json"))
    cfg = wio.read_config(os.path.join(ck, "release"))
    assert cfg.train.precision == "bf16" and cfg.data.tokenizer == os.path.join(os.path.abspath(ck), "tokenizer")
    model_yaml = open(os.path.join(ck, "model.yaml")).read()
    from megatron.config import load_config
    started = load_config([os.path.join(ck, "model.yaml")], [f"checkpoint.load={ck}"], world_size=2)
    assert started.model == cfg.model and started.parallel.tensor == 2 and "deepspeed" not in model_yaml
    assert reshard.main(["--ckpt", ck, "--out", ck2, "--tp", "1", "--pp", "2", "--blocks-per-stage", "1,1"]) == 0
    meta = json.load(open(os.path.join(ck2, "release", "meta.json")))
    assert (meta["tensor"], meta["pipeline"], meta["blocks_per_stage"]) == (1, 2, [1, 1])
    full1, _, _ = wio.read_weights(ck)
    full2, _, cfg2 = wio.read_weights(ck2)
    assert cfg2.parallel.tensor == 1 and cfg2.parallel.pipeline == 2
    assert set(full1) == set(full2) and all(torch.equal(full1[k], full2[k]) for k in full1)
    assert to_hf.main(["--ckpt", ck2, "--out", back, "--dtype", "bf16"]) == 0
    a, b = load_file(os.path.join(hf_dir, "model.safetensors")), load_file(os.path.join(back, "model.safetensors"))
    assert all(b[k].dtype == torch.bfloat16 and torch.equal(b[k], a[k].bfloat16()) for k in a)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert open(os.path.join(back, name), "rb").read() == open(os.path.join(hf_dir, name), "rb").read()
    assert AutoTokenizer.from_pretrained(back)("w3 w7")["input_ids"] == \
        AutoTokenizer.from_pretrained(hf_dir)("w3 w7")["input_ids"]
    assert AutoModelForCausalLM.from_pretrained(back).dtype == torch.bfloat16


def test_sharded_pytorch_bin_input(tmp_path):
    """A sharded pytorch_model.bin checkpoint (with index) converts like safetensors."""
    hf_dir, ck = tmp_path / "hf", str(tmp_path / "ck")
    hf = make_hf("llama_gqa", str(hf_dir), seed=6)
    os.remove(hf_dir / "model.safetensors")
    sd = {k: v.clone() for k, v in hf.state_dict().items()}
    keys = sorted(sd)
    half = len(keys) // 2
    weight_map = {}
    for i, part in enumerate((keys[:half], keys[half:])):
        name = f"pytorch_model-0000{i + 1}-of-00002.bin"
        torch.save({k: sd[k] for k in part}, hf_dir / name)
        weight_map.update({k: name for k in part})
    (hf_dir / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    hf_to_megatron(str(hf_dir), ck, tp=1)
    full, _, _ = wio.read_weights(ck)
    assert torch.equal(full["blocks.1.mlp.fc1.weight"],
                       torch.cat([sd["model.layers.1.mlp.gate_proj.weight"], sd["model.layers.1.mlp.up_proj.weight"]]))
    assert set(CASES) >= set(ROUND_TRIP_CASES)
