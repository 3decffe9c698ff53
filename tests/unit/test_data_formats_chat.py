"""TRL formats, chat side: ChatML/Qwen templates whose turns end in EOS + newline get no second EOS,
`data.assistant_turns: all` scores every assistant turn, and a prompt whose tokens are not a prefix of the
joint tokenisation falls back to separate tokenisation (counted) or, with `data.prompt_boundary: error`,
is rejected. Each loss mask is checked by DECODING the tokens it covers; references are transformers'
`apply_chat_template` and plain tokenizer calls."""
from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from megatron.data import BadRecordError, load_tokenizer, open_dataset
from tests.unit.test_data_common import TOKENIZER, make_cfg, run_preprocess, sequences, settings_for, write_jsonl
from tests.unit.test_data_formats_common import (one_batch, qwen_like_tokenizer, scored_text, sequence_ids)

SYSTEM = {"role": "system", "content": "You are a helpful assistant."}
CONV = [SYSTEM, {"role": "user", "content": "Count up from 7:"}, {"role": "assistant", "content": "7 8 9 10"},
        {"role": "user", "content": "Reverse the words: a b c."}, {"role": "assistant", "content": "c b a"}]


@pytest.fixture(scope="module")
def qwen_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("qwen_tok")
    qwen_like_tokenizer(str(d))
    return str(d)


def _dataset(tmp_path, tok_dir, records, *overrides, kind="sft"):
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = write_jsonl(tmp_path / "d.jsonl", records)
    cfg = make_cfg(tmp_path, f"data.tokenizer={tok_dir}", f"data.train_path={path}", *overrides, kind=kind)
    tok = load_tokenizer(tok_dir)
    return tok, open_dataset(cfg, tok, "train", log=None, progress=False)


def test_chatml_turn_ending_in_eos_newline_gets_no_second_eos(qwen_dir, tmp_path):
    hf = AutoTokenizer.from_pretrained(qwen_dir, local_files_only=True)
    tok, ds = _dataset(tmp_path, qwen_dir, [{"messages": CONV}])
    assert tok.eos_token == "<|im_end|>" and tok.bos_id is None
    full = list(hf.apply_chat_template(CONV, tokenize=True)["input_ids"])
    prompt = list(hf.apply_chat_template(CONV[:-1], tokenize=True, add_generation_prompt=True)["input_ids"])
    assert hf.decode(full[-2:]) == "<|im_end|>\n"  # the template ends the turn with EOS + newline
    batch = one_batch(ds, [0])
    ids = sequence_ids(batch, 0)
    assert ids == full[:-1]  # ends at the turn's EOS: the newline after it dropped, no EOS appended
    assert ids.count(tok.eos_id) == len(CONV) and ids[-1] == tok.eos_id  # one per turn, none added
    assert ds[0].sequences[0].prompt_len == len(prompt)
    assert scored_text(tok, batch, 0) == "c b a<|im_end|>"  # last turn only (assistant_turns: last)


def test_chatml_strings_and_pairs_end_with_one_eos(qwen_dir, tmp_path):
    recs = [{"prompt": "Count up from 7:", "chosen": "7 8 9", "rejected": "7 9 8"}]
    tok, ds = _dataset(tmp_path, qwen_dir, recs, "data.chat_template=chatml", kind="pairwise")
    batch = one_batch(ds, [0])
    for seq, text in ((0, "7 8 9"), (1, "7 9 8")):
        ids = sequence_ids(batch, seq)
        assert ids.count(tok.eos_id) == 2 and ids[-1] == tok.eos_id  # the user turn's and the response's
        assert scored_text(tok, batch, seq) == text + "<|im_end|>"
        assert tok.decode(ids).endswith("<|im_start|>assistant\n" + text + "<|im_end|>")


@pytest.mark.parametrize("which", ["qwen", "tiny"])
def test_assistant_turns_all_scores_every_assistant_turn(which, qwen_dir, tmp_path):
    tok_dir = qwen_dir if which == "qwen" else TOKENIZER
    records = [{"messages": CONV}, {"messages": CONV[1:3]}]
    tok, last = _dataset(tmp_path / "last", tok_dir, records)
    tok, every = _dataset(tmp_path / "all", tok_dir, records, "data.assistant_turns=all")
    eos = tok.eos_token
    b_last, b_all = one_batch(last, [0, 1]), one_batch(every, [0, 1])
    assert sequence_ids(b_last, 0) == sequence_ids(b_all, 0)  # same tokens, only the mask differs
    assert scored_text(tok, b_last, 0) == "c b a" + eos
    assert scored_text(tok, b_all, 0) == "7 8 9 10" + eos + "c b a" + eos  # system and user turns unscored
    assert scored_text(tok, b_all, 1) == scored_text(tok, b_last, 1) == "7 8 9 10" + eos  # one turn: no change
    ids = sequence_ids(b_all, 0)
    assert ids[-1] == tok.eos_id and ids[-2] != tok.eos_id  # no double EOS at the end
    # the mask covers exactly the assistant contents + their EOS: positions follow the rendered turns
    mask = every[0].sequences[0].scored
    assert mask is not None and mask.sum() == len(tok.encode("7 8 9 10" + eos)) + len(tok.encode("c b a" + eos))
    assert last[0].sequences[0].scored is None  # the default layout needs no per-token mask


def test_assistant_turns_all_packed_matches_unpacked(tmp_path):
    records = [{"messages": CONV}, {"messages": CONV[1:3]}, {"messages": CONV}]
    tok, ds = _dataset(tmp_path, TOKENIZER, records, "data.assistant_turns=all")
    packed, unpacked = one_batch(ds, [0, 1, 2], pack=True), one_batch(ds, [0, 1, 2])
    for seq in range(3):
        assert scored_text(tok, packed, seq) == scored_text(tok, unpacked, seq)


# --------------------------------------------------------------------- prompt/response boundary on tokens
BOUNDARY = [  # (prompt, response)
    ("Question: capital of France? Answer:", " Paris."),     # leading space: a clean boundary
    ("count up from 7: ", "7 8 9"),                          # prompt ends in a space: " 7" is one token
    ("Question: capital of France? Answer: ", "Paris."),     # the same where the vocabulary has " P..."
    ("Hello wor", "ld and words"),                           # boundary inside a word
    ("Reverse the words:", "c b a"),                         # no leading space, punctuation splits
]


@pytest.mark.parametrize("which", ["qwen", "tiny"])
def test_boundary_fallback_tokenises_prompt_and_response_apart(which, qwen_dir, tmp_path):
    tok_dir = qwen_dir if which == "qwen" else TOKENIZER
    tok = load_tokenizer(tok_dir)
    hf = AutoTokenizer.from_pretrained(tok_dir, local_files_only=True)
    recs = [{"prompt": p, "response": r} for p, r in BOUNDARY]
    path = write_jsonl(tmp_path / "b.jsonl", recs)
    report, ds = run_preprocess(path, tmp_path / "b", tok, settings_for(tmp_path, f"data.tokenizer={tok_dir}"))
    bos = [tok.bos_id] if tok.add_bos else []
    merged = []  # lines whose joint tokenisation does not start with the prompt's tokens
    for line, ((p, r), (ids, plen)) in enumerate(zip(BOUNDARY, sequences(ds)), start=1):
        joint = hf(p + r, add_special_tokens=False)["input_ids"]
        prompt = hf(p, add_special_tokens=False)["input_ids"]
        clean = joint[:len(prompt)] == prompt
        if not clean:
            merged.append(f"{path}:{line}")
        # the prompt is exactly what generation will feed the model; the response follows with its own tokens
        assert ids[:plen] == bos + prompt
        expect = bos + (joint if clean else prompt + hf(r, add_special_tokens=False)["input_ids"]) + [tok.eos_id]
        assert ids == expect and ids.count(tok.eos_id) == 1
        assert tok.decode(ids[plen:]) == r + tok.eos_token
    assert f"{path}:2" in merged and f"{path}:1" not in merged  # " 7" merges in both vocabularies
    assert report.boundary_fallbacks == len(merged)
    assert [e.split(": ")[0] for e in report.boundary_fallback_examples] == merged
    assert report.records_written == len(BOUNDARY)
    # strict: the same records are errors naming the first such line and the option
    with pytest.raises(BadRecordError, match=rf"{merged[0]}: prompt tokens not a prefix.*data.prompt_boundary"):
        run_preprocess(path, tmp_path / "s", tok,
                       settings_for(tmp_path, f"data.tokenizer={tok_dir}", "data.prompt_boundary=error"))


def test_boundary_fallback_prompt_matches_generation_encoding(tmp_path):
    """The training prompt tokens equal what megatron.generation feeds the model for the same prompt."""
    prompts = pytest.importorskip("megatron.generation.prompts", reason="generation package not present")
    tok = load_tokenizer(TOKENIZER)
    recs = [{"prompt": p, "response": r} for p, r in BOUNDARY]
    _, ds = run_preprocess(write_jsonl(tmp_path / "g.jsonl", recs), tmp_path / "g", tok, settings_for(tmp_path))
    for (p, _), (ids, plen) in zip(BOUNDARY, sequences(ds)):
        assert ids[:plen] == prompts.encode_prompt({"prompt": p}, tok, None, "test")
