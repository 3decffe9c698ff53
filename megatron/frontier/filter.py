"""Filter generated (or plain) records: the rules of `rules.py` and `dedup.py`, applied in a fixed order.

A UNIT is what the rules judge: each completion of a generation record (`completions: [...]`, see
`scored.py`), or a flat record itself (its response: the `response`, `completion` or `text` field, or the
last message of `messages`; `text_field` picks one). Rules, in the order they run; a unit is counted under
the first rule that drops it, so the counts add up to the units dropped:

    truncated        finish_reason == "length" (with drop_truncated)
    refusal          contains a phrase of the list (shipped megatron/frontier/refusal_phrases.txt or a file)
    too_short/long   characters (min_chars/max_chars) or tokens (min_tokens/max_tokens: the tokenizer's
                     count, or len(token_ids) of a completion when no tokenizer is given); bounds inclusive
    unscored         score null while a score rule is on (min_score, max_score, top_fraction)
    score_low/high   score < min_score or > max_score
    exact_duplicate  same normalised text as a unit kept before it
    near_duplicate   word n-gram Jaccard >= near_dup_threshold with a unit kept before it
    top_fraction     not among the ceil(top_fraction * k) best-scored of the k units of its prompt left so far

Duplicates are judged only against units that passed every earlier rule (a dropped unit never removes a
good one), within the same prompt (dedup_scope 'prompt') or across the file (scope 'global': prompt and
response text together). Top fractions are taken per prompt over the units left after deduplication.
A generation record keeps its surviving completions in their order and is written when any survive;
every other field is written unchanged.
"""
from __future__ import annotations

import copy
import json
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

from megatron.data.errors import BAD_VALUE, MISSING_FIELD, RecordProblem

from . import rules
from .dedup import NearDuplicateIndex, exact_key
from .report import FilterReport
from .scored import COMPLETIONS, completions_of, prompt_key, prompt_text, read_records, record_problem, score_value

DEDUP_SCOPES = ("prompt", "global")
TEXT_FIELDS = ("response", "completion", "text", "messages")


@dataclass(frozen=True)
class FilterSettings:
    """Which rules run and their thresholds (None = rule off). See the module docstring for each rule."""
    refusal_phrases: Optional[Tuple[str, ...]] = None
    min_chars: Optional[int] = None
    max_chars: Optional[int] = None
    min_tokens: Optional[int] = None
    max_tokens: Optional[int] = None
    min_score: Optional[float] = None
    max_score: Optional[float] = None
    top_fraction: Optional[float] = None
    drop_truncated: bool = False
    exact_dedup: bool = True
    near_dup_threshold: Optional[float] = None
    ngram: int = 3
    dedup_scope: str = "prompt"
    text_field: Optional[str] = None
    on_bad_record: str = "skip"

    @property
    def needs_score(self) -> bool:
        """A score rule is on."""
        return self.min_score is not None or self.max_score is not None or self.top_fraction is not None

    @property
    def needs_tokens(self) -> bool:
        """A token-length rule is on."""
        return self.min_tokens is not None or self.max_tokens is not None

    def check(self) -> None:
        """Raise ValueError naming the option for an inconsistent setting."""
        if self.dedup_scope not in DEDUP_SCOPES:
            raise ValueError(f"--dedup-scope must be one of {', '.join(DEDUP_SCOPES)}, got {self.dedup_scope!r}")
        if self.on_bad_record not in ("error", "skip"):
            raise ValueError(f"--on-bad-record must be error or skip, got {self.on_bad_record!r}")
        if self.text_field is not None and self.text_field not in TEXT_FIELDS:
            raise ValueError(f"--text-field must be one of {', '.join(TEXT_FIELDS)}, got {self.text_field!r}")
        for lo, hi, name in ((self.min_chars, self.max_chars, "chars"), (self.min_tokens, self.max_tokens, "tokens"),
                             (self.min_score, self.max_score, "score")):
            if lo is not None and hi is not None and lo > hi:
                raise ValueError(f"--min-{name} ({lo}) is above --max-{name} ({hi})")
        if self.top_fraction is not None:
            rules.top_fraction_keep([], self.top_fraction)  # range check
        if self.near_dup_threshold is not None:
            NearDuplicateIndex(self.near_dup_threshold, self.ngram)  # range checks


@dataclass
class Unit:
    """One judged item: `record` index, `sub` completion index (None for a flat record), its prompt group."""
    record: int
    sub: Optional[int]
    where: str
    group: str
    prompt: str
    text: str
    score: Optional[float]
    token_ids: Optional[List[int]]
    finish_reason: Optional[str]
    verdict: Optional[str] = None
    detail: str = ""


@dataclass
class FilterResult:
    """Kept records (in input order), dropped units `{where, rule, detail, text}`, and the report."""
    records: List[Dict] = field(default_factory=list)
    dropped: List[Dict] = field(default_factory=list)
    report: FilterReport = field(default_factory=FilterReport)


def _flat_unit(rec: Dict, text_field: Optional[str]) -> Tuple[str, str, str]:
    """(group key, prompt text, response text) of a flat record; RecordProblem when it has no response."""
    names = [text_field] if text_field else list(TEXT_FIELDS)
    name = next((n for n in names if rec.get(n) is not None), None)
    if name is None:
        raise RecordProblem(MISSING_FIELD, f"no response: expected '{COMPLETIONS}' (tools/generate.py output) or "
                                           f"one of {', '.join(names)}")
    value = rec[name]
    if name == "messages":
        if not isinstance(value, list) or not value or not isinstance(value[-1], dict) \
                or not isinstance(value[-1].get("content"), str):
            raise RecordProblem(BAD_VALUE, "field 'messages' must be a non-empty list of {role, content} messages")
        prompt = {"messages": value[:-1]}
        return (json.dumps(prompt, sort_keys=True, ensure_ascii=False), prompt_text(prompt), value[-1]["content"])
    if not isinstance(value, str):
        raise RecordProblem(BAD_VALUE, f"field '{name}' must be a string, got {value!r:.80}")
    try:
        group = prompt_key(rec)
    except RecordProblem:
        group = ""  # plain text records: one group
    return group, prompt_text(rec), value


def _units_of(rec: Dict, index: int, where: str, settings: FilterSettings) -> List[Unit]:
    """The units of one record (RecordProblem for a bad one)."""
    if COMPLETIONS in rec:
        group, ptext = prompt_key(rec), prompt_text(rec)
        comps = completions_of(rec, need_score=settings.needs_score)  # checks the scores when they are used
        return [Unit(index, i, f"{where} {COMPLETIONS}[{i}]", group, ptext, c["text"],
                     score_value(c["score"], "score") if settings.needs_score else None, c.get("token_ids"),
                     c.get("finish_reason")) for i, c in enumerate(comps)]
    group, ptext, text = _flat_unit(rec, settings.text_field)
    score = None
    if settings.needs_score:
        if "score" not in rec:
            raise RecordProblem(MISSING_FIELD, "'score' is absent (a score rule is on)")
        score = score_value(rec["score"], "score")
    return [Unit(index, None, where, group, ptext, text, score, None, None)]


def _token_count(unit: Unit, tokenizer: Any) -> int:
    if tokenizer is not None:
        return len(tokenizer.encode(unit.text))
    if unit.token_ids is not None:
        return len(unit.token_ids)
    raise ValueError(f"{unit.where}: --min-tokens/--max-tokens need --tokenizer (this unit has no token_ids)")


def _judge(unit: Unit, settings: FilterSettings, refusal: Optional[rules.RefusalRule], tokenizer: Any) -> None:
    """Set unit.verdict/detail from the per-unit rules (truncated, refusal, length, score), first match wins."""
    if settings.drop_truncated and unit.finish_reason == "length":
        unit.verdict, unit.detail = "truncated", "finish_reason length"
        return
    if refusal is not None:
        phrase = refusal.match(unit.text)
        if phrase is not None:
            unit.verdict, unit.detail = "refusal", repr(phrase)
            return
    verdict = rules.length_verdict(len(unit.text), settings.min_chars, settings.max_chars)
    if verdict:
        unit.verdict, unit.detail = verdict, f"{len(unit.text)} chars"
        return
    if settings.needs_tokens:
        n = _token_count(unit, tokenizer)
        verdict = rules.length_verdict(n, settings.min_tokens, settings.max_tokens)
        if verdict:
            unit.verdict, unit.detail = verdict, f"{n} tokens"
            return
    if settings.needs_score:
        verdict = rules.score_verdict(unit.score, settings.min_score, settings.max_score)
        if verdict:
            unit.verdict, unit.detail = verdict, f"score {unit.score}"


def _deduplicate(units: Sequence[Unit], settings: FilterSettings) -> None:
    """Mark exact and near duplicates among the units still kept, in order (the first one stays)."""
    seen: Dict[Tuple[str, str], Unit] = {}
    indexes: Dict[str, NearDuplicateIndex] = {}
    for uid, unit in enumerate(units):
        if unit.verdict:
            continue
        scope = unit.group if settings.dedup_scope == "prompt" else ""
        text = unit.text if settings.dedup_scope == "prompt" else unit.prompt + "\n" + unit.text
        key = (scope, exact_key(text))
        if settings.exact_dedup:
            first = seen.get(key)
            if first is not None:
                unit.verdict, unit.detail = "exact_duplicate", f"of {first.where}"
                continue
        if settings.near_dup_threshold is not None:
            index = indexes.get(scope)
            if index is None:
                index = indexes[scope] = NearDuplicateIndex(settings.near_dup_threshold, settings.ngram)
            match = index.find_or_add(uid, text)
            if match is not None:
                unit.verdict, unit.detail = "near_duplicate", f"of {units[match].where}"
                continue
        seen[key] = unit


def _top_fraction(units: Sequence[Unit], fraction: float) -> None:
    """Mark the units outside the top `fraction` of their prompt group (among the units still kept)."""
    groups: Dict[str, List[Unit]] = {}
    for unit in units:
        if not unit.verdict:
            groups.setdefault(unit.group, []).append(unit)
    for members in groups.values():
        keep = rules.top_fraction_keep([u.score for u in members], fraction)
        for unit, k in zip(members, keep):
            if not k:
                unit.verdict, unit.detail = "top_fraction", f"score {unit.score} of {len(members)} units"


def filter_files(paths: Sequence[str], settings: FilterSettings, tokenizer: Any = None) -> FilterResult:
    """Read `paths` (in order), apply the rules, return the kept records, the dropped units and the report.

    tokenizer: anything with `encode(text) -> ids`, for the token-length rules (optional, see the module doc).
    Raises BadRecordError for a bad record with on_bad_record='error', ValueError for bad settings.
    """
    settings.check()
    report = FilterReport(inputs=list(paths), settings={k: (list(v) if isinstance(v, tuple) else v)
                                                         for k, v in asdict(settings).items()})
    refusal = rules.RefusalRule(settings.refusal_phrases) if settings.refusal_phrases is not None else None
    records: List[Dict] = []
    units: List[Unit] = []
    for path in paths:
        for where, rec in read_records(path, report, settings.on_bad_record):
            try:
                rec_units = _units_of(rec, len(records), where, settings)
            except RecordProblem as problem:
                record_problem(where, problem, report.bad, settings.on_bad_record)
                continue
            records.append(rec)
            units.extend(rec_units)
    report.units_read = len(units)
    for unit in units:
        _judge(unit, settings, refusal, tokenizer)
    if settings.exact_dedup or settings.near_dup_threshold is not None:
        _deduplicate(units, settings)
    if settings.top_fraction is not None:
        _top_fraction(units, settings.top_fraction)

    result = FilterResult(report=report)
    by_record: Dict[int, List[Unit]] = {}
    for unit in units:
        by_record.setdefault(unit.record, []).append(unit)
        if unit.verdict:
            report.dropped.add(unit.verdict, unit.where, unit.detail)
            result.dropped.append({"where": unit.where, "rule": unit.verdict, "detail": unit.detail,
                                   "text": unit.text})
        else:
            report.units_kept += 1
    for index, rec in enumerate(records):
        kept = [u for u in by_record.get(index, []) if not u.verdict]
        if not kept:
            report.records_emptied += 1
            continue
        if COMPLETIONS in rec:
            rec = copy.copy(rec)
            rec[COMPLETIONS] = [rec[COMPLETIONS][u.sub] for u in kept]
        result.records.append(rec)
    report.records_written = len(result.records)
    return result


__all__ = ["FilterSettings", "FilterResult", "filter_files", "DEDUP_SCOPES", "TEXT_FIELDS"]
