"""The scored-completions contract and reading it with bad lines named as preprocessing names them.

Contract (docs/ARCHITECTURE.md, "megatron/frontier/"): tools/generate.py writes one JSON object per prompt,
every input field kept plus

    completions: [{text: str, token_ids: [int], logprobs: [float], finish_reason: "stop" | "length"}, ...]

and tools/score.py adds `completions[i].score`: a finite number, or null when the scorer could not score
that completion (an unparseable judge answer); null-scored completions are counted and never selected. The
prompt is the record's `prompt` (text), `messages` (chat) or `prompt_ids` field; records with the same prompt
fields are the same prompt (several files: a committee of policies).

Records are read with `megatron.data.sources` (JSONL line by line, located as `file:line`; other formats
as `file:record N`); a bad record raises `RecordProblem` with a `megatron.data.errors` reason code.
"""
from __future__ import annotations

import json
import math
import os
import tempfile
from typing import Any, Dict, Iterable, Iterator, List, Optional, Tuple

from megatron.data.errors import BAD_VALUE, MALFORMED_JSON, MISSING_FIELD, NOT_AN_OBJECT, BadRecordError, RecordProblem
from megatron.data.sources import detect_format, iter_raw_records

from .report import Tally

PROMPT_FIELDS = ("prompt", "messages", "prompt_ids")
COMPLETIONS = "completions"


def read_records(path: str, report: Any, on_bad_record: str = "skip",
                 option: str = "--on-bad-record") -> Iterator[Tuple[str, Dict]]:
    """Yield `(where, record dict)` for every decodable JSON object of `path`, in file order.

    report: has `records_read` (incremented for every record, bad ones included; blank lines are not
    records) and `bad` (a Tally). A malformed line or a non-object is counted in `report.bad` (skip) or
    raises BadRecordError naming `file:line` (on_bad_record='error'; the hint names `option`).
    """
    for raw in iter_raw_records(path, detect_format(path, key="--input")):
        report.records_read += 1
        payload = raw.payload
        try:
            if isinstance(payload, str):
                try:
                    payload = json.loads(payload)
                except json.JSONDecodeError as exc:
                    raise RecordProblem(MALFORMED_JSON, f"{exc.msg} (column {exc.colno})") from None
            if not isinstance(payload, dict):
                raise RecordProblem(NOT_AN_OBJECT, f"expected a JSON object, got {type(payload).__name__}")
        except RecordProblem as problem:
            record_problem(raw.where, problem, report.bad, on_bad_record, option)
            continue
        yield raw.where, payload


def record_problem(where: str, problem: RecordProblem, bad: Tally, on_bad_record: str,
                   option: str = "--on-bad-record") -> None:
    """Count a bad record in `bad`, or raise BadRecordError (`where: reason: message`) when on_bad_record='error'."""
    if on_bad_record == "error":
        raise BadRecordError(where, problem.reason, f"{problem.message} (pass {option} skip to drop such records)",
                             skippable=False)
    bad.add(problem.reason, where, problem.message)


def prompt_key(rec: Dict) -> str:
    """Identity of a record's prompt: canonical JSON of its prompt fields. Raises RecordProblem if it has none."""
    fields = {f: rec[f] for f in PROMPT_FIELDS if rec.get(f) is not None}
    if not fields:
        raise RecordProblem(MISSING_FIELD, f"no prompt: expected one of {', '.join(PROMPT_FIELDS)}")
    return json.dumps(fields, sort_keys=True, ensure_ascii=False)


def prompt_text(rec: Dict) -> str:
    """The prompt as one string (for global deduplication): text, chat contents joined by newlines, or ids."""
    if isinstance(rec.get("messages"), list):
        return "\n".join(str(m.get("content", "")) if isinstance(m, dict) else str(m) for m in rec["messages"])
    if isinstance(rec.get("prompt"), str):
        return rec["prompt"]
    if rec.get("prompt") is not None:
        return json.dumps(rec["prompt"], ensure_ascii=False)
    return " ".join(str(i) for i in rec.get("prompt_ids") or [])


def score_value(value: Any, name: str) -> Optional[float]:
    """A score field's value: a finite float, or None for null (unscored). RecordProblem otherwise."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise RecordProblem(BAD_VALUE, f"field '{name}' must be a finite number or null, got {value!r:.80}")
    return float(value)


def completions_of(rec: Dict, need_score: bool) -> List[Dict]:
    """Check and return `rec['completions']`: a list of objects with a string `text` (and a `score` key when
    `need_score`, see `score_value`). Raises RecordProblem naming the field, e.g. `completions[2].score`."""
    comps = rec.get(COMPLETIONS)
    if comps is None:
        raise RecordProblem(MISSING_FIELD, f"'{COMPLETIONS}' is absent or null (expected tools/generate.py output)")
    if not isinstance(comps, list):
        raise RecordProblem(BAD_VALUE, f"field '{COMPLETIONS}' must be a list, got {type(comps).__name__}")
    for i, c in enumerate(comps):
        name = f"{COMPLETIONS}[{i}]"
        if not isinstance(c, dict):
            raise RecordProblem(BAD_VALUE, f"field '{name}' must be an object, got {c!r:.80}")
        if not isinstance(c.get("text"), str):
            reason = MISSING_FIELD if c.get("text") is None else BAD_VALUE
            raise RecordProblem(reason, f"field '{name}.text' must be a string, got {c.get('text')!r:.80}")
        if need_score:
            if "score" not in c:
                raise RecordProblem(MISSING_FIELD, f"'{name}.score' is absent (score the file with tools/score.py)")
            score_value(c["score"], f"{name}.score")
        ids = c.get("token_ids")
        if ids is not None and (not isinstance(ids, list) or
                                not all(isinstance(t, int) and not isinstance(t, bool) for t in ids)):
            raise RecordProblem(BAD_VALUE, f"field '{name}.token_ids' must be a list of ints, got {ids!r:.80}")
    return comps


def write_jsonl(path: str, records: Iterable[Dict]) -> int:
    """Write `records` as JSON Lines to `path` atomically (a temp file renamed when complete); returns the count.

    The directory of `path` is created when missing.
    """
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=".jsonl")
    count = 0
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            for rec in records:
                fh.write(json.dumps(rec, ensure_ascii=False) + "\n")
                count += 1
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return count
