"""tools/generate.py end to end: a Hugging Face model imported on the fly (greedy output equals transformers
`generate`), text / chat / token-id prompts, an over-long prompt skipped and counted, one of our checkpoints in
another layout, and `deepy.py tools/generate.py` on two data-parallel ranks giving the one-process samples."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
import yaml

from megatron.data import load_tokenizer
from megatron.generation.prompts import encode_prompt
from megatron.interop.convert import hf_to_megatron
from megatron.testing.configs import DATA, REPO
from tests.integration.test_hf_logits import randomize

TOKENIZER = os.path.join(DATA, "tokenizer")
CHAT = [{"role": "user", "content": "count down from 9:"}]
pytestmark = pytest.mark.slow


def _run(args, cwd=REPO, timeout=300):
    env = {**os.environ, "PYTHONPATH": REPO}
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def _summary(proc):
    """The tool's final JSON line (under deepy a launcher prefix may precede it)."""
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = [ln for ln in proc.stdout.splitlines() if '{"tokens_per_s"' in ln][-1]
    return json.loads(line[line.index("{"):])


def _read(path):
    with open(path, encoding="utf-8") as fh:
        return [json.loads(line) for line in fh]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    import transformers
    root = tmp_path_factory.mktemp("generate_tool")
    tok = load_tokenizer(TOKENIZER)
    config = transformers.LlamaConfig(vocab_size=tok.vocab_size, hidden_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, intermediate_size=128,
                                      max_position_embeddings=48, bos_token_id=tok.bos_id, eos_token_id=tok.eos_id)
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(config)
    randomize(hf, 0)
    hf.eval()
    hf_dir = root / "hf"
    hf.save_pretrained(hf_dir)
    for name in os.listdir(TOKENIZER):
        shutil.copy(os.path.join(TOKENIZER, name), hf_dir)
    chat_ids = encode_prompt({"messages": CHAT}, tok, tok.chat_template, "test")
    records = [{"id": "a", "prompt": "count up from 3:"}, {"id": "b", "messages": CHAT, "extra": [1, 2]},
               {"id": "c", "prompt_ids": chat_ids}, {"id": "d", "prompt": "7 " * 60}]
    with open(root / "in.jsonl", "w") as fh:
        fh.writelines(json.dumps(r) + "\n" for r in records)
    return root, hf, tok, records, chat_ids


def _config(root, name, **generation):
    path = root / f"{name}.yml"
    gen = {"input": str(root / "in.jsonl"), "output": str(root / f"{name}.jsonl"), "max_new_tokens": 8}
    gen.update(generation)
    with open(path, "w") as fh:
        yaml.safe_dump({"generation": gen, "logging": {"dir": str(root / "logs")}}, fh)
    return str(path)


def test_hf_model_greedy_prompts_and_skip(setup):
    root, hf, tok, records, chat_ids = setup
    cfg = _config(root, "greedy", temperature=0.0, hf_model=str(root / "hf"))
    summary = _summary(_run(["tools/generate.py", cfg]))
    assert summary["prompts"] == 3 and summary["completions"] == 3 and summary["skipped"] == 1
    assert summary["tokens_per_s"] > 0 and summary["generated_tokens"] >= 3
    out = _read(root / "greedy.jsonl")
    assert [r["id"] for r in out] == ["a", "b", "c", "d"] and out[1]["extra"] == [1, 2]
    assert out[3]["completions"] == [] and "max_seq_len=48" in out[3]["skipped"]
    assert out[1]["completions"] == out[2]["completions"]  # chat rendered with the generation prompt
    for rec in out[:3]:
        (c,) = rec["completions"]
        prompt = encode_prompt({k: v for k, v in records[["a", "b", "c"].index(rec["id"])].items()
                                if k in ("prompt", "messages", "prompt_ids")}, tok, tok.chat_template, "t")
        ids = torch.tensor([prompt])
        with torch.no_grad():
            ref = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False,
                              return_dict_in_generate=True, output_logits=True, pad_token_id=0)
        expected = ref.sequences[0, len(prompt):].tolist()
        if tok.eos_id in expected:  # transformers pads after EOS; ours stops there
            expected = expected[:expected.index(tok.eos_id) + 1]
        assert c["token_ids"] == expected
        assert c["finish_reason"] == ("stop" if expected[-1] == tok.eos_id else "length")
        hf_lp = [torch.log_softmax(s[0].double(), -1)[t].item() for s, t in zip(ref.logits, expected)]
        assert c["logprobs"] == pytest.approx(hf_lp, abs=1e-4)
        body = expected[:-1] if c["finish_reason"] == "stop" else expected
        assert c["text"] == tok.decode(body)


def test_checkpoint_any_layout_and_deepy_data_parallel(setup):
    root, _hf, _tok, _records, _ = setup
    ckpt = str(root / "ours_tp2")
    hf_to_megatron(str(root / "hf"), ckpt, tp=2)  # saved at tensor 2, generated at tensor 1
    sampled = dict(n=2, temperature=1.0, top_p=0.9, seed=3)
    one = _config(root, "one", **sampled)
    summary = _summary(_run(["tools/generate.py", one, "--set", f"checkpoint.load={ckpt}"]))
    assert summary["completions"] == 6 and summary["skipped"] == 1
    two = _config(root, "two", **sampled)
    proc = _run(["deepy.py", "tools/generate.py", two, "--set", f"checkpoint.load={ckpt}", "launcher.num_gpus=2"],
                timeout=600)
    assert _summary(proc)["completions"] == 6
    a, b = _read(root / "one.jsonl"), _read(root / "two.jsonl")
    for ra, rb in zip(a, b):
        assert [c["token_ids"] for c in ra["completions"]] == [c["token_ids"] for c in rb["completions"]]
        for ca, cb in zip(ra["completions"], rb["completions"]):
            assert ca["logprobs"] == pytest.approx(cb["logprobs"], abs=1e-5)
    assert a[0]["completions"][0]["token_ids"] != a[0]["completions"][1]["token_ids"]


def test_config_errors_exit_2(setup):
    root = setup[0]
    cfg = _config(root, "bad", hf_model=str(root / "hf"))
    proc = _run(["tools/generate.py", cfg, "--set", "parallel.pipeline=2"])
    assert proc.returncode == 2 and "set parallel.pipeline=1" in proc.stderr, proc.stderr[-2000:]
