"""What tools/score.py scores and writes, without a model: units, the scores they get, the report, statistics.

Input records (one JSONL file) are of two layouts; each scored response is a UNIT:

    completions  tools/generate.py output: a prompt (`prompt` | `messages` | `prompt_ids`) plus
                 `completions: [{text, token_ids, ...}]`      -> one unit per completion, `completions[i].score`
    pairs        the pairwise layouts of megatron/data/records.py (prompt/chosen/rejected, chat, implicit
                 prompt, *_ids)                                -> units `chosen`, `rejected`; `score_chosen`,
                                                                  `score_rejected`

Every unit becomes an SFT-layout `NormalRecord` (its prompt + this one response), so a reward model sees exactly
the tokens its training data would have given it. A score is a finite float, or None (JSON null) when the scorer
could not score the unit (`reason`: an unencodable record, an unparseable judge answer, ...): null scores are
counted in the report by reason and never selected downstream (megatron/frontier/select.py).
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from megatron.data.errors import MISSING_FIELD, REASON_NAMES, RecordProblem
from megatron.data.records import CHAT, IDS, NormalRecord, normalise
from megatron.data.settings import Fields

from .judge import PARSE_FAILURES
from .report import Tally, _row
from .scored import COMPLETIONS, completions_of, read_records, record_problem

PAIR_SLOTS = ("chosen", "rejected")


@dataclass
class Unit:
    """One response to score: record `record` (index among the good records), `slot` (`completions[i]`, `chosen`
    or `rejected`), `where` (`file:line slot`) and its SFT-layout record, or the problem that prevents one."""
    record: int
    slot: str
    where: str
    normal: Optional[NormalRecord] = None
    problem: Optional[RecordProblem] = None


@dataclass
class UnitScore:
    """The outcome for one unit: a finite score, or None with the reason (and, for a judge, its raw answer)."""
    score: Optional[float]
    reason: Optional[str] = None
    judge_answer: Optional[str] = None
    truncated: bool = False


def _sft_of_completion(rec: Dict, comp: Dict) -> NormalRecord:
    """The SFT-layout record of `rec`'s prompt answered by completion `comp`."""
    if rec.get("messages") is not None:
        sft = {"messages": list(rec["messages"]) + [{"role": "assistant", "content": comp["text"]}]}
    elif rec.get("prompt") is not None:
        sft = {"prompt": rec["prompt"], "response": comp["text"]}
    else:  # token ids only: the completion's own ids (the scorer must share the generator's tokenizer)
        if comp.get("token_ids") is None:
            raise RecordProblem(MISSING_FIELD, "a prompt_ids record needs completions[i].token_ids to be scored")
        sft = {"prompt_ids": rec["prompt_ids"], "response_ids": comp["token_ids"]}
    return normalise(sft, "sft", Fields())


def _units_of(rec: Dict, index: int, where: str) -> List[Unit]:
    """The units of one record; RecordProblem when it is neither layout."""
    if COMPLETIONS in rec:
        comps = completions_of(rec, need_score=False)
        units = []
        for i, c in enumerate(comps):
            slot = f"{COMPLETIONS}[{i}]"
            try:
                units.append(Unit(index, slot, f"{where} {slot}", normal=_sft_of_completion(rec, c)))
            except RecordProblem as problem:
                units.append(Unit(index, slot, f"{where} {slot}", problem=problem))
        return units
    if any(k in rec for k in ("chosen", "rejected", "chosen_ids", "rejected_ids")):
        pair = normalise(rec, "pairwise", Fields())
        return [Unit(index, slot, f"{where} {slot}",
                     normal=NormalRecord("sft", pair.mode, pair.prompt, [pair.responses[i]], [pair.response_names[i]]))
                for i, slot in enumerate(PAIR_SLOTS)]
    raise RecordProblem(MISSING_FIELD, f"neither '{COMPLETIONS}' (tools/generate.py output) nor 'chosen'/'rejected' "
                                       "(pairs): nothing to score")


def read_units(path: str, report: "ScoreReport") -> Tuple[List[Dict], List[Unit]]:
    """(good records in file order, their units in order). Bad lines are counted in `report.bad` with
    `file:line` and left out of the output (as tools/filter_data.py does)."""
    records: List[Dict] = []
    units: List[Unit] = []
    for where, rec in read_records(path, report, "skip"):
        try:
            mine = _units_of(rec, len(records), where)
        except RecordProblem as problem:
            record_problem(where, problem, report.bad, "skip")
            continue
        records.append(rec)
        units.extend(mine)
    report.units = len(units)
    return records, units


def _flat(content: Any) -> str:
    """Text of a prompt or response that is a string or a message list (contents joined by newlines)."""
    if isinstance(content, str):
        return content
    return "\n".join(str(m.get("content", "")) for m in content)


def unit_texts(unit: Unit, decode=None) -> Tuple[str, str]:
    """(prompt text, response text) of a unit for a judge; `decode` turns token ids into text (ids records)."""
    n = unit.normal
    if n.mode == IDS:
        if decode is None:
            raise RecordProblem(MISSING_FIELD, "a token-id record needs a tokenizer to be shown to a judge")
        return decode(n.prompt), decode(n.responses[0])
    return _flat(n.prompt) if n.mode == CHAT or isinstance(n.prompt, list) else n.prompt, _flat(n.responses[0])


def apply_scores(records: List[Dict], units: Sequence[Unit], scores: Sequence[UnitScore]) -> List[Dict]:
    """Copies of `records` with each unit's score written in (`completions[i].score`, `score_chosen`,
    `score_rejected`; a judge's raw answer as `judge` / `judge_chosen` / `judge_rejected`)."""
    out = [dict(r) for r in records]
    for rec in out:
        if COMPLETIONS in rec:
            rec[COMPLETIONS] = [dict(c) for c in rec[COMPLETIONS]]
    for unit, s in zip(units, scores):
        rec = out[unit.record]
        value = s.score if s.score is not None and math.isfinite(s.score) else None
        if unit.slot in PAIR_SLOTS:
            rec[f"score_{unit.slot}"] = value
            if s.judge_answer is not None:
                rec[f"judge_{unit.slot}"] = s.judge_answer
        else:
            comp = rec[COMPLETIONS][int(unit.slot[len(COMPLETIONS) + 1:-1])]
            comp["score"] = value
            if s.judge_answer is not None:
                comp["judge"] = s.judge_answer
    return out


def score_stats(values: Sequence[float]) -> Dict[str, Optional[float]]:
    """count, mean, median, p90 (linear interpolation), min, max of the finite `values` (None when there are none)."""
    v = np.asarray([x for x in values if x is not None and math.isfinite(x)], dtype=np.float64)
    if v.size == 0:
        return {"count": 0, "mean": None, "median": None, "p90": None, "min": None, "max": None}
    return {"count": int(v.size), "mean": float(v.mean()), "median": float(np.median(v)),
            "p90": float(np.percentile(v, 90)), "min": float(v.min()), "max": float(v.max())}


UNSCORED_NAMES = {**REASON_NAMES, **PARSE_FAILURES,
                  "judge_prompt_too_long": "judge prompt too long for the judge's model.max_seq_len",
                  "non_finite": "the model's score is not finite"}


@dataclass
class ScoreReport:
    """Counters of one scoring run. A unit is one scored response (a completion, or a pair's chosen/rejected)."""
    input: str = ""
    output: str = ""
    scorer: str = ""  # "reward model <path>" or "judge <path> (template <file>)"
    records_read: int = 0
    bad: Tally = field(default_factory=Tally)
    units: int = 0
    scored: int = 0
    unscored: Tally = field(default_factory=Tally)  # reason -> count (judge parse failures included)
    judge_answers: int = 0  # judge answers generated
    judge_parsed: int = 0
    judge_unparseable: int = 0
    truncated: int = 0  # sequences cut to the reward model's max_seq_len (still scored)
    stats: Dict[str, Optional[float]] = field(default_factory=dict)
    records_written: int = 0

    def count(self, units: Sequence[Unit], scores: Sequence[UnitScore]) -> None:
        """Fill the unit counters and statistics from the outcomes."""
        for unit, s in zip(units, scores):
            if s.judge_answer is not None:
                self.judge_answers += 1
                if s.reason in PARSE_FAILURES:
                    self.judge_unparseable += 1
                else:
                    self.judge_parsed += 1
            if s.score is None:
                message = f"judge answered {json.dumps(s.judge_answer)[:120]}" if s.judge_answer is not None else ""
                self.unscored.add(s.reason or "unscored", unit.where, message)
            else:
                self.scored += 1
            self.truncated += int(s.truncated)
        self.stats = score_stats([s.score for s in scores if s.score is not None])

    def to_dict(self) -> Dict:
        """Plain JSON-serialisable dict."""
        out = asdict(self)
        out["bad"]["names"] = {k: REASON_NAMES.get(k, k) for k in self.bad.counts}
        out["unscored"]["names"] = {k: UNSCORED_NAMES.get(k, k) for k in self.unscored.counts}
        return out

    def write_json(self, path: str) -> None:
        """Write `to_dict()` to `path` (indented JSON)."""
        with open(path, "w", encoding="utf-8") as fh:
            json.dump(self.to_dict(), fh, indent=2)
            fh.write("\n")

    def format(self) -> str:
        """The printed table."""
        st = self.stats or {}
        fmt = (lambda k: "-" if st.get(k) is None else f"{st[k]:.4g}")
        lines = [f"score report ({self.scorer}): {self.input} -> {self.output}",
                 _row("records read", self.records_read),
                 _row("bad records (skipped)", self.bad.total)]
        lines += self.bad.lines(REASON_NAMES)
        lines += [_row("responses (completions or pair sides)", self.units),
                  _row("scored", self.scored),
                  _row("unscored (score null)", self.unscored.total)]
        lines += self.unscored.lines(UNSCORED_NAMES)
        if self.judge_answers:
            lines += [_row("judge answers", self.judge_answers), _row("  parsed", self.judge_parsed),
                      _row("  unparseable (score null)", self.judge_unparseable)]
        if self.truncated:
            lines.append(_row("cut to the model's max_seq_len (scored)", self.truncated))
        lines += [_row("score mean / median / p90", f"{fmt('mean')} / {fmt('median')} / {fmt('p90')}"),
                  _row("records written", self.records_written)]
        return "\n".join(lines)
