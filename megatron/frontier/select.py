"""Selection: scored completions -> SFT records (best-of-n) or preference pairs (best-vs-worst, all-pairs).

Input: the scored-completions contract of `scored.py` (one or several files: several are a committee of
policies, iTeC-style; completions of the same prompt are pooled in file order). Completions with a null
score are never selected. Per prompt, with scores s_i of its scored completions:

    best-of-n      the completion with the highest score (the first one on ties) -> one SFT record
    best-vs-worst  chosen = highest, rejected = lowest score (first on ties), when s_c - s_r > min_margin
    all-pairs      every ordered pair (i, j) with s_i - s_j > min_margin, in order of i then j

Output records keep the input's other fields (not the prompt/response/score fields, not `completions`) and
use the prompt in the form it came in:

    prompt        SFT {prompt, response, score}         pairs {prompt, chosen, rejected}
    messages      SFT {messages: prompt + [assistant]}  pairs {prompt: messages, chosen: [assistant], rejected: [...]}
    prompt_ids    SFT {prompt_ids, response_ids}        pairs {prompt_ids, chosen_ids, rejected_ids}
                  (ids: the completions' token_ids)     every pair also has score_chosen and score_rejected

which are the sft / pairwise layouts `megatron.data.records` reads (messages take precedence over prompt
text, which takes precedence over prompt_ids, when a record has several).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

from megatron.data.errors import MISSING_FIELD, RecordProblem

from .report import SelectReport
from .scored import COMPLETIONS, PROMPT_FIELDS, completions_of, prompt_key, read_records, record_problem, score_value

MODES = ("best-of-n", "best-vs-worst", "all-pairs")
# Fields with a data role: replaced by the selection's own, never passed through from the input record.
ROLE_FIELDS = frozenset(PROMPT_FIELDS + (
    COMPLETIONS, "response", "response_ids", "completion", "completion_ids", "chosen", "chosen_ids", "rejected",
    "rejected_ids", "text", "label", "margin", "score", "score_chosen", "score_rejected"))


@dataclass
class Candidate:
    """One scored completion: its text, score, token ids (or None) and location `file:line completions[i]`."""
    text: str
    score: float
    token_ids: Optional[List[int]]
    where: str


@dataclass
class PromptGroup:
    """A prompt's first record (its fields are written out, `where` locates it) and the scored completions of
    every input file."""
    record: Dict
    where: str
    candidates: List[Candidate] = field(default_factory=list)


Pairs = List[Tuple[Candidate, Candidate]]  # (chosen, rejected)


def best_of_n(cands: Sequence[Candidate]) -> Optional[Candidate]:
    """The highest-scored candidate (the first on ties), None when there are none."""
    best = None
    for c in cands:
        if best is None or c.score > best.score:
            best = c
    return best


def best_vs_worst(cands: Sequence[Candidate], min_margin: float) -> Tuple[Pairs, str]:
    """([(chosen, rejected)] or [], skip reason or ''): highest vs lowest score (first on ties),
    kept when s_chosen - s_rejected > min_margin."""
    if len(cands) < 2:
        return [], "single_completion" if cands else "no_scored_completion"
    chosen = best_of_n(cands)
    rejected = min(cands, key=lambda c: c.score)  # min returns the first of equal minima
    if not chosen.score - rejected.score > min_margin:
        return [], "margin_too_small"
    if chosen.text == rejected.text:
        return [], "same_text"
    return [(chosen, rejected)], ""


def all_pairs(cands: Sequence[Candidate], min_margin: float) -> Tuple[Pairs, Dict[str, int]]:
    """(every ordered pair (c_i, c_j) with s_i - s_j > min_margin in order of i then j, skip counts).

    Skip counts: 'margin_too_small' per unordered pair whose |s_i - s_j| <= min_margin, 'same_text' per pair of
    identical texts; 'no_scored_completion' / 'single_completion' (1) when there is no pair at all.
    min_margin >= 0, so at most one order of each pair qualifies.
    """
    skips: Dict[str, int] = {}
    if len(cands) < 2:
        skips["single_completion" if cands else "no_scored_completion"] = 1
        return [], skips
    pairs = []
    for i, ci in enumerate(cands):
        for j, cj in enumerate(cands):
            if i == j:
                continue
            if ci.score - cj.score > min_margin:
                if ci.text == cj.text:
                    skips["same_text"] = skips.get("same_text", 0) + 1
                else:
                    pairs.append((ci, cj))
            elif i < j and cj.score - ci.score <= min_margin:
                skips["margin_too_small"] = skips.get("margin_too_small", 0) + 1
    return pairs, skips


def _passthrough(base: Dict) -> Dict:
    return {k: v for k, v in base.items() if k not in ROLE_FIELDS}


def _form(base: Dict) -> str:
    for name in ("messages", "prompt", "prompt_ids"):
        if base.get(name) is not None:
            return name
    raise RecordProblem(MISSING_FIELD, f"no prompt: expected one of {', '.join(PROMPT_FIELDS)}")


def _ids(c: Candidate) -> List[int]:
    if c.token_ids is None:
        raise RecordProblem(MISSING_FIELD, f"{c.where}: no token_ids (needed for a prompt_ids record)")
    return list(c.token_ids)


def sft_record(base: Dict, best: Candidate) -> Dict:
    """The SFT record of `base`'s prompt answered by `best` (see the module docstring for the layouts)."""
    out = _passthrough(base)
    form = _form(base)
    if form == "messages":
        out["messages"] = list(base["messages"]) + [{"role": "assistant", "content": best.text}]
    elif form == "prompt":
        out["prompt"], out["response"] = base["prompt"], best.text
    else:
        out["prompt_ids"], out["response_ids"] = list(base["prompt_ids"]), _ids(best)
    out["score"] = best.score
    return out


def pair_record(base: Dict, chosen: Candidate, rejected: Candidate) -> Dict:
    """The preference record of `base`'s prompt with `chosen` over `rejected`, with score_chosen/score_rejected."""
    out = _passthrough(base)
    form = _form(base)
    if form == "messages":
        out["prompt"] = list(base["messages"])
        out["chosen"] = [{"role": "assistant", "content": chosen.text}]
        out["rejected"] = [{"role": "assistant", "content": rejected.text}]
    elif form == "prompt":
        out["prompt"], out["chosen"], out["rejected"] = base["prompt"], chosen.text, rejected.text
    else:
        out["prompt_ids"] = list(base["prompt_ids"])
        out["chosen_ids"], out["rejected_ids"] = _ids(chosen), _ids(rejected)
    out["score_chosen"], out["score_rejected"] = chosen.score, rejected.score
    return out


def read_groups(paths: Sequence[str], report: SelectReport, on_bad_record: str = "skip") -> List[PromptGroup]:
    """Prompt groups of all `paths` in order of first appearance; bad records counted in `report.bad`
    (or BadRecordError with on_bad_record='error'); null-scored completions counted, not kept."""
    groups: Dict[str, PromptGroup] = {}
    for path in paths:
        for where, rec in read_records(path, report, on_bad_record):
            try:
                key = prompt_key(rec)
                comps = completions_of(rec, need_score=True)
            except RecordProblem as problem:
                record_problem(where, problem, report.bad, on_bad_record)
                continue
            group = groups.setdefault(key, PromptGroup(rec, where))
            for i, c in enumerate(comps):
                report.completions += 1
                score = score_value(c["score"], "score")
                if score is None:
                    report.unscored_completions += 1
                    continue
                group.candidates.append(Candidate(c["text"], score, c.get("token_ids"), f"{where} {COMPLETIONS}[{i}]"))
    report.prompts = len(groups)
    return list(groups.values())


def select_files(paths: Sequence[str], mode: str, min_margin: float = 0.0,
                 on_bad_record: str = "skip") -> Tuple[List[Dict], SelectReport]:
    """Select from the scored files `paths`: returns (output records in prompt order, report).

    mode: one of MODES; min_margin >= 0 (pair modes). Raises ValueError for bad settings, BadRecordError for
    a bad record with on_bad_record='error'.
    """
    if mode not in MODES:
        raise ValueError(f"--mode must be one of {', '.join(MODES)}, got {mode!r}")
    if not min_margin >= 0:
        raise ValueError(f"--min-margin must be >= 0, got {min_margin!r}")
    report = SelectReport(inputs=list(paths), mode=mode, min_margin=min_margin)
    out: List[Dict] = []
    for group in read_groups(paths, report, on_bad_record):
        if mode == "best-of-n":
            best = best_of_n(group.candidates)
            selected = [(best,)] if best is not None else []
            skips = {} if selected else {"no_scored_completion": 1}
        elif mode == "best-vs-worst":
            selected, reason = best_vs_worst(group.candidates, min_margin)
            skips = {reason: 1} if reason else {}
        else:
            selected, skips = all_pairs(group.candidates, min_margin)
        for reason, count in skips.items():
            for _ in range(count):
                report.skipped.add(reason, group.where)
        for chosen in selected:
            try:
                out.append(sft_record(group.record, *chosen) if mode == "best-of-n"
                           else pair_record(group.record, *chosen))
            except RecordProblem as problem:
                report.skipped.add("no_token_ids", group.where, problem.message)
    report.records_written = len(out)
    return out, report
