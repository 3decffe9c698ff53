"""tools/filter_data.py and megatron.frontier's rules: exact counts on a crafted file, bad lines named with
file:line, no good record lost, MinHash LSH equal to brute-force Jaccard, the shipped phrase list."""
import importlib.util
import json
import os
import random

import pytest

from megatron.data import BadRecordError
from megatron.frontier import FilterSettings, filter_files, load_phrases
from megatron.frontier.dedup import NearDuplicateIndex, jaccard, shingles
from megatron.frontier.rules import SHIPPED_PHRASES, RefusalRule, top_fraction_keep
from megatron.testing.configs import DATA, REPO


def _tool(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(REPO, "tools", f"{name}.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def c(text, score=None, finish="stop", ids=None):
    out = {"text": text, "token_ids": ids if ids is not None else list(range(len(text.split()))),
           "logprobs": [-0.5] * len(text.split()), "finish_reason": finish}
    if score is not None or score == "null":
        out["score"] = score
    return out


SEA = "the sea is wide and deep and blue under the sun"
# The crafted file, line by line; the comment says what the rules must do (settings in CRAFTED_SETTINGS).
CRAFTED = [
    {"id": "p1", "prompt": "count to three", "completions": [
        c("one two three", 2.0),                                 # kept
        c("As an AI language model, I cannot count.", 5.0),      # refusal
        c("one  two THREE", 1.0),                                # exact duplicate (case, spaces) of c0
        c("", 0.5),                                              # too short (min_chars 1)
        c("one two three four five six seven eight nine ten eleven twelve", 3.0)]},  # too long (62 > 60)
    '{"prompt": "x", "completions": [',                         # malformed JSON
    [1, 2],                                                      # not an object
    {"prompt": "no scores", "completions": [{"text": "hi"}]},    # missing field completions[0].score
    "",                                                          # blank line: not a record
    {"id": "p3", "prompt": "describe the sea", "completions": [
        c(SEA, 1.0),                                             # kept
        c(SEA + " today", 2.0),                                  # near duplicate of c0 (Jaccard 9/10)
        c("waves crash on the rocky shore at night", -1.0),      # score below 0
        c("I\u2019m sorry, but I can\u2019t help with that.", 4.0),  # refusal (curly apostrophes)
        c("salt water covers most of the planet surface", 0.5),  # outside the top half of p3's 2 left
        {"text": "the ocean is large", "score": None}]},         # unscored
    {"id": "p4", "messages": [{"role": "user", "content": "greet me"}], "completions": [
        c("hello there friend", 0.2, finish="length"),           # truncated
        c("hi", 0.1)]},                                          # kept
    {"id": "p5", "prompt": "all refused", "completions": [c("I cannot help with that.", 1.0)]},  # refusal: emptied
    {"prompt": "bad list", "completions": "not a list"},         # bad field value
]
CRAFTED_SETTINGS = dict(min_chars=1, max_chars=60, min_score=0.0, top_fraction=0.5, near_dup_threshold=0.8,
                        drop_truncated=True)
EXPECTED_DROPPED = {"truncated": 1, "refusal": 3, "too_short": 1, "too_long": 1, "unscored": 1, "score_low": 1,
                    "score_high": 0, "exact_duplicate": 1, "near_duplicate": 1, "top_fraction": 1}


def write_lines(path, items):
    with open(path, "w", encoding="utf-8") as fh:
        for item in items:
            fh.write((item if isinstance(item, str) else json.dumps(item)) + "\n")
    return str(path)


def test_crafted_file_counts_are_exact(tmp_path):
    path = write_lines(tmp_path / "gen.jsonl", CRAFTED)
    settings = FilterSettings(refusal_phrases=tuple(load_phrases()), **CRAFTED_SETTINGS)
    result = filter_files([path], settings)
    rep = result.report
    assert rep.records_read == 8  # every non-blank line
    assert rep.bad.counts == {"malformed_json": 1, "not_an_object": 1, "missing_field": 1, "bad_value": 1}
    assert rep.bad.examples["malformed_json"][0].startswith(f"{path}:2: ")
    assert rep.bad.examples["not_an_object"][0].startswith(f"{path}:3: ")
    assert rep.bad.examples["missing_field"][0] == f"{path}:4: 'completions[0].score' is absent " \
                                                   "(score the file with tools/score.py)"
    assert rep.bad.examples["bad_value"][0].startswith(f"{path}:9: field 'completions' must be a list")
    assert rep.units_read == 14
    assert rep.to_dict()["dropped"]["counts"] == EXPECTED_DROPPED
    assert rep.units_kept == 3 and rep.records_emptied == 1 and rep.records_written == 3

    # The kept records: every field unchanged, completions reduced to the kept ones in their order.
    p1, p3, p4 = CRAFTED[0], CRAFTED[5], CRAFTED[6]
    assert result.records == [dict(p1, completions=[p1["completions"][0]]),
                              dict(p3, completions=[p3["completions"][0]]),
                              dict(p4, completions=[p4["completions"][1]])]
    # Each dropped unit is located (file:line completions[i]) under its rule.
    where = {(d["where"], d["rule"]) for d in result.dropped}
    assert (f"{path}:1 completions[1]", "refusal") in where
    assert (f"{path}:1 completions[2]", "exact_duplicate") in where
    assert (f"{path}:6 completions[1]", "near_duplicate") in where
    assert (f"{path}:6 completions[3]", "refusal") in where
    assert (f"{path}:6 completions[4]", "top_fraction") in where
    assert (f"{path}:7 completions[0]", "truncated") in where
    assert (f"{path}:8 completions[0]", "refusal") in where
    assert len(result.dropped) == sum(EXPECTED_DROPPED.values())
    assert [d["detail"] for d in result.dropped if d["rule"] == "near_duplicate"] == [f"of {path}:6 completions[0]"]


def test_tool_writes_output_report_and_table(tmp_path, capsys):
    path = write_lines(tmp_path / "gen.jsonl", CRAFTED)
    out = tmp_path / "out" / "kept.jsonl"
    argv = ["--input", path, "--output", str(out), "--min-chars", "1", "--max-chars", "60", "--min-score", "0",
            "--top-fraction", "0.5", "--near-dup-threshold", "0.8", "--drop-truncated",
            "--dropped", str(tmp_path / "dropped.jsonl")]
    assert _tool("filter_data").main(argv) == 0
    printed = capsys.readouterr().out
    assert "refusal / 'as an AI' phrase" in printed and f"e.g. {path}:2:" in printed
    kept = [json.loads(line) for line in open(out)]
    assert [r["id"] for r in kept] == ["p1", "p3", "p4"]
    report = json.load(open(str(out) + ".report.json"))
    assert report["dropped"]["counts"] == EXPECTED_DROPPED
    assert report["bad"]["counts"]["malformed_json"] == 1 and report["records_written"] == 3
    assert report["settings"]["near_dup_threshold"] == 0.8
    assert len(open(tmp_path / "dropped.jsonl").readlines()) == 11
    # --on-bad-record error stops at the first bad line, naming it; exit code 1, nothing written.
    out2 = tmp_path / "strict.jsonl"
    assert _tool("filter_data").main(["--input", path, "--output", str(out2), "--on-bad-record", "error"]) == 1
    err = capsys.readouterr().err
    assert f"{path}:2: malformed JSON" in err and "--on-bad-record skip" in err
    assert not out2.exists()
    with pytest.raises(BadRecordError, match=f"{path}:2"):
        filter_files([path], FilterSettings(on_bad_record="error"))


def test_rule_order_never_drops_a_good_unit_for_a_dropped_one(tmp_path):
    # The first unit is too long; its near duplicate (and exact duplicate modulo case) after it is good: kept.
    long = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu"
    rec = {"prompt": "p", "completions": [c(long + " nu xi omicron", 1.0), c(long, 1.0), c(long.upper(), 1.0)]}
    path = write_lines(tmp_path / "a.jsonl", [rec])
    result = filter_files([path], FilterSettings(max_chars=len(long), near_dup_threshold=0.5))
    assert [d["rule"] for d in result.dropped] == ["too_long", "exact_duplicate"]
    assert result.records[0]["completions"] == [rec["completions"][1]]


def test_random_good_records_are_all_kept(tmp_path):
    rnd = random.Random(0)
    vocab = [f"w{i}" for i in range(500)]
    recs = [{"prompt": f"q{i}", "response": " ".join(rnd.sample(vocab, 12))} for i in range(300)]
    path = write_lines(tmp_path / "sft.jsonl", recs)
    settings = FilterSettings(refusal_phrases=tuple(load_phrases()), min_chars=1, max_chars=1000,
                              near_dup_threshold=0.9, dedup_scope="global")
    result = filter_files([path], settings)
    assert result.records == recs and result.report.dropped.total == 0


def test_flat_records_global_scope_phrase_file_and_tokens(tmp_path):
    recs = [{"prompt": "a", "response": "The answer is four."},
            {"prompt": "a", "response": "the answer   is FOUR."},               # exact duplicate
            {"prompt": "b", "response": "The answer is four."},                 # other prompt: kept in scope prompt
            {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Banana split!"}]},
            {"text": "plain language modelling text with many words in it"},
            {"prompt": "c"}]                                                     # no response: missing field
    path = write_lines(tmp_path / "flat.jsonl", recs)
    phrases = tmp_path / "phrases.txt"
    phrases.write_text("# my list\nbanana\n")
    result = filter_files([path], FilterSettings(refusal_phrases=tuple(load_phrases(str(phrases)))))
    assert result.records == [recs[0], recs[2], recs[4]]
    assert result.report.dropped.counts == {"exact_duplicate": 1, "refusal": 1}
    assert result.report.bad.examples["missing_field"] == [f"{path}:6: no response: expected 'completions' "
                                                           "(tools/generate.py output) or one of response, "
                                                           "completion, text, messages"]
    # Global scope compares prompt + response: the same response to another prompt stays.
    assert filter_files([path], FilterSettings(dedup_scope="global")).report.dropped.counts == {"exact_duplicate": 1}
    # Token bounds with a tokenizer (any object with encode) or the completions' token_ids.
    from megatron.data import load_tokenizer
    tok = load_tokenizer(os.path.join(DATA, "tokenizer"))
    texts = [r["response"] for r in recs[:3]] + ["Banana split!", recs[4]["text"]]
    lengths = sorted(len(tok.encode(t)) for t in texts)
    assert lengths[0] < lengths[-1]
    result = filter_files([path], FilterSettings(exact_dedup=False, max_tokens=lengths[-1] - 1), tokenizer=tok)
    assert result.report.dropped.counts == {"too_long": sum(n > lengths[-1] - 1 for n in lengths)}
    result = filter_files([path], FilterSettings(exact_dedup=False, min_tokens=lengths[0]), tokenizer=tok)
    assert result.report.dropped.total == 0
    gen = write_lines(tmp_path / "gen.jsonl", [{"prompt": "p", "completions": [c("a b c", ids=[1, 2, 3]),
                                                                              c("d", ids=[4])]}])
    result = filter_files([gen], FilterSettings(min_tokens=2))
    assert result.report.dropped.counts == {"too_short": 1}
    with pytest.raises(ValueError, match="--tokenizer"):
        filter_files([path], FilterSettings(min_tokens=2))


def test_settings_errors_name_the_option():
    for kw, option in ((dict(top_fraction=0.0), "--top-fraction"), (dict(near_dup_threshold=1.5), "--near-dup"),
                       (dict(min_chars=5, max_chars=2), "--min-chars"), (dict(dedup_scope="file"), "--dedup-scope")):
        with pytest.raises(ValueError, match=option):
            FilterSettings(**kw).check()
    with pytest.raises(ValueError, match="does not exist"):
        load_phrases("/nonexistent/phrases.txt")


def test_shipped_phrases_and_refusal_matching():
    phrases = load_phrases()
    assert os.path.isfile(SHIPPED_PHRASES) and "as an ai language model" in phrases and len(phrases) >= 20
    rule = RefusalRule(phrases)
    assert rule.match("Sure!  As an   AI Language Model I think...") == "as an ai language model"
    assert rule.match("I\u2019m sorry, but I can\u2019t do it") == "i'm sorry, but i can't"
    assert rule.match("Here are three colours: red, green, blue.") is None


def test_top_fraction_keeps_ceil_and_breaks_ties_by_position():
    assert top_fraction_keep([1.0, 3.0, 2.0, 3.0], 0.5) == [False, True, False, True]
    assert top_fraction_keep([1.0, 1.0, 1.0], 0.5) == [True, True, False]  # ceil(1.5) = 2, the first two
    assert top_fraction_keep([0.2], 0.1) == [True]
    assert top_fraction_keep([5.0, 4.0, 3.0, 2.0, 1.0], 0.6) == [True, True, True, False, False]


def test_minhash_index_matches_brute_force_jaccard():
    rnd = random.Random(1)
    vocab = [f"t{i}" for i in range(60)]
    base = [[rnd.choice(vocab) for _ in range(rnd.randint(8, 30))] for _ in range(60)]
    texts = []
    for words in base:  # each base text and one or two edited copies
        texts.append(" ".join(words))
        for _ in range(rnd.randint(1, 2)):
            edited = list(words)
            for _ in range(rnd.randint(0, 4)):
                edited[rnd.randrange(len(edited))] = rnd.choice(vocab)
            texts.append(" ".join(edited))
    rnd.shuffle(texts)
    for threshold in (0.5, 0.8):
        index, kept_lsh = NearDuplicateIndex(threshold, ngram=3), []
        for i, t in enumerate(texts):
            if index.find(t) is None:
                index.add(i, t)
                kept_lsh.append(i)
        kept = []  # the quadratic reference: keep a text unless a kept one is at Jaccard >= threshold
        for i, t in enumerate(texts):
            if all(jaccard(shingles(t, 3), shingles(texts[j], 3)) < threshold for j in kept):
                kept.append(i)
        assert kept_lsh == kept, threshold
        assert len(kept) < len(texts)  # there were near duplicates to find
