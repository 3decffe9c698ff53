"""TRL formats, preference side: chosen/rejected strings with an implicit prompt (no `prompt` key) are split as
TRL's `extract_prompt` splits them, layouts that cannot be split say so (not "missing field 'prompt'"), and
`score_chosen` / `score_rejected` columns give the pair margin and reach the micro-batch."""
from __future__ import annotations

import math

import numpy as np
import pytest

from megatron.data import BadRecordError, load_tokenizer, open_dataset
from megatron.data.records import extract_text_prompt
from tests.unit.test_data_common import TOKENIZER, make_cfg, run_preprocess, settings_for, write_jsonl
from tests.unit.test_data_formats_common import one_batch, qwen_like_tokenizer, scored_text, sequence_ids

# (chosen, rejected) -> the (prompt, chosen, rejected) TRL's extract_prompt gives
IMPLICIT = [
    (("count up from 7: 7 8 9", "count up from 7: 7 9 8"), ("count up from 7: 7", " 8 9", " 9 8")),
    (("Q: sky? A: blue", "Q: sky? A: green"), ("Q: sky? A:", " blue", " green")),      # space moved to the answers
    (("The answer is 42.", "The answer is 43."), ("The answer is 4", "2.", "3.")),       # split inside a word
    (("abc", "abcd"), ("ab", "c", "cd")),                                                 # one is a prefix
    (("yes", "no"), ("", "yes", "no")),                                                   # nothing shared
]


@pytest.mark.parametrize("pair,expected", IMPLICIT)
def test_implicit_prompt_split_matches_trl(pair, expected):
    assert extract_text_prompt(*pair) == expected
    trl = pytest.importorskip("trl", reason="trl (dev extra) compares our split with extract_prompt")
    got = trl.extract_prompt({"chosen": pair[0], "rejected": pair[1]})
    assert (got["prompt"], got["chosen"], got["rejected"]) == expected


@pytest.mark.parametrize("which", ["tiny", "qwen"])
def test_implicit_prompt_strings_train_as_pairs(which, tmp_path):
    tok_dir = TOKENIZER if which == "tiny" else qwen_like_tokenizer(str(tmp_path / "qwen")).path
    recs = [{"chosen": c, "rejected": r} for (c, r), _ in IMPLICIT]
    path = write_jsonl(tmp_path / "p.jsonl", recs)
    cfg = make_cfg(tmp_path, f"data.tokenizer={tok_dir}", f"data.train_path={path}", kind="pairwise")
    tok = load_tokenizer(tok_dir)
    lines = []
    ds = open_dataset(cfg, tok, "train", log=lines.append, progress=False)
    assert ds.kind == "pairwise" and len(ds) == len(IMPLICIT)
    batch = one_batch(ds, list(range(len(IMPLICIT))))
    bos = [tok.bos_id] if tok.add_bos else []
    for e, (_, (prompt, chosen, rejected)) in enumerate(IMPLICIT):
        for s, response in ((2 * e, chosen), (2 * e + 1, rejected)):
            ids = sequence_ids(batch, s)
            plen = ds[e].sequences[s - 2 * e].prompt_len
            assert ids[:plen] == bos + tok.encode(prompt)  # the prompt generation would be given
            if not ids[:plen]:  # nothing before the response (no prompt, no BOS): its first token has no predictor
                response = tok.decode(tok.encode(response)[1:])
            assert scored_text(tok, batch, s) == response + tok.eos_token  # decoded loss mask
            assert ids.count(tok.eos_id) == 1 and ids[-1] == tok.eos_id
    # "The answer is 4" | "2." splits a number: that pair is tokenised prompt-then-response and counted
    report = ds.indexed.meta["report"]
    assert report["boundary_fallbacks"] >= 1 and report["records_written"] == len(IMPLICIT)


def test_unsupported_implicit_layouts_say_so(tmp_path):
    tok = load_tokenizer(TOKENIZER)
    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    cases = {  # record -> what the one-line error must say
        "mixed": ({"chosen": "hello", "rejected": msgs}, r"p.jsonl:1: missing field: no 'prompt' field and "
                  r"'chosen'/'rejected' mix a string and a message list: this implicit-prompt layout is unsupported"),
        "same": ({"chosen": "same text", "rejected": "same text"}, r"p.jsonl:1: bad field value: 'chosen' and "
                 r"'rejected' are identical"),
        "half_scored": ({"prompt": "a", "chosen": " b", "rejected": " c", "score_chosen": 1.0},
                        r"'score_rejected' is absent or null but 'score_chosen' is set"),
    }
    for name, (rec, message) in cases.items():
        path = write_jsonl(tmp_path / "p.jsonl", [rec])
        with pytest.raises(BadRecordError, match=message):
            run_preprocess(path, tmp_path / name, tok, settings_for(tmp_path, kind="pairwise"))


def test_message_pairs_without_shared_turns_have_an_empty_prompt(tmp_path):
    tok = load_tokenizer(TOKENIZER)
    rec = {"chosen": [{"role": "assistant", "content": "7 8 9"}], "rejected": [{"role": "assistant", "content": "7 9"}]}
    path = write_jsonl(tmp_path / "m.jsonl", [rec])
    ds = open_dataset(make_cfg(tmp_path, f"data.train_path={path}", kind="pairwise"), tok, "train", log=None,
                      progress=False)
    batch = one_batch(ds, [0])
    for s, text in ((0, "7 8 9"), (1, "7 9")):  # the prompt is the generation prompt of no messages
        assert tok.decode(sequence_ids(batch, s)) == f"<|bos|><|im_start|>assistant\n{text}<|eos|>"
        assert scored_text(tok, batch, s) == text + "<|eos|>"


def test_score_columns_give_margin_and_batch_scores(tmp_path):
    recs = [dict(prompt="count up from 1:", chosen=" 1 2 3", rejected=" 1 3", score_chosen=8.5, score_rejected=2.0),
            dict(prompt="count up from 2:", chosen=" 2 3 4", rejected=" 2 4"),  # no scores: NaN, margin 0
            dict(prompt="count up from 3:", chosen=" 3 4 5", rejected=" 3 5", score_chosen=1.0, score_rejected=0.5,
                 margin=3.0)]  # an explicit margin wins over the score difference
    path = write_jsonl(tmp_path / "s.jsonl", recs)
    cfg = make_cfg(tmp_path, f"data.train_path={path}", kind="pairwise")
    ds = open_dataset(cfg, load_tokenizer(TOKENIZER), "train", log=None, progress=False)
    assert [ds.indexed.margin(e) for e in (0, 2)] == [6.5, 3.0] and math.isnan(ds.indexed.margin(1))
    assert [ds.indexed.score(i) for i in (0, 1, 4, 5)] == [8.5, 2.0, 1.0, 0.5]
    batch = one_batch(ds, [0, 1, 2])
    assert batch["margin"].tolist() == [6.5, 0.0, 3.0]
    assert batch["score_chosen"][[0, 2]].tolist() == [8.5, 1.0]
    assert batch["score_rejected"][[0, 2]].tolist() == [2.0, 0.5]
    assert np.isnan(batch["score_chosen"][1].item()) and np.isnan(batch["score_rejected"][1].item())
    plain = one_batch(ds, [1])  # a micro-batch without any scored record carries no score keys
    assert "score_chosen" not in plain and "margin" not in plain
