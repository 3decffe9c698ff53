"""tools/select_data.py: best-of-n, best-vs-worst and all-pairs on a crafted scored file give the expected
records, a committee's completions are pooled, bad lines are named, and the output is data the trainer reads."""
import importlib.util
import json
import os

import pytest

from megatron.data.records import detect_kind, normalise
from megatron.data.settings import Fields
from megatron.frontier import all_pairs, best_of_n, best_vs_worst, select_files
from megatron.frontier.select import Candidate
from megatron.testing.configs import REPO


def _tool(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(REPO, "tools", f"{name}.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def comp(text, score, ids=None):
    return {"text": text, "token_ids": ids if ids is not None else [len(text)], "logprobs": [-1.0],
            "finish_reason": "stop", "score": score}


CHAT = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello?"}]
SCORED = [
    # p1, text prompt; a stale `response` field and an `id` that must pass through
    {"id": "p1", "prompt": "name a colour", "response": "old", "completions": [
        comp("red", 1.0), comp("blue", 3.0), comp("green", 2.0), comp("cyan", 3.0), comp("mauve", None)]},
    '{"prompt": "broken", ',                                                   # malformed JSON
    {"id": "p2", "messages": CHAT, "completions": [comp("hi", 0.5), comp("hey", 0.5)]},
    {"id": "p3", "prompt_ids": [1, 2, 3], "completions": [comp("a", 1.0, ids=[5, 6]), comp("b", -1.0, ids=[7])]},
    {"id": "p4", "prompt": "unscored", "completions": [comp("x", None), comp("y", None)]},
    {"id": "p5", "prompt": "single", "completions": [comp("only", 0.3)]},
    {"id": "p6", "prompt": "no score key", "completions": [{"text": "z"}]},    # missing completions[0].score
]


def write_lines(path, items):
    with open(path, "w", encoding="utf-8") as fh:
        for item in items:
            fh.write((item if isinstance(item, str) else json.dumps(item)) + "\n")
    return str(path)


def test_best_of_n(tmp_path):
    path = write_lines(tmp_path / "scored.jsonl", SCORED)
    records, rep = select_files([path], "best-of-n")
    assert records == [
        {"id": "p1", "prompt": "name a colour", "response": "blue", "score": 3.0},  # first of the tied 3.0s
        {"id": "p2", "messages": CHAT + [{"role": "assistant", "content": "hi"}], "score": 0.5},
        {"id": "p3", "prompt_ids": [1, 2, 3], "response_ids": [5, 6], "score": 1.0},
        {"id": "p5", "prompt": "single", "response": "only", "score": 0.3},
    ]
    assert rep.records_read == 7 and rep.prompts == 5 and rep.completions == 12 and rep.unscored_completions == 3
    assert rep.bad.counts == {"malformed_json": 1, "missing_field": 1}
    assert rep.bad.examples["missing_field"] == [f"{path}:7: 'completions[0].score' is absent "
                                                 "(score the file with tools/score.py)"]
    assert rep.skipped.counts == {"no_scored_completion": 1}
    assert rep.skipped.examples["no_scored_completion"] == [f"{path}:5"]
    for rec in records:  # the trainer's record reader takes them as SFT records
        assert detect_kind(rec, Fields()) == "sft"
        normalise(rec, "sft", Fields())


def test_best_vs_worst(tmp_path):
    path = write_lines(tmp_path / "scored.jsonl", SCORED)
    records, rep = select_files([path], "best-vs-worst")
    assert records == [
        {"id": "p1", "prompt": "name a colour", "chosen": "blue", "rejected": "red",
         "score_chosen": 3.0, "score_rejected": 1.0},
        {"id": "p3", "prompt_ids": [1, 2, 3], "chosen_ids": [5, 6], "rejected_ids": [7],
         "score_chosen": 1.0, "score_rejected": -1.0},
    ]
    assert rep.skipped.counts == {"margin_too_small": 1, "no_scored_completion": 1, "single_completion": 1}
    for rec in records:
        assert detect_kind(rec, Fields()) == "pairwise"
        normalise(rec, "pairwise", Fields())
    # A margin of 2 or more leaves p1 out (3 - 1 is not above 2); chat prompts become prompt + assistant turns.
    records, rep = select_files([path], "best-vs-worst", min_margin=2.0)
    assert [r["id"] for r in records] == []
    assert rep.skipped.counts["margin_too_small"] == 3


def test_all_pairs_above_a_margin(tmp_path):
    path = write_lines(tmp_path / "scored.jsonl", SCORED)
    records, rep = select_files([path], "all-pairs", min_margin=0.5)
    p1 = [(r["chosen"], r["rejected"]) for r in records if r["id"] == "p1"]
    # scores red 1, blue 3, green 2, cyan 3: every ordered pair more than 0.5 apart, chosen first in file order
    assert p1 == [("blue", "red"), ("blue", "green"), ("green", "red"), ("cyan", "red"), ("cyan", "green")]
    assert [r["id"] for r in records] == ["p1"] * 5 + ["p3"]
    assert all(r["score_chosen"] - r["score_rejected"] > 0.5 for r in records)
    # blue/cyan (equal) in p1 and hi/hey in p2 are not above the margin
    assert rep.skipped.counts == {"margin_too_small": 2, "no_scored_completion": 1, "single_completion": 1}
    assert rep.records_written == 6
    # with margin 0 a chat pair appears as prompt messages + assistant completions
    chat = [r for r in select_files([path], "all-pairs")[0] if r["id"] == "p2"]
    assert chat == []  # equal scores: no strict preference
    path2 = write_lines(tmp_path / "chat.jsonl", [{"messages": CHAT, "completions": [comp("a", 1), comp("b", 2)]}])
    (rec,), _ = select_files([path2], "all-pairs")
    assert rec == {"prompt": CHAT, "chosen": [{"role": "assistant", "content": "b"}],
                   "rejected": [{"role": "assistant", "content": "a"}], "score_chosen": 2, "score_rejected": 1}
    assert normalise(rec, "pairwise", Fields()).prompt == CHAT


def test_committee_pools_completions_of_the_same_prompt(tmp_path):
    first = write_lines(tmp_path / "policy_a.jsonl", SCORED[:1])
    second = write_lines(tmp_path / "policy_b.jsonl", [
        {"id": "p1-b", "prompt": "name a colour", "completions": [comp("violet", 4.0), comp("grey", 0.0)]}])
    records, rep = select_files([first, second], "best-of-n")
    assert records == [{"id": "p1", "prompt": "name a colour", "response": "violet", "score": 4.0}]
    assert rep.prompts == 1 and rep.completions == 7
    (pair,), _ = select_files([first, second], "best-vs-worst")
    got = (pair["chosen"], pair["rejected"], pair["score_chosen"], pair["score_rejected"])
    assert got == ("violet", "grey", 4.0, 0.0)


def test_pure_functions_ties_and_identical_texts():
    cands = [Candidate("a", 1.0, None, "x"), Candidate("b", 2.0, None, "y"), Candidate("b", 0.0, None, "z")]
    assert best_of_n(cands).where == "y" and best_of_n([]) is None
    assert best_vs_worst(cands, 0.0) == ([], "same_text")
    pairs, skips = all_pairs(cands, 0.0)
    assert [(c.where, r.where) for c, r in pairs] == [("x", "z"), ("y", "x")] and skips == {"same_text": 1}
    tie = [Candidate("a", 1.0, None, "1"), Candidate("b", 1.0, None, "2")]
    assert best_of_n(tie).where == "1" and best_vs_worst(tie, 0.0) == ([], "margin_too_small")


def test_tool_cli(tmp_path, capsys):
    path = write_lines(tmp_path / "scored.jsonl", SCORED)
    out = tmp_path / "pairs.jsonl"
    assert _tool("select_data").main(["--input", path, "--output", str(out), "--mode", "best-vs-worst"]) == 0
    printed = capsys.readouterr().out
    assert "select report (best-vs-worst, min margin 0)" in printed and "records written" in printed
    assert [json.loads(line)["id"] for line in open(out)] == ["p1", "p3"]
    report = json.load(open(str(out) + ".report.json"))
    assert report["records_written"] == 2 and report["bad"]["counts"] == {"malformed_json": 1, "missing_field": 1}
    assert _tool("select_data").main(["--input", path, "--output", str(out), "--mode", "all-pairs",
                                      "--min-margin", "-1"]) == 1
    assert "--min-margin must be >= 0" in capsys.readouterr().err
    assert _tool("select_data").main(["--input", path, "--output", str(out), "--mode", "best-of-n",
                                      "--on-bad-record", "error"]) == 1
    assert f"{path}:2: malformed JSON" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        _tool("select_data").main(["--input", path, "--output", str(out), "--mode", "best"])
