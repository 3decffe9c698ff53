"""tools/evaluate.py: lm-evaluation-harness on a checkpoint of ours (exported on the fly) with the shipped local
task data/tiny/eval/tiny_mc.yaml. The harness's per-choice log-likelihoods equal our own model's log p(choice |
prompt) (tokenised as the harness does: the pair encoded whole, BOS included, the choice = the tokens after the
prompt's), and its accuracy is the share of questions whose best choice is the right one. Skips without lm-eval."""
from __future__ import annotations

import json
import os

import pytest
import torch

from megatron.checkpoint import weights_io as wio
from megatron.model import GPTModel
from megatron.mpu import ParallelState
from megatron.testing.configs import DATA, tiny_test_config

lm_eval = pytest.importorskip("lm_eval", reason="tools/evaluate.py needs lm-evaluation-harness (pip install lm-eval; "
                                                "requirements/dev.txt)")
pytestmark = pytest.mark.slow
LIMIT = 6


def test_tiny_mc_on_our_checkpoint(tmp_path, capsys):
    from transformers import AutoTokenizer
    from tools.evaluate import main

    cfg = tiny_test_config(str(tmp_path / "work"), overrides=["model.max_seq_len=64"])
    torch.manual_seed(0)
    model = GPTModel(cfg, ParallelState.single(), layer_seed=cfg.train.seed).eval()
    wio.write_checkpoint(str(tmp_path / "ck"), "step1", cfg, {(0, 0): model.state_dict()}, {"step": 1})
    conf = tmp_path / "eval.yml"
    conf.write_text(f"logging:\n  dir: {tmp_path / 'logs'}\n")
    assert main([str(conf), "--set", f"evaluate.model={tmp_path / 'ck'}", f"evaluate.limit={LIMIT}",
                 "evaluate.batch_size=4"]) == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    out = json.loads((tmp_path / "logs" / "eval.json").read_text())
    assert printed["results"] == out["results"] and set(out["results"]) == {"tiny_mc"}

    with open(os.path.join(DATA, "eval", "tiny_mc.jsonl"), encoding="utf-8") as fh:
        docs = [json.loads(line) for line in fh][:LIMIT]
    tok = AutoTokenizer.from_pretrained(os.path.join(DATA, "tokenizer"))

    def loglik(context, choice):  # our model, the harness's split: whole pair encoded, choice = after the prompt
        whole = tok(context + choice)["input_ids"]
        n = len(tok(context)["input_ids"])
        x = torch.tensor([whole])
        with torch.no_grad():
            logits = model(x, torch.arange(len(whole))[None], torch.ones_like(x))[0].float()
        logp = torch.log_softmax(logits[:, :cfg.model.vocab_size], dim=-1)
        return float(sum(logp[t - 1, whole[t]] for t in range(n, len(whole))))

    samples = sorted(out["samples"]["tiny_mc"], key=lambda s: s["doc_id"])
    assert [s["doc_id"] for s in samples] == list(range(LIMIT))
    right = 0
    for s, doc in zip(samples, docs):
        ours = [loglik(doc["prompt"], c) for c in doc["choices"]]
        assert s["loglikelihoods"] == pytest.approx(ours, abs=2e-3)
        right += int(max(range(4), key=lambda i: s["loglikelihoods"][i]) == doc["label"])
    assert out["results"]["tiny_mc"]["acc"] == pytest.approx(right / LIMIT)


def test_missing_checkpoint_is_an_error(tmp_path, capsys):
    from tools.evaluate import main

    conf = tmp_path / "eval.yml"
    conf.write_text(f"logging:\n  dir: {tmp_path}\n")
    assert main([str(conf), "--set", f"evaluate.model={tmp_path / 'nothing'}"]) == 2
    assert "error:" in capsys.readouterr().err
