"""Bad records: named errors with on_bad_record=error; counted and dropped (good ones kept) with skip."""
from __future__ import annotations

import json
import os

import pytest

from megatron.data import BadRecordError, load_tokenizer
from tests.unit.test_data_common import TINY, TOKENIZER, run_preprocess, sequences, settings_for, write_jsonl

GOOD = [{"prompt": f"count up from {i}:", "response": " " + " ".join(str(i + j) for j in range(4))} for i in range(6)]
LONG_RESPONSE = {"prompt": "count up from 1:", "response": " " + " ".join(str(j) for j in range(1, 200))}
BAD_LINES = {  # raw text of each bad record and (reason shown, field it must name)
    "malformed": ('{"prompt": "count up from 1:", "response": ', "malformed JSON", None),
    "missing": (json.dumps({"prompt": "count up from 1:"}), "missing field", "'response'"),
    "empty": (json.dumps({"prompt": "count up from 1:", "response": "  "}), "empty response", "'response'"),
    "long_prompt": (json.dumps({"prompt": "count up from 1: " * 40, "response": " 1"}),
                    "prompt longer than the limit", "data.max_prompt_len"),
    "truncated": (json.dumps(LONG_RESPONSE), "response truncated", "'response'"),
    "not_object": ("[1, 2, 3]", "record is not an object", None),
}


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(TOKENIZER)


def file_with(tmp_path, names):
    """GOOD records with the named bad lines after good record 1, 2, ...; returns (path, {name: line})."""
    lines, where = [], {}
    for i, g in enumerate(GOOD):
        lines.append(json.dumps(g))
        if i < len(names):
            lines.append(BAD_LINES[names[i]][0])
            where[names[i]] = len(lines)
    path = tmp_path / "mixed.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return str(path), where


@pytest.mark.parametrize("name", sorted(BAD_LINES))
def test_error_mode_names_file_line_and_reason(name, tok, tmp_path):
    path, where = file_with(tmp_path, [name])
    with pytest.raises(BadRecordError) as info:
        run_preprocess(path, tmp_path / "o", tok, settings_for(tmp_path, max_seq_len=64))
    msg = str(info.value)
    _, reason, field = BAD_LINES[name]
    assert msg.startswith(f"{path}:{where[name]}: {reason}")
    if field:
        assert field in msg
    assert not os.path.exists(str(tmp_path / "o") + ".meta.json")  # nothing half-written left behind
    assert not any(p.name.startswith("o.") for p in tmp_path.iterdir())


@pytest.mark.parametrize("workers", [1, 2])
def test_skip_mode_counts_drops_and_keeps_every_good_record(workers, tok, tmp_path):
    names = ["malformed", "missing", "empty", "long_prompt", "truncated", "not_object"]
    path, where = file_with(tmp_path, names)
    s = settings_for(tmp_path, "data.on_bad_record=skip", max_seq_len=64)
    report, ds = run_preprocess(path, tmp_path / "o", tok, s, workers=workers)
    assert report.records_read == len(GOOD) + len(names)
    assert report.dropped == {"malformed_json": 1, "missing_field": 1, "empty_response": 1,
                              "prompt_too_long": 1, "not_an_object": 1}
    assert report.truncated == 1 and report.records_written == len(GOOD) + 1
    assert report.drop_examples["malformed_json"][0].startswith(f"{path}:{where['malformed']}: ")
    text = report.format()
    assert "malformed JSON" in text and "response truncated" in text and f"{path}:{where['missing']}" in text
    # the good records are all there, in order, exactly as a clean file gives them
    _, clean = run_preprocess(write_jsonl(tmp_path / "clean.jsonl", GOOD), tmp_path / "clean", tok, s)
    got = sequences(ds)
    truncated_pos = 5  # good records 0..4 come before the long response (after good record 4)
    assert [g for i, g in enumerate(got) if i != truncated_pos] == sequences(clean)
    ids, plen = got[truncated_pos]
    full = [tok.bos_id] + tok.encode(LONG_RESPONSE["prompt"] + LONG_RESPONSE["response"])
    assert len(ids) == 64 and ids == full[:64] and plen == 1 + len(tok.encode(LONG_RESPONSE["prompt"]))
    assert ds.meta["report"]["dropped"] == report.dropped


def test_workers_give_identical_output_and_first_error(tok, tmp_path):
    s = settings_for(tmp_path)
    run_preprocess(f"{TINY}/sft.jsonl", tmp_path / "w1", tok, s, workers=1)
    run_preprocess(f"{TINY}/sft.jsonl", tmp_path / "w2", tok, s, workers=2)
    for suffix in (".bin", ".idx"):
        assert open(f"{tmp_path}/w1{suffix}", "rb").read() == open(f"{tmp_path}/w2{suffix}", "rb").read()
    lines = open(f"{TINY}/sft.jsonl").read().splitlines()
    lines[1499] = "{oops"
    lines[1799] = json.dumps({"prompt": "x"})
    bad = tmp_path / "bad.jsonl"
    bad.write_text("\n".join(lines) + "\n")
    with pytest.raises(BadRecordError, match=f"{bad}:1500: malformed JSON"):
        run_preprocess(bad, tmp_path / "b", tok, s, workers=2)


def test_malformed_json_array_names_the_line(tok, tmp_path):
    path = tmp_path / "d.json"
    path.write_text('[\n {"prompt": "a", "response": " b"},\n {"prompt": "a" "response": " b"}\n]\n')
    with pytest.raises(BadRecordError, match=r"d.json:3: malformed JSON"):
        run_preprocess(path, tmp_path / "o", tok, settings_for(tmp_path))


def test_nothing_usable_is_an_error(tok, tmp_path):
    path = write_jsonl(tmp_path / "x.jsonl", [{"prompt": "a", "response": ""}] * 3)
    with pytest.raises(ValueError, match="no usable records"):
        run_preprocess(path, tmp_path / "o", tok, settings_for(tmp_path, "data.on_bad_record=skip"))
