"""Tokenizer kinds (HF directory, SentencePiece), chat templates, BOS/EOS rules, boundary errors."""
from __future__ import annotations

import pickle

import pytest
import sentencepiece as spm
from transformers import AutoTokenizer

from megatron.config import ConfigError
from megatron.data import BadRecordError, load_tokenizer
from megatron.data.chat_template import resolve_chat_template, render_template, template_names
from tests.unit.test_data_common import TOKENIZER, run_preprocess, sequences, settings_for, write_jsonl

PAIRS = [("count up from 7:", " 7 8 9"), ("reverse: a b c", " c b a"), ("count down from 20:", " 20 19 18 17")]
CHATML = ["<|im_start|>", "<|im_end|>"]


@pytest.fixture(scope="module")
def sp_model(tmp_path_factory):
    """A tiny SentencePiece BPE model trained here, with the chatml markers as user-defined symbols."""
    d = tmp_path_factory.mktemp("spm")
    lines = [f"count up from {i}: " + " ".join(str(j) for j in range(i, i + 4)) for i in range(60)]
    lines += [f"count down from {i}: " + " ".join(str(i - j) for j in range(4)) for i in range(10, 60)]
    lines += ["reverse: a b c d e f g h i j k l m n o p q r s t u v w x y z", "user assistant system"] * 20
    (d / "text.txt").write_text("\n".join(lines))
    spm.SentencePieceTrainer.train(input=str(d / "text.txt"), model_prefix=str(d / "sp"), vocab_size=120,
                                   model_type="bpe", pad_id=3, user_defined_symbols=CHATML, minloglevel=2)
    return str(d / "sp.model")


@pytest.fixture(scope="module")
def hf():
    return AutoTokenizer.from_pretrained(TOKENIZER, local_files_only=True)


def pairs_file(tmp_path, name="d.jsonl"):
    return write_jsonl(tmp_path / name, [{"prompt": p, "response": r} for p, r in PAIRS])


def test_sentencepiece_plain_text_matches_processor(sp_model, tmp_path):
    tok = load_tokenizer(sp_model)
    sp = spm.SentencePieceProcessor(model_file=sp_model)
    assert (tok.vocab_size, tok.bos_id, tok.eos_id, tok.pad_id, tok.add_bos) == (120, 1, 2, 3, True)
    _, ds = run_preprocess(pairs_file(tmp_path), tmp_path / "o", tok, settings_for(tmp_path))
    for (p, r), (ids, plen) in zip(PAIRS, sequences(ds)):
        assert ids == [1] + sp.encode(p + r) + [2]
        assert plen == 1 + len(sp.encode(p))
    assert pickle.loads(pickle.dumps(tok)).encode("count up") == tok.encode("count up")  # workers reload by path


def test_sentencepiece_chatml_and_llama3_templates(sp_model, tmp_path):
    tok = load_tokenizer(sp_model)
    sp = spm.SentencePieceProcessor(model_file=sp_model)
    _, ds = run_preprocess(pairs_file(tmp_path), tmp_path / "c", tok,
                           settings_for(tmp_path, "data.chat_template=chatml"))
    for (p, r), (ids, plen) in zip(PAIRS, sequences(ds)):
        prompt_text = f"<|im_start|>user\n{p}<|im_end|>\n<|im_start|>assistant\n"
        full_text = prompt_text + f"{r}<|im_end|>\n"
        assert ids == [1] + sp.encode(full_text) + [2]  # BOS added (template has none), EOS appended
        assert plen == 1 + len(sp.encode(prompt_text))
        assert sp.piece_to_id("<|im_start|>") in ids
    _, ds = run_preprocess(pairs_file(tmp_path, "l.jsonl"), tmp_path / "l", tok,
                           settings_for(tmp_path, "data.chat_template=llama3", max_seq_len=512))
    for (p, r), (ids, plen) in zip(PAIRS, sequences(ds)):
        rest = (f"<|start_header_id|>user<|end_header_id|>\n\n{p}<|eot_id|>"
                f"<|start_header_id|>assistant<|end_header_id|>\n\n{r.strip()}<|eot_id|>")
        assert ids == [1] + sp.encode(rest) + [2]  # the template's "<s>" is the BOS: not doubled
        assert ids.count(1) == 1


def test_sentencepiece_chat_records_need_a_template(sp_model, tmp_path):
    tok = load_tokenizer(sp_model)
    path = write_jsonl(tmp_path / "m.jsonl", [{"messages": [{"role": "user", "content": "hi"},
                                                            {"role": "assistant", "content": "a"}]}])
    with pytest.raises(ConfigError, match="data.chat_template"):
        run_preprocess(path, tmp_path / "m", tok, settings_for(tmp_path))


@pytest.mark.parametrize("name", ["chatml", "llama3", "plain", "tiny"])
def test_renderer_matches_transformers(name, hf):
    src = hf.chat_template if name == "tiny" else resolve_chat_template(name, None)
    convs = [[{"role": "user", "content": "count up from 1:"}],
             [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "reverse: a b"},
              {"role": "assistant", "content": " b a "}]]
    for msgs in convs:
        for gen in (False, True):
            ours = render_template(src, msgs, gen, bos_token=hf.bos_token, eos_token=hf.eos_token)
            theirs = hf.apply_chat_template(msgs, chat_template=src, tokenize=False, add_generation_prompt=gen)
            assert ours == theirs
    assert set(template_names()) >= {"chatml", "llama3", "plain"}


def test_hf_named_template_on_strings_bos_and_eos(hf, tmp_path):
    tok = load_tokenizer(TOKENIZER)
    src = resolve_chat_template("chatml", None)
    _, ds = run_preprocess(pairs_file(tmp_path), tmp_path / "o", tok, settings_for(tmp_path, "data.chat_template=chatml"))
    for (p, r), (ids, plen) in zip(PAIRS, sequences(ds)):
        msgs = [{"role": "user", "content": p}, {"role": "assistant", "content": r}]
        full = list(hf.apply_chat_template(msgs, chat_template=src, tokenize=True)["input_ids"])
        prompt = list(hf.apply_chat_template(msgs[:1], chat_template=src, tokenize=True,
                                             add_generation_prompt=True)["input_ids"])
        assert full[0] != hf.bos_token_id and full[-1] != hf.eos_token_id  # chatml has neither
        assert ids == [hf.bos_token_id] + full + [hf.eos_token_id]
        assert plen == 1 + len(prompt)
    # 'tokenizer' = its own template (writes BOS, ends turns with EOS): nothing added, nothing doubled
    _, ds = run_preprocess(pairs_file(tmp_path, "t.jsonl"), tmp_path / "t", tok,
                           settings_for(tmp_path, "data.chat_template=tokenizer"))
    for (p, r), (ids, plen) in zip(PAIRS, sequences(ds)):
        msgs = [{"role": "user", "content": p}, {"role": "assistant", "content": r}]
        assert ids == list(hf.apply_chat_template(msgs, tokenize=True)["input_ids"])
        assert ids.count(hf.bos_token_id) == 1 and ids.count(hf.eos_token_id) == 2 and ids[-1] == hf.eos_token_id


def test_boundary_not_a_token_prefix_falls_back_or_is_an_error(tmp_path):
    tok = load_tokenizer(TOKENIZER)
    # "cou" + "nt up" tokenises as one word "count": the prompt tokens are not a prefix
    path = write_jsonl(tmp_path / "b.jsonl", [{"prompt": "cou", "response": "nt up from 1"}])
    with pytest.raises(BadRecordError, match=r"b.jsonl:1: prompt tokens not a prefix.*merges across.*"
                                             r"data.prompt_boundary=fallback"):
        run_preprocess(path, tmp_path / "b", tok, settings_for(tmp_path, "data.prompt_boundary=error"))
    # default (TRL's behaviour): prompt and response tokenised separately, concatenated, counted
    report, ds = run_preprocess(path, tmp_path / "f", tok, settings_for(tmp_path))
    assert sequences(ds) == [([tok.bos_id] + tok.encode("cou") + tok.encode("nt up from 1") + [tok.eos_id],
                              1 + len(tok.encode("cou")))]
    assert report.boundary_fallbacks == 1 and "b.jsonl:1" in report.boundary_fallback_examples[0]
    assert "tokenised separately 1" in report.format()
    bad = tmp_path / "bad.jinja"  # generation prompt differs from how the assistant turn is rendered
    bad.write_text("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}{% endfor %}"
                   "{% if add_generation_prompt %}<|im_start|>bot\n{% endif %}")
    for boundary in ("fallback", "error"):  # a template mismatch is not a tokenisation matter: always an error
        with pytest.raises(BadRecordError, match="prompt text not a prefix.*add_generation_prompt"):
            run_preprocess(pairs_file(tmp_path), tmp_path / "j", tok,
                           settings_for(tmp_path, f"data.chat_template={bad}", f"data.prompt_boundary={boundary}"))


def test_load_tokenizer_errors_name_the_key(tmp_path, sp_model):
    with pytest.raises(ConfigError, match="data.tokenizer"):
        load_tokenizer(None)
    with pytest.raises(ConfigError, match="data.tokenizer.*does not exist"):
        load_tokenizer(str(tmp_path / "nope"))
    with pytest.raises(ConfigError, match="data.chat_template"):
        resolve_chat_template("no-such-template", None)
    a, b = load_tokenizer(TOKENIZER), load_tokenizer(TOKENIZER)
    assert a.fingerprint == b.fingerprint != load_tokenizer(sp_model).fingerprint
