"""The frontier loop's parts without launching anything: config fragments as --set pairs, the phase plan and its
config errors, the state file's transitions, the data phases (prompts tagged, generations pooled and split) and
a round's report line (reward statistics, paired win rate, counts after each filter rule) on crafted files."""
from __future__ import annotations

import importlib.util
import json
import os

import pytest

from megatron.config import ConfigError
from megatron.engines.run_config import load_run_config
from megatron.frontier import loop_data
from megatron.frontier.loop import FrontierLoop, flatten_fragment
from megatron.frontier.loop_report import round_row, win_rate
from megatron.frontier.loop_state import LoopState
from megatron.frontier.report import RULES
from megatron.testing.configs import DATA, REPO

LOOP = os.path.join(REPO, "configs", "tiny", "loop.yml")


def _write(path, records):
    with open(path, "w", encoding="utf-8") as fh:
        fh.writelines(json.dumps(r) + "\n" for r in records)
    return str(path)


def _read(path):
    with open(path, encoding="utf-8") as fh:
        return [json.loads(line) for line in fh]


def test_fragments_become_set_pairs_that_load():
    frag = {"train": {"iters": 7}, "objective": {"name": "rpo", "loss_type": "fwd_kl", "eta": 0.5},
            "deepspeed": {"zero_optimization": {"stage": 1}}, "data": {"train_path": "a b.jsonl"}}
    sets = flatten_fragment(frag, "loop.preference")
    assert sets == ["train.iters=7", "objective.name=\"rpo\"", "objective.loss_type=\"fwd_kl\"", "objective.eta=0.5",
                    'deepspeed={"zero_optimization": {"stage": 1}}', 'data.train_path="a b.jsonl"']
    cfg = load_run_config([os.path.join(REPO, "configs", "tiny", "dpo.yml")], sets, world_size=1)
    assert (cfg.train.iters, cfg.objective.loss_type, cfg.objective.eta) == (7, "fwd_kl", 0.5)
    assert cfg.deepspeed["zero_optimization"] == {"stage": 1} and cfg.data.train_path == "a b.jsonl"
    with pytest.raises(ConfigError, match=r"loop.sft.train' must be a mapping"):
        flatten_fragment({"train": 5}, "loop.sft")


def _loop(tmp_path, *sets):
    cfg = load_run_config([LOOP], [f"logging.dir={tmp_path / 'loop'}", *sets], world_size=1)
    return FrontierLoop(cfg, [LOOP], list(sets))


def test_plan_phases_and_config_errors(tmp_path):
    loop = _loop(tmp_path, "loop.rounds=1", "loop.committee=[]")
    names = [p.name for p in loop.plan()]
    per_round = ["generate", "merge", "score", "split", "filter", "select", "report"]
    assert names == (["prompts", "start/policy", "start/reward_model"] + [f"round_0/{n}" for n in per_round]
                     + ["round_0/sft", "round_0/preference"] + [f"round_1/{n}" for n in per_round])
    # fragment (loop.yml's loop.preference), then the command line, then the keys the loop owns
    assert loop.train_sets("preference", "/d/pairs.jsonl", "/ck/sft", "/out") == [
        'objective.name="rpo"', 'objective.loss_type="bwd_kl"', "objective.beta=0.1", "objective.eta=1.0",
        "train.iters=30", "loop.rounds=1", "loop.committee=[]", "objective.name=rpo",
        "data.train_path=/d/pairs.jsonl", "data.valid_path=null", "train.eval_interval=0", "checkpoint.load=/ck/sft",
        "checkpoint.save=/out/checkpoints", "logging.dir=/out"]
    loop.cfg.loop.preference = {"train": {"iters": 3}}  # no objective named: rpo with bwd_kl first
    assert loop.train_sets("preference", "p", "/c", "/o")[:3] == ["objective.name=rpo", "objective.loss_type=bwd_kl",
                                                                  "train.iters=3"]
    # a given policy and reward model: no start phases; one committee member generates every round
    ck = tmp_path / "ck"
    ck.mkdir()
    loop = _loop(tmp_path, f"loop.policy={ck}", f"score.model={ck}", f"loop.committee=[{ck}]", "loop.rounds=0",
                 "loop.train=[preference]")
    assert [p.name for p in loop.plan()][:4] == ["prompts", "round_0/generate", "round_0/generate_c0", "round_0/merge"]
    if importlib.util.find_spec("lm_eval") is not None:
        loop = _loop(tmp_path, f"loop.policy={ck}", f"score.model={ck}", "loop.rounds=0", "loop.evaluate=true")
        assert [p.name for p in loop.plan()][-2:] == ["round_0/evaluate", "round_0/report"]
    cases = [(["loop.prompts=null"], "loop.prompts' is not set"),
             (["loop.prompts=/no/such.jsonl"], "does not exist"),
             (["loop.train=[sft, dpo]"], "loop.train"),
             (["loop.start_policy={}"], "no starting policy"),
             (["loop.start_reward={}"], "no scorer"),
             (["loop.pairs=best-of-n"], "loop.pairs"),
             (["loop.filter={min_score: 1, colour: red}"], "loop.filter.colour"),
             (["loop.filter={top_fraction: 2.0}"], "loop.filter"),
             (["loop.sft={train: {itres: 3}}"], r"phase round_0/sft \(loop.sft fragment\).*itres"),
             (["loop.committee=[/no/ck]"], r"loop.committee\[0\]")]
    for sets, message in cases:
        with pytest.raises(ConfigError, match=message):
            _loop(tmp_path, *sets)


def test_state_transitions_survive_a_reload(tmp_path):
    path = str(tmp_path / "loop_state.json")
    st = LoopState(path)
    st.start("a")
    st.finish("a", {"checkpoint": "/x"})
    st.start("b")  # killed here: stays running
    again = LoopState(path)
    assert again.done("a") and again.info("a") == {"checkpoint": "/x"} and not again.done("b")
    assert again.phases["b"]["status"] == "running" and again.phases["a"]["attempts"] == 1
    again.start("b")
    again.fail("b", "exit code 1")
    again.start("b")
    again.finish("b")
    third = LoopState(path)
    assert third.done("b") and third.phases["b"]["attempts"] == 3 and "_t0" not in third.phases["b"]
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(ValueError, match="not valid JSON"):
        LoopState(str(tmp_path / "bad.json"))


def test_data_phases_and_report_row(tmp_path):
    prompts = _write(tmp_path / "p.jsonl", [{"prompt": "a", "answer": "1"}, {"prompt": "b"}])
    held = _write(tmp_path / "h.jsonl", [{"prompt": "h"}])
    assert loop_data.write_prompts(prompts, held, str(tmp_path / "all.jsonl")) == {"train": 2, "heldout": 1}
    assert [r["loop_split"] for r in _read(tmp_path / "all.jsonl")] == ["train", "train", "heldout"]

    def gen(texts_scores):
        return [{"prompt": p, "loop_split": s, "completions": [{"text": t, "finish_reason": "stop", "score": x}
                                                               for t, x in cs]}
                for (p, s), cs in zip([("a", "train"), ("b", "train"), ("h", "heldout")], texts_scores)]
    pol = _write(tmp_path / "g.jsonl", gen([[("x", 1.0), ("y", 3.0)], [("z", None), ("", 2.0)], [("u", 1.0), ("v", 5.0)]]))
    com = _write(tmp_path / "c.jsonl", gen([[("w", 9.0)], [], [("never", 0.0)]]))
    loop_data.merge_generations([("policy", pol), ("committee_0", com)], str(tmp_path / "m.jsonl"))
    merged = _read(tmp_path / "m.jsonl")
    assert [c["generator"] for c in merged[0]["completions"]] == ["policy", "policy", "committee_0"]
    assert len(merged[2]["completions"]) == 2  # held-out prompts: the policy's samples only
    loop_data.split_scored(str(tmp_path / "m.jsonl"), str(tmp_path / "s.jsonl"), str(tmp_path / "held.jsonl"))
    samples = _read(tmp_path / "s.jsonl")
    assert len(samples) == 2 and "loop_split" not in samples[0]
    settings = loop_data.filter_settings({"min_chars": 1, "near_dup_threshold": 0.9})
    rep = loop_data.filter_round(str(tmp_path / "s.jsonl"), str(tmp_path / "f.jsonl"), settings)
    assert rep["dropped"]["counts"]["too_short"] == 1 and rep["units_kept"] == 4
    sel = loop_data.select_round(str(tmp_path / "f.jsonl"), str(tmp_path / "sft.jsonl"), str(tmp_path / "pairs.jsonl"),
                                 "best-vs-worst", 0.0)
    assert sel == {"sft": 1, "pairs": 1}  # prompt b has only the unscored "z" left: no SFT record, no pair
    assert _read(tmp_path / "sft.jsonl")[0]["response"] == "w"  # the committee's best is pooled in

    prev = _write(tmp_path / "prev.jsonl", [{"prompt": "h", "completions": [{"text": "p", "score": 1.0},
                                                                            {"text": "q", "score": 6.0}]}])
    cur = _write(tmp_path / "cur.jsonl", [{"prompt": "h", "completions": [{"text": "p", "score": 1.0},
                                                                           {"text": "q", "score": 7.0}]}])
    assert win_rate(cur, prev) == pytest.approx((0.5 + 1.0) / 2)
    row = round_row(1, "/ck", str(tmp_path / "s.jsonl"), cur, prev, rep, sel)
    assert row["reward/mean"] == pytest.approx((1 + 3 + 2) / 3) and row["reward/median"] == 2.0
    assert row["reward/p90"] == pytest.approx(2.8) and row["count/unscored"] == 1 and row["win_rate"] == 0.75
    assert row["count/samples"] == 5 and row["count/after_too_short"] == 4 and row["count/kept"] == 4
    assert [k[len("count/after_"):] for k in row if k.startswith("count/after_")] == RULES
    assert row["heldout/mean"] == 4.0 and (row["count/sft"], row["count/pairs"]) == (1, 1)
    row = round_row(0, "/ck", str(tmp_path / "s.jsonl"), None, None, rep, sel, {"tiny_mc": {"acc": 0.5, "alias": "x"}})
    assert row["win_rate"] is None and "heldout/mean" not in row and row["lm_eval/tiny_mc/acc"] == 0.5
    assert "lm_eval/tiny_mc/alias" not in row
    assert os.path.isfile(os.path.join(DATA, "prompts.jsonl"))
