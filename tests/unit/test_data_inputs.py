"""Every input layout and file format gives the ids and prompt lengths of a direct tokenizer call."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from transformers import AutoTokenizer

from megatron.data import load_tokenizer
from tests.unit.test_data_common import TINY, TOKENIZER, run_preprocess, sequences, settings_for, write_jsonl


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(TOKENIZER)


@pytest.fixture(scope="module")
def hf():
    return AutoTokenizer.from_pretrained(TOKENIZER, local_files_only=True)


def expect_text(hf, prompt: str, response: str):
    """Reference: the tokenizer's own call (it adds BOS), EOS appended; prompt length from the prompt alone."""
    ids = hf(prompt + response)["input_ids"]
    return ids + [hf.eos_token_id], len(hf(prompt)["input_ids"])


def expect_chat(hf, prompt_msgs, response_msgs):
    """Reference: apply_chat_template of the whole conversation / of the prompt with the generation prompt."""
    full = list(hf.apply_chat_template(prompt_msgs + response_msgs, tokenize=True)["input_ids"])
    prompt = list(hf.apply_chat_template(prompt_msgs, tokenize=True, add_generation_prompt=True)["input_ids"])
    assert full[:len(prompt)] == prompt
    if full[-1] != hf.eos_token_id:
        full.append(hf.eos_token_id)
    return full, len(prompt)


def read_jsonl(name, n):
    with open(f"{TINY}/{name}") as fh:
        return [json.loads(line) for _, line in zip(range(n), fh)]


SFT = read_jsonl("sft.jsonl", 24)


def write_format(fmt, records, tmp_path):
    if fmt == "jsonl":
        return write_jsonl(tmp_path / "d.jsonl", records)
    if fmt == "json":
        path = tmp_path / "d.json"
        path.write_text(json.dumps(records, indent=1))
        return str(path)
    if fmt == "parquet":
        path = tmp_path / "d.parquet"
        pd.DataFrame(records).to_parquet(path)
        return str(path)
    if fmt == "csv":
        path = tmp_path / "d.csv"
        pd.DataFrame(records).to_csv(path, index=False)
        return str(path)
    if fmt == "hf_disk":
        import datasets
        path = tmp_path / "d_disk"
        datasets.Dataset.from_list(records).save_to_disk(str(path))
        return str(path)
    raise ValueError(fmt)


@pytest.mark.parametrize("fmt", ["jsonl", "json", "parquet", "csv", "hf_disk"])
def test_sft_formats_match_direct_tokenizer(fmt, tok, hf, tmp_path):
    records = SFT + [{"prompt": "7", "response": " 8"}]  # numeric text must stay text (CSV typing)
    path = write_format(fmt, records, tmp_path)
    report, ds = run_preprocess(path, tmp_path / "out", tok, settings_for(tmp_path))
    assert ds.kind == "sft" and report.records_read == report.records_written == len(records)
    got = sequences(ds)
    for rec, (ids, plen) in zip(records, got):
        exp_ids, exp_plen = expect_text(hf, rec["prompt"], rec["response"])
        assert ids == exp_ids and plen == exp_plen
        assert ids.count(hf.bos_token_id) == 1 and ids[-1] == hf.eos_token_id


@pytest.mark.parametrize("fmt", ["parquet", "hf_disk"])
def test_nested_messages_and_bools_in_columnar_formats(fmt, tok, hf, tmp_path):
    pairs = read_jsonl("pairwise_chat.jsonl", 6)
    _, ds = run_preprocess(write_format(fmt, pairs, tmp_path), tmp_path / "p", tok, settings_for(tmp_path))
    assert ds.kind == "pairwise" and ds.num_examples == 6
    for e, rec in enumerate(pairs):
        for s, name in enumerate(("chosen", "rejected")):
            assert sequences(ds)[2 * e + s] == expect_chat(hf, rec[name][:1], rec[name][1:])
    unp = read_jsonl("unpaired.jsonl", 8)
    (tmp_path / "unpaired").mkdir()
    _, ds = run_preprocess(write_format(fmt, unp, tmp_path / "unpaired"), tmp_path / "u", tok, settings_for(tmp_path))
    assert ds.kind == "unpaired"
    assert [ds.label(e) for e in range(8)] == [float(r["label"]) for r in unp]


def test_csv_labels_and_ids_as_text(tok, tmp_path):
    path = tmp_path / "u.csv"
    path.write_text('prompt,completion,label\ncount up from 1:, 1 2 3,true\ncount up from 1:, 1 3,False\n'
                    'reverse: a b, b a,1\n')
    _, ds = run_preprocess(path, tmp_path / "u", tok, settings_for(tmp_path))
    assert ds.kind == "unpaired" and [ds.label(e) for e in range(3)] == [1.0, 0.0, 1.0]
    path = tmp_path / "i.csv"
    path.write_text('prompt_ids,response_ids\n"[5, 6]","[7, 8]"\n')
    _, ds = run_preprocess(path, tmp_path / "i", tok, settings_for(tmp_path))
    assert sequences(ds) == [([5, 6, 7, 8, tok.eos_id], 2)]


def test_messages_sft_loss_only_on_last_assistant_turn(tok, hf, tmp_path):
    recs = read_jsonl("sft_chat.jsonl", 30)
    assert any(sum(m["role"] == "assistant" for m in r["messages"]) == 2 for r in recs)  # multi-turn present
    _, ds = run_preprocess(f"{TINY}/sft_chat.jsonl", tmp_path / "c", tok, settings_for(tmp_path))
    got = sequences(ds)
    for rec, (ids, plen) in zip(recs, got):
        msgs = rec["messages"]
        assert (ids, plen) == expect_chat(hf, msgs[:-1], msgs[-1:])
        assert ids.count(hf.bos_token_id) == 1  # template writes BOS; not doubled
        # the response part decodes to the last assistant message followed by EOS
        assert hf.decode(ids[plen:]) == msgs[-1]["content"] + hf.eos_token


def test_pairwise_layouts_give_the_same_tokens(tok, hf, tmp_path):
    """Implicit prompt, UltraFeedback (prompt string + full conversations) and TRL explicit prompt agree."""
    base = read_jsonl("pairwise_chat.jsonl", 10)
    user = lambda r: r["chosen"][0]  # noqa: E731
    layouts = {
        "implicit": base,
        "ultrafeedback": [dict(prompt=user(r)["content"], chosen=r["chosen"], rejected=r["rejected"]) for r in base],
        "explicit": [dict(prompt=[user(r)], chosen=r["chosen"][1:], rejected=r["rejected"][1:]) for r in base],
        "prompt_str_completions_msgs": [dict(prompt=user(r)["content"], chosen=r["chosen"][1:],
                                             rejected=r["rejected"][1:]) for r in base],
    }
    expected = []
    for r in base:
        for name in ("chosen", "rejected"):
            expected.append(expect_chat(hf, r[name][:1], r[name][1:]))
    for name, recs in layouts.items():
        _, ds = run_preprocess(write_jsonl(tmp_path / f"{name}.jsonl", recs), tmp_path / name, tok,
                               settings_for(tmp_path))
        assert ds.kind == "pairwise", name
        assert sequences(ds) == expected, name
        assert all(ds.prompt_lens[2 * e] == ds.prompt_lens[2 * e + 1] for e in range(len(base)))


def test_implicit_prompt_multi_turn_shared_prefix(tok, hf, tmp_path):
    conv = [{"role": "user", "content": "count up from 3:"}, {"role": "assistant", "content": "3 4 5"},
            {"role": "user", "content": "reverse: a b"}]
    rec = dict(chosen=conv + [{"role": "assistant", "content": "b a"}],
               rejected=conv + [{"role": "assistant", "content": "a b"}])
    _, ds = run_preprocess(write_jsonl(tmp_path / "m.jsonl", [rec]), tmp_path / "m", tok, settings_for(tmp_path))
    assert sequences(ds) == [expect_chat(hf, conv, rec["chosen"][3:]), expect_chat(hf, conv, rec["rejected"][3:])]


def test_string_pairwise_and_unpaired_match_direct_tokenizer(tok, hf, tmp_path):
    pairs = read_jsonl("pairwise.jsonl", 10)
    _, ds = run_preprocess(f"{TINY}/pairwise.jsonl", tmp_path / "p", tok, settings_for(tmp_path))
    got = sequences(ds)
    for e, r in enumerate(pairs):
        assert got[2 * e] == expect_text(hf, r["prompt"], r["chosen"])
        assert got[2 * e + 1] == expect_text(hf, r["prompt"], r["rejected"])
    unp = read_jsonl("unpaired.jsonl", 10)
    _, ds = run_preprocess(f"{TINY}/unpaired.jsonl", tmp_path / "u", tok, settings_for(tmp_path))
    assert ds.num_sequences == 1000  # one stored sequence per example; KL sequences are built on open
    for e, r in enumerate(unp):
        assert sequences(ds)[e] == expect_text(hf, r["prompt"], r["completion"])


def test_pretokenised_used_as_given(tok, tmp_path):
    eos = tok.eos_id
    recs = [{"prompt_ids": [10, 11], "response_ids": [12, 13]},            # EOS appended
            {"prompt_ids": [10], "response_ids": [14, eos]},               # EOS kept, not doubled
            {"response_ids": [15, 16]}]                                    # no prompt: empty
    _, ds = run_preprocess(write_jsonl(tmp_path / "s.jsonl", recs), tmp_path / "s", tok, settings_for(tmp_path))
    assert sequences(ds) == [([10, 11, 12, 13, eos], 2), ([10, 14, eos], 1), ([15, 16, eos], 0)]
    pairs = [{"prompt_ids": [1, 20], "chosen_ids": [21], "rejected_ids": [22, 23], "margin": 0.5}]
    _, ds = run_preprocess(write_jsonl(tmp_path / "p.jsonl", pairs), tmp_path / "p", tok, settings_for(tmp_path))
    assert ds.kind == "pairwise" and sequences(ds) == [([1, 20, 21, eos], 2), ([1, 20, 22, 23, eos], 2)]
    assert ds.margin(0) == 0.5
    unp = [{"prompt_ids": [30], "completion_ids": [31], "label": False}]
    _, ds = run_preprocess(write_jsonl(tmp_path / "u.jsonl", unp), tmp_path / "u", tok, settings_for(tmp_path))
    assert ds.kind == "unpaired" and sequences(ds) == [([30, 31, eos], 1)] and ds.label(0) == 0.0


def test_custom_field_names_and_trl_prompt_completion(tok, hf, tmp_path):
    recs = [{"question": "count up from 1:", "answer": " 1 2 3"}]
    s = settings_for(tmp_path, "data.prompt_field=question", "data.response_field=answer")
    _, ds = run_preprocess(write_jsonl(tmp_path / "q.jsonl", recs), tmp_path / "q", tok, s)
    assert sequences(ds) == [expect_text(hf, "count up from 1:", " 1 2 3")]
    # TRL prompt-completion without a label is SFT
    recs = [{"prompt": "reverse: a b", "completion": " b a"}]
    _, ds = run_preprocess(write_jsonl(tmp_path / "c.jsonl", recs), tmp_path / "c", tok, settings_for(tmp_path))
    assert ds.kind == "sft" and sequences(ds) == [expect_text(hf, "reverse: a b", " b a")]


def test_token_dtype_and_index_are_memory_mapped(tok, tmp_path):
    _, ds = run_preprocess(f"{TINY}/sft_valid.jsonl", tmp_path / "v", tok, settings_for(tmp_path))
    assert ds.tokens.dtype == np.uint16 and isinstance(ds.tokens, np.memmap)
    assert isinstance(ds.index, np.memmap)
    assert ds.meta["tokenizer_fingerprint"] == tok.fingerprint and ds.meta["kind"] == "sft"
    assert ds.meta["num_examples"] == 200 and ds.meta["report"]["records_written"] == 200


def test_optional_margin_column(tok, tmp_path):
    recs = [dict(prompt="count up from 1:", chosen=" 1 2 3", rejected=" 1 3", margin=0.5),
            dict(prompt="count up from 2:", chosen=" 2 3 4", rejected=" 2 4")]
    path = write_format("parquet", recs, tmp_path)  # pandas stores the missing margin as NaN
    _, ds = run_preprocess(path, tmp_path / "m", tok, settings_for(tmp_path))
    assert ds.margin(0) == 0.5 and np.isnan(ds.margin(1))
