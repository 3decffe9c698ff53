"""tools/score.py and megatron/frontier/{judge,scoring,score_model}.py: judge grades parsed by the template's regex
with every unparseable answer counted (crafted answers and answers of a real judge model through the generation
engine), the units of the completions and pair layouts, and reward-model scores equal to a plain one-sequence
forward of the same model (the tokens a training record would give: BOS, chat template, EOS; an empty response
is prompt + EOS)."""
from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch

from megatron.checkpoint import weights_io as wio
from megatron.frontier.judge import NO_MATCH, NOT_A_NUMBER, OUT_OF_RANGE, JudgeTemplate, load_judge_template
from megatron.frontier.scoring import ScoreReport, Unit, UnitScore, apply_scores, read_units, score_stats
from megatron.model import GPTModel
from megatron.mpu import ParallelState
from megatron.testing.configs import DATA, REPO, tiny_test_config

TOKENIZER = os.path.join(DATA, "tokenizer")


def _write(path, records):
    with open(path, "w", encoding="utf-8") as fh:
        for r in records:
            fh.write((r if isinstance(r, str) else json.dumps(r)) + "\n")
    return str(path)


def _read(path):
    with open(path, encoding="utf-8") as fh:
        return [json.loads(line) for line in fh]


def _template(tmp_path, **kw):
    data = {"template": "Rate: {prompt} => {response}\nGrade:", "grade_regex": r"Grade:\s*(-?\d+(?:\.\d+)?)",
            "min_grade": 1, "max_grade": 10, "chat": False}
    data.update(kw)
    path = tmp_path / "judge.yml"
    import yaml
    path.write_text(yaml.safe_dump(data))
    return str(path)


def test_grades_parsed_and_unparseable_counted(tmp_path):
    tpl = load_judge_template(_template(tmp_path))
    answers = {"Grade: 7": 7.0, "Grade:10 excellent": 10.0, "ok. Grade: 3.5": 3.5, "grade: 7": NO_MATCH,
               "Grade: 11": OUT_OF_RANGE, "Grade: -2": OUT_OF_RANGE, "I refuse": NO_MATCH, "": NO_MATCH,
               "Grade: 0": OUT_OF_RANGE, "Grade: 4 then Grade: 9": 4.0}
    for answer, want in answers.items():
        grade, reason = tpl.parse(answer)
        assert (grade if reason is None else reason) == want, answer
    # a group that matches something that is not a number
    assert JudgeTemplate("{response}", r"Grade: (\w+)").parse("Grade: seven") == (None, NOT_A_NUMBER)
    assert tpl.render("2+2?", "4") == "Rate: 2+2? => 4\nGrade:"
    assert JudgeTemplate("{x} {response}", "(1)").render("p", "r") == "{x} r"  # other braces stay
    # the report counts them (parsed / unparseable by reason), never scoring an unparseable answer
    units = [Unit(0, f"completions[{i}]", f"f.jsonl:1 completions[{i}]") for i in range(len(answers))]
    scores = [UnitScore(*tpl.parse(a), judge_answer=a) for a in answers]
    report = ScoreReport()
    report.count(units, scores)
    assert (report.judge_answers, report.judge_parsed, report.judge_unparseable) == (10, 4, 6)
    assert report.unscored.counts == {NO_MATCH: 3, OUT_OF_RANGE: 3}
    assert report.scored == 4 and report.stats["mean"] == pytest.approx((7 + 10 + 3.5 + 4) / 4)
    assert 'judge answered "Grade: 11"' in "\n".join(report.unscored.examples[OUT_OF_RANGE])
    assert "unparseable (score null)" in report.format()


def test_template_file_errors(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        load_judge_template(str(tmp_path / "none.yml"))
    with pytest.raises(ValueError, match="never mentions {response}"):
        load_judge_template(_template(tmp_path, template="Grade {prompt}"))
    with pytest.raises(ValueError, match="does not compile"):
        load_judge_template(_template(tmp_path, grade_regex="(unclosed"))
    with pytest.raises(ValueError, match="unknown key 'grade_regexp'"):
        load_judge_template(_template(tmp_path, grade_regexp="x"))
    shipped = load_judge_template(None)
    assert shipped.parse("Grade: 8") == (8.0, None) and shipped.parse("8/10")[1] == NO_MATCH


def test_units_layouts_bad_lines_and_writing(tmp_path):
    chat = [{"role": "user", "content": "count up from 3:"}]
    path = _write(tmp_path / "in.jsonl", [
        {"prompt": "count up from 3:", "id": 1, "completions": [{"text": " 3 4 5"}, {"text": " 3 5"}]},
        {"messages": chat, "completions": [{"text": "3 4 5"}]},
        {"prompt_ids": [1, 40, 41], "completions": [{"text": "x", "token_ids": [50, 2]}, {"text": "y"}]},
        {"prompt": "reverse: a b", "chosen": " b a", "rejected": " a b"},
        {"chosen": chat + [{"role": "assistant", "content": "3 4"}],
         "rejected": chat + [{"role": "assistant", "content": "4 3"}]},
        "{not json", {"prompt": "no responses"}, {"prompt": "p", "completions": [{"text": 3}]}])
    report = ScoreReport()
    records, units = read_units(path, report)
    assert report.records_read == 8 and len(records) == 5
    assert report.bad.counts == {"malformed_json": 1, "missing_field": 1, "bad_value": 1}
    assert [u.slot for u in units] == ["completions[0]", "completions[1]", "completions[0]", "completions[0]",
                                       "completions[1]", "chosen", "rejected", "chosen", "rejected"]
    assert units[0].normal.prompt == "count up from 3:" and units[0].normal.responses == [" 3 4 5"]
    assert units[2].normal.prompt == chat and units[2].normal.responses == [[{"role": "assistant",
                                                                              "content": "3 4 5"}]]
    assert units[3].normal.responses == [[50, 2]] and units[4].problem.reason == "missing_field"  # ids need ids
    assert units[7].normal.prompt == chat and units[8].normal.responses[0][0]["content"] == "4 3"
    scores = [UnitScore(float(i)) for i in range(len(units))]
    scores[4] = UnitScore(None, "missing_field")
    out = apply_scores(records, units, scores)
    assert [c["score"] for c in out[0]["completions"]] == [0.0, 1.0] and out[0]["id"] == 1
    assert out[2]["completions"][1]["score"] is None
    assert (out[3]["score_chosen"], out[3]["score_rejected"]) == (5.0, 6.0)
    assert "score" not in records[0]["completions"][0]  # the input records are not modified


def test_score_stats_against_numpy_definition():
    values = [3.0, -1.0, 2.5, 10.0, 0.0, None, 7.0, 2.0]
    st = score_stats(values)
    v = sorted(x for x in values if x is not None)
    pos = 0.9 * (len(v) - 1)  # the linear-interpolation percentile, by hand
    p90 = v[int(pos)] + (pos - int(pos)) * (v[int(pos) + 1] - v[int(pos)])
    assert st == {"count": 7, "mean": pytest.approx(sum(v) / 7), "median": 2.5, "p90": pytest.approx(p90),
                  "min": -1.0, "max": 10.0}
    assert score_stats([None])["mean"] is None


# ------------------------------------------------------------------------------------------ with real models
@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A random reward model and a random LM, saved as checkpoints of ours (the value head drawn wide so the
    scores differ clearly between sequences)."""
    root = tmp_path_factory.mktemp("score_models")
    out = {}
    for name, objective in (("rm", "rm"), ("lm", "sft")):
        cfg = tiny_test_config(str(root / "work"), objective=objective, overrides=["model.max_seq_len=96"])
        torch.manual_seed(0)
        model = GPTModel(cfg, ParallelState.single(), layer_seed=cfg.train.seed)
        if name == "rm":
            with torch.no_grad():
                model.value_head.weight.normal_(0.0, 1.0)
        wio.write_checkpoint(str(root / name), "step1", cfg, {(0, 0): model.state_dict()}, {"step": 1})
        out[name] = (str(root / name), cfg, model.eval())
    return root, out


def _score(root, name, sets):
    from tools.score import main
    cfg = root / f"{name}.yml"
    cfg.write_text(f"logging:\n  dir: {root / 'logs'}\n")
    assert main([str(cfg), "--set", *sets]) == 0


def test_reward_model_scores_equal_plain_forward(models, capsys):
    from transformers import AutoTokenizer
    root, m = models
    path, cfg, model = m["rm"]
    chat = [{"role": "user", "content": "count down from 9:"}]
    records = [{"prompt": "count up from 3:", "completions": [{"text": " 3 4 5"}, {"text": " 3 5 4 9 9"},
                                                              {"text": ""}]},
               {"messages": chat, "completions": [{"text": "9 8 7"}]},
               {"prompt": "count up from 3:", "chosen": " 3 4 5", "rejected": " 7"}]
    inp = _write(root / "rm_in.jsonl", records)
    _score(root, "rm", [f"score.input={inp}", f"score.output={root / 'rm_out.jsonl'}", f"score.model={path}",
                        "score.batch_size=2"])
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert (summary["responses"], summary["scored"], summary["unscored"]) == (6, 6, 0)
    out = _read(root / "rm_out.jsonl")

    tok = AutoTokenizer.from_pretrained(TOKENIZER)

    def plain(ids):  # one unpacked sequence through the model: the value at its last token
        x = torch.tensor([ids])
        with torch.no_grad():
            values = model(x, torch.arange(len(ids))[None], torch.ones_like(x))
        return float(values[0, -1])

    def text_ids(prompt, response):
        return tok(prompt + response)["input_ids"] + [tok.eos_token_id]  # BOS from the tokenizer, EOS appended

    chat_ids = tok.apply_chat_template(chat + [{"role": "assistant", "content": "9 8 7"}], tokenize=False)
    chat_ids = tok(chat_ids, add_special_tokens=False)["input_ids"]  # the template writes BOS and ends with EOS
    want = [plain(text_ids("count up from 3:", " 3 4 5")), plain(text_ids("count up from 3:", " 3 5 4 9 9")),
            plain(text_ids("count up from 3:", "")),  # an empty response: prompt + EOS, as the online loop scores it
            plain(chat_ids), plain(text_ids("count up from 3:", " 7"))]
    got = [c["score"] for c in out[0]["completions"]] + [out[1]["completions"][0]["score"], out[2]["score_rejected"]]
    assert got == pytest.approx(want, abs=1e-4)
    assert out[2]["score_chosen"] == pytest.approx(got[0], abs=1e-5)  # the same text scores the same as a pair
    assert len({round(x, 3) for x in got}) == 5  # the scores really depend on the text


def _judge_run(models, capsys, tmp_path):
    """Score 4 prompts x 5 completions with the random LM as judge; returns (root, --set pairs, output records)."""
    root, m = models
    path, _, _ = m["lm"]
    tpl = _template(tmp_path, template="Rate: {prompt} => {response}\nGrade:", grade_regex=r"(\d+)",
                    min_grade=0, max_grade=40)
    prompts = ["count up from 3:", "count down from 9:", "reverse: a b c", "count up from 70:"]
    records = [{"prompt": p, "completions": [{"text": f" {i} {i + 1}"} for i in range(5)]} for p in prompts]
    inp = _write(root / "judge_in.jsonl", records)
    sets = [f"score.input={inp}", f"score.output={root / 'judge_out.jsonl'}", f"score.judge_model={path}",
            f"score.judge_template={tpl}", "score.judge_temperature=1.0", "score.judge_max_new_tokens=2",
            "score.batch_size=7"]
    _score(root, "judge", sets)
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    return root, sets, summary, _read(root / "judge_out.jsonl")


def test_judge_through_the_generation_engine(models, capsys, tmp_path):
    """A random LM as judge: whatever it answers, each answer is parsed by the template's regex or counted as
    unparseable (with its reason) and scored null; the counts equal an independent re-parse of the answers."""
    root, _, summary, out = _judge_run(models, capsys, tmp_path)
    parsed, reasons = 0, {}
    for rec in out:
        for c in rec["completions"]:
            match = re.search(r"(\d+)", c["judge"])
            if match and 0 <= int(match.group(1)) <= 40:
                parsed += 1
                assert c["score"] == float(match.group(1))
            else:
                why = "no_match" if match is None else "out_of_range"
                reasons[why] = reasons.get(why, 0) + 1
                assert c["score"] is None
    report = json.loads((root / "judge_out.jsonl.report.json").read_text())
    assert (summary["judge_parsed"], summary["judge_unparseable"]) == (parsed, 20 - parsed)
    assert report["judge_answers"] == 20 and report["unscored"]["counts"] == reasons
    assert parsed > 0 and sum(reasons.values()) > 0  # this seeded random judge gives both kinds


@pytest.mark.slow
def test_judge_on_two_ranks_equals_one_process(models, tmp_path, capsys):
    """`deepy.py tools/score.py` on two data-parallel ranks: the same judge answers and scores as one process
    (a unit's sampling depends on its index only)."""
    root, sets, _, one = _judge_run(models, capsys, tmp_path)
    cfg = root / "judge2.yml"
    cfg.write_text(f"logging:\n  dir: {root / 'logs2'}\nlauncher:\n  num_gpus: 2\n")
    two_sets = [s if not s.startswith("score.output=") else f"score.output={root / 'judge2.jsonl'}" for s in sets]
    env = {k: v for k, v in os.environ.items()  # an in-process run above left its rendezvous variables
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env["PYTHONPATH"] = REPO
    proc = subprocess.run([sys.executable, "deepy.py", "tools/score.py", str(cfg), "--set", *two_sets], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    two = _read(root / "judge2.jsonl")
    assert [[(c["judge"], c["score"]) for c in r["completions"]] for r in two] == \
        [[(c["judge"], c["score"]) for c in r["completions"]] for r in one]


def test_config_errors(models, tmp_path, capsys):
    root, m = models
    inp = _write(tmp_path / "in.jsonl", [{"prompt": "p", "completions": [{"text": "x"}]}])
    cases = [([f"score.input={inp}", f"score.output={tmp_path / 'o.jsonl'}"], "set exactly one of score.model"),
             ([f"score.input={inp}", f"score.output={tmp_path / 'o.jsonl'}", f"score.model={m['lm'][0]}"],
              "no value head"),
             ([f"score.input={inp}", f"score.output={tmp_path / 'o.jsonl'}", f"score.judge_model={m['rm'][0]}"],
              "cannot generate"),
             ([f"score.input={tmp_path / 'none.jsonl'}", f"score.output={tmp_path / 'o.jsonl'}",
               f"score.model={m['rm'][0]}"], "does not exist")]
    from tools.score import main
    cfg = tmp_path / "c.yml"
    cfg.write_text(f"logging:\n  dir: {tmp_path / 'logs'}\n")
    for sets, message in cases:
        assert main([str(cfg), "--set", *sets]) == 2
        assert message in capsys.readouterr().err
