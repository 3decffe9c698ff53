"""Greedy generation on imported Hugging Face models equals transformers `generate` token for token (Llama GQA,
GPT-NeoX, Qwen2), and the returned log-probs equal transformers' log-softmax of its logits at those tokens."""
from __future__ import annotations

import os

import pytest
import torch

from megatron.checkpoint import weights_io as wio
from megatron.generation import SamplingParams, generate
from megatron.interop.convert import hf_to_megatron
from megatron.model import GPTModel
from megatron.mpu import ParallelState
from tests.integration.test_hf_logits import make_hf

NEW = 12
PROMPTS = [[5, 17, 3, 99, 150, 2, 41], [7], [120, 33, 33, 8]]


def _ours(ckpt: str):
    tag_dir = os.path.join(ckpt, "release")
    cfg = wio.read_config(tag_dir)
    model = GPTModel(cfg, ParallelState.single())
    model.load_state_dict(torch.load(wio.weights_file(tag_dir, 0, 0), weights_only=True), strict=True)
    return cfg, model.eval()


@pytest.mark.parametrize("case", ["llama_gqa", "gpt_neox", "qwen2"])
def test_greedy_equals_transformers_generate(tmp_path, case):
    hf = make_hf(case, str(tmp_path / "hf"), seed=3)
    hf.generation_config.eos_token_id = None  # run the full length on both sides
    hf.generation_config.pad_token_id = 0
    hf_to_megatron(str(tmp_path / "hf"), str(tmp_path / "ck"), tp=1)
    cfg, model = _ours(str(tmp_path / "ck"))
    assert cfg.derived.padded_vocab_size > cfg.model.vocab_size  # padded head rows are in play
    ours = generate(model, cfg, ParallelState.single(), PROMPTS, SamplingParams(temperature=0.0, max_new_tokens=NEW))
    for prompt, (c,) in zip(PROMPTS, ours):
        ids = torch.tensor([prompt])
        with torch.no_grad():
            out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW, do_sample=False,
                              return_dict_in_generate=True, output_logits=True)
        expected = out.sequences[0, len(prompt):].tolist()
        assert c.token_ids == expected, case
        logps = torch.stack([torch.log_softmax(step[0].double(), -1)[t] for step, t in zip(out.logits, expected)])
        assert torch.allclose(torch.tensor(c.logprobs, dtype=torch.float64), logps, atol=1e-4, rtol=0), case
        assert c.finish_reason == "length"
