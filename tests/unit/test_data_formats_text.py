"""TRL formats, files side: plain `{"text": ...}` language-modelling files train as SFT with every token scored,
a `datasets` DatasetDict directory says which split it reads (train for training, validation/test for
validation), and a bad record met inside a training rank ends train.py with one line, not a traceback."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from megatron.config import ConfigError
from megatron.data import load_tokenizer, open_dataset
from tests.unit.test_data_common import ROOT, TOKENIZER, make_cfg, write_jsonl
from tests.unit.test_data_formats_common import one_batch, qwen_like_tokenizer, scored_text, sequence_ids

TEXTS = ["count up from 7: 7 8 9 10", "Hello world, this is plain text.\nA second line.", "reverse: a b c -> c b a"]


@pytest.mark.parametrize("which", ["tiny", "qwen"])
def test_plain_text_records_are_sft_with_every_token_scored(which, tmp_path):
    tok_dir = TOKENIZER if which == "tiny" else qwen_like_tokenizer(str(tmp_path / "qwen")).path
    path = write_jsonl(tmp_path / "lm.jsonl", [{"text": t} for t in TEXTS])
    # a chat template is set on purpose: plain text is language modelling and is never templated
    cfg = make_cfg(tmp_path, f"data.tokenizer={tok_dir}", f"data.train_path={path}", "data.chat_template=chatml")
    tok = load_tokenizer(tok_dir)
    ds = open_dataset(cfg, tok, "train", log=None, progress=False)
    assert ds.kind == "sft" and len(ds) == len(TEXTS)
    batch = one_batch(ds, list(range(len(TEXTS))))
    bos = [tok.bos_id] if tok.add_bos else []
    for i, text in enumerate(TEXTS):
        ids = sequence_ids(batch, i)
        assert ids == bos + tok.encode(text) + [tok.eos_id] and ids.count(tok.eos_id) == 1
        # every token is a target except the first one (nothing predicts it): with BOS that is all the text
        expected = text + tok.eos_token if bos else tok.decode(tok.encode(text)[1:]) + tok.eos_token
        assert scored_text(tok, batch, i) == expected
    # the data.text_field key renames the column
    path = write_jsonl(tmp_path / "lm2.jsonl", [{"content": t} for t in TEXTS])
    cfg = make_cfg(tmp_path, f"data.tokenizer={tok_dir}", f"data.train_path={path}", "data.text_field=content")
    assert len(open_dataset(cfg, tok, "train", log=None, progress=False)) == len(TEXTS)


def test_unknown_layout_hint_names_the_text_layout(tmp_path):
    path = write_jsonl(tmp_path / "x.jsonl", [{"body": "hello"}])
    cfg = make_cfg(tmp_path, f"data.train_path={path}")
    with pytest.raises(ConfigError, match=r"x.jsonl:1.*\['body'\].*text \(sft\).*data.text_field"):
        open_dataset(cfg, load_tokenizer(TOKENIZER), "train", log=None, progress=False)


def test_dataset_dict_says_which_split_it_reads(tmp_path):
    import datasets

    splits = {name: [{"prompt": f"count up from {i}:", "response": f" {name} {i}"} for i in range(n)]
              for name, n in (("train", 5), ("validation", 3), ("test", 2))}
    path = str(tmp_path / "dd")
    datasets.DatasetDict({k: datasets.Dataset.from_list(v) for k, v in splits.items()}).save_to_disk(path)
    cfg = make_cfg(tmp_path, f"data.train_path={path}", f"data.valid_path={path}")
    tok = load_tokenizer(TOKENIZER)
    lines = []
    train = open_dataset(cfg, tok, "train", log=lines.append, progress=False)
    valid = open_dataset(cfg, tok, "valid", log=lines.append, progress=False)
    assert (len(train), len(valid)) == (5, 3)
    said = [line for line in lines if "DatasetDict" in line]
    assert said == [f"data: {path} is a DatasetDict with splits ['train', 'validation', 'test']: using split "
                    f"'{s}' for {role}" for s, role in (("train", "training"), ("validation", "validation"))]
    assert tok.decode(valid[2].sequences[0].ids.tolist()).endswith(" validation 2" + tok.eos_token)
    lines.clear()  # the cached copy says it again
    open_dataset(cfg, tok, "train", log=lines.append, progress=False)
    assert any("using split 'train'" in line for line in lines)
    # no train split among several: the error names the key and the way out
    path2 = str(tmp_path / "dd2")
    datasets.DatasetDict({k: datasets.Dataset.from_list(splits[k]) for k in ("validation", "test")}).save_to_disk(path2)
    with pytest.raises(ConfigError, match=r"data.train_path.*splits \['validation', 'test'\].*save_to_disk"):
        open_dataset(make_cfg(tmp_path, f"data.train_path={path2}"), tok, "train", log=None, progress=False)


@pytest.mark.slow  # starts train.py in a subprocess (imports torch, DeepSpeed, transformers: ~10 s)
def test_bad_record_inside_a_training_rank_is_one_line(tmp_path):
    """train.py (one rank, as deepy starts it) stops with exit code 2 and one `error:` line naming file,
    line, reason and the fix; no traceback."""
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "count up from 1:", "response": " 1 2"}, {"prompt": "x"}])
    sets = [f"data.train_path={bad}", "data.valid_path=null", f"data.cache_dir={tmp_path}/cache",
            f"logging.dir={tmp_path}/logs", "checkpoint.save=null", "train.progress_bar=false"]
    cmd = [sys.executable, "train.py", os.path.join("configs", "tiny", "sft.yml")]
    for s in sets:
        cmd += ["--set", s]
    env = dict(os.environ, PYTHONPATH=ROOT)
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert errors == [f"error: {bad}:2: missing field: 'response' is absent or null "
                      "(set data.on_bad_record=skip to drop such records)"], proc.stderr[-3000:]
