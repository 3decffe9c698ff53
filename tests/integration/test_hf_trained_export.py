"""A model trained a few steps by the engine (tensor=2 on 2 gloo ranks) exports to transformers, which then
gives our logits; a reward model trained the same way exports as sequence classification."""
from __future__ import annotations

import json
import os

import pytest
import torch

from megatron.interop.convert import megatron_to_hf
from megatron.testing.distributed import run_distributed
from megatron.checkpoint import weights_io as wio
from tests.integration.test_hf_logits import our_forward


def _train(rank, world_size, workdir, objective, overrides):
    from megatron.testing.configs import tiny_test_config
    from megatron.training.trainer import run_training
    cfg = tiny_test_config(workdir, objective, world_size,
                           [f"checkpoint.save={os.path.join(workdir, 'ck')}"] + list(overrides), iters=2)
    return [row["loss"] for row in run_training(cfg).history]


def _tiny_ids():
    """(bos, eos, pad) ids of the shipped tiny tokenizer."""
    from transformers import AutoTokenizer
    from megatron.testing.configs import DATA
    tok = AutoTokenizer.from_pretrained(os.path.join(DATA, "tokenizer"))
    assert tok.pad_token_id not in (None, tok.eos_token_id)
    return tok.bos_token_id, tok.eos_token_id, tok.pad_token_id


def _ids(vocab: int, seq: int = 16) -> torch.Tensor:
    return torch.randint(1, vocab, (1, seq), generator=torch.Generator().manual_seed(0))


@pytest.mark.slow
def test_trained_sft_model_exports_with_our_logits(tmp_path):
    from transformers import AutoModelForCausalLM
    work = str(tmp_path / "sft")
    losses = run_distributed(_train, 2, work, "sft", ["parallel.tensor=2"])[0]
    assert len(losses) == 2
    ck = os.path.join(work, "ck")
    full, meta, cfg = wio.read_weights(ck)
    assert meta["step"] == 2 and meta["tensor"] == 2
    out = str(tmp_path / "hf")
    megatron_to_hf(ck, out)
    hf_cfg = json.load(open(os.path.join(out, "config.json")))
    assert hf_cfg["architectures"] == ["LlamaForCausalLM"]
    # Token ids of the tokenizer it was trained with (data/tiny/tokenizer), not LlamaConfig's 1 / 2 / None.
    tok = _tiny_ids()
    assert (hf_cfg["bos_token_id"], hf_cfg["eos_token_id"], hf_cfg["pad_token_id"]) == tok
    gen = json.load(open(os.path.join(out, "generation_config.json")))
    assert (gen["bos_token_id"], gen["eos_token_id"], gen["pad_token_id"]) == tok
    hf = AutoModelForCausalLM.from_pretrained(out).eval()
    ids = _ids(cfg.model.vocab_size)
    with torch.no_grad():
        want = hf(ids).logits
    cfg.parallel.tensor = 1
    ours = our_forward(cfg, full, ids)[..., :cfg.model.vocab_size]
    assert (ours - want).abs().max().item() < 1e-4


@pytest.mark.slow
def test_trained_reward_model_exports_as_sequence_classification(tmp_path):
    from transformers import AutoModelForSequenceClassification
    work = str(tmp_path / "rm")
    run_distributed(_train, 2, work, "rm", ["parallel.tensor=2"])
    ck = os.path.join(work, "ck")
    full, meta, cfg = wio.read_weights(ck)
    assert cfg.model.value_head and meta["step"] == 2
    out = str(tmp_path / "hf")
    megatron_to_hf(ck, out, drop_value_bias=True)
    hf_cfg = json.load(open(os.path.join(out, "config.json")))
    assert (hf_cfg["bos_token_id"], hf_cfg["eos_token_id"], hf_cfg["pad_token_id"]) == _tiny_ids()
    hf = AutoModelForSequenceClassification.from_pretrained(out).eval()
    ids = _ids(cfg.model.vocab_size)
    with torch.no_grad():
        got = hf(ids).logits[0, 0].item()
    cfg.parallel.tensor = 1
    want = our_forward(cfg, full, ids)[0, -1].item() - full["value_head.bias"].item()
    assert abs(got - want) < 1e-4
