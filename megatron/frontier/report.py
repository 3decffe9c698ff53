"""What filtering and selection did: counts per rule / reason with the first locations, as JSON and a table.

Bad input lines use the preprocessing reason codes and names (`megatron.data.errors`: malformed JSON, record
is not an object, missing field, bad field value) and keep the first `MAX_EXAMPLES_PER_REASON` locations
(`file:line: message`), as the preprocessing report does.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Dict, List

from megatron.data.errors import REASON_NAMES
from megatron.data.report import MAX_EXAMPLES_PER_REASON

_WIDTH = 50  # column of the counts in the printed tables


def _row(name: str, value: object) -> str:
    return f"  {name:<{_WIDTH - 2}} {value}"


@dataclass
class Tally:
    """Counts by key with up to MAX_EXAMPLES_PER_REASON example locations per key (insertion-ordered)."""
    counts: Dict[str, int] = field(default_factory=dict)
    examples: Dict[str, List[str]] = field(default_factory=dict)

    def add(self, key: str, where: str, message: str = "") -> None:
        """Count one item under `key`; remember `where: message` among its first examples."""
        self.counts[key] = self.counts.get(key, 0) + 1
        ex = self.examples.setdefault(key, [])
        if len(ex) < MAX_EXAMPLES_PER_REASON:
            ex.append(f"{where}: {message}" if message else where)

    @property
    def total(self) -> int:
        """Sum of all counts."""
        return sum(self.counts.values())

    def lines(self, names: Dict[str, str], keys: List[str] = None, indent: str = "    ") -> List[str]:
        """Table lines `name  count` (+ `e.g.` lines) for `keys` (default: every counted key)."""
        out = []
        for key in keys if keys is not None else list(self.counts):
            out.append(f"{indent}{names.get(key, key):<{_WIDTH - len(indent)}} {self.counts.get(key, 0)}")
            out.extend(f"{indent}  e.g. {e}" for e in self.examples.get(key, []))
        return out


# Rule names of the filter, in the order the rules run (a unit is counted under the first rule that drops it).
RULE_NAMES = {
    "truncated": "truncated (finish_reason length)",
    "refusal": "refusal / 'as an AI' phrase",
    "too_short": "shorter than the minimum length",
    "too_long": "longer than the maximum length",
    "unscored": "no score (score null)",
    "score_low": "score below --min-score",
    "score_high": "score above --max-score",
    "exact_duplicate": "exact duplicate",
    "near_duplicate": "near duplicate",
    "top_fraction": "outside the top fraction of its prompt",
}
RULES = list(RULE_NAMES)


@dataclass
class FilterReport:
    """Counters of one filter run: records in/out, bad lines by reason, dropped units by rule.

    A unit is what the rules judge: one completion of a generation record, or one flat record.
    """
    inputs: List[str] = field(default_factory=list)
    output: str = ""
    settings: Dict = field(default_factory=dict)
    records_read: int = 0
    bad: Tally = field(default_factory=Tally)
    units_read: int = 0
    dropped: Tally = field(default_factory=Tally)
    units_kept: int = 0
    records_emptied: int = 0  # records left without any unit (not written)
    records_written: int = 0

    def to_dict(self) -> Dict:
        """Plain JSON-serialisable dict; `dropped.counts` lists every rule (0 when it dropped nothing)."""
        out = asdict(self)
        out["dropped"]["counts"] = {r: self.dropped.counts.get(r, 0) for r in RULES}
        out["bad"]["names"] = {k: REASON_NAMES.get(k, k) for k in self.bad.counts}
        return out

    def write_json(self, path: str) -> None:
        """Write `to_dict()` to `path` (indented JSON)."""
        with open(path, "w", encoding="utf-8") as fh:
            json.dump(self.to_dict(), fh, indent=2)
            fh.write("\n")

    def format(self) -> str:
        """The printed table."""
        lines = [f"filter report: {', '.join(self.inputs)} -> {self.output}",
                 _row("records read", self.records_read),
                 _row("bad records (skipped)", self.bad.total)]
        lines += self.bad.lines(REASON_NAMES)
        lines += [_row("units read (completions or records)", self.units_read),
                  "  dropped by rule (first rule that applies)"]
        lines += self.dropped.lines(RULE_NAMES, RULES)
        lines += [_row("units kept", self.units_kept),
                  _row("records written", f"{self.records_written} ({self.records_emptied} left without units, "
                                          "not written)")]
        return "\n".join(lines)


SKIP_NAMES = {
    "no_scored_completion": "prompts without a scored completion",
    "single_completion": "prompts with one scored completion (no pair)",
    "margin_too_small": "pairs not above --min-margin",
    "same_text": "pairs of identical texts",
    "no_token_ids": "completions without token_ids (prompt_ids records)",
}


@dataclass
class SelectReport:
    """Counters of one selection run: prompts, completions, records written, what was skipped and why."""
    inputs: List[str] = field(default_factory=list)
    output: str = ""
    mode: str = ""
    min_margin: float = 0.0
    records_read: int = 0
    bad: Tally = field(default_factory=Tally)
    prompts: int = 0
    completions: int = 0
    unscored_completions: int = 0  # score null: counted, never selected
    skipped: Tally = field(default_factory=Tally)
    records_written: int = 0

    def to_dict(self) -> Dict:
        """Plain JSON-serialisable dict."""
        out = asdict(self)
        out["bad"]["names"] = {k: REASON_NAMES.get(k, k) for k in self.bad.counts}
        return out

    def write_json(self, path: str) -> None:
        """Write `to_dict()` to `path` (indented JSON)."""
        with open(path, "w", encoding="utf-8") as fh:
            json.dump(self.to_dict(), fh, indent=2)
            fh.write("\n")

    def format(self) -> str:
        """The printed table."""
        lines = [f"select report ({self.mode}"
                 + (f", min margin {self.min_margin:g}" if self.mode != "best-of-n" else "")
                 + f"): {', '.join(self.inputs)} -> {self.output}",
                 _row("records read", self.records_read),
                 _row("bad records (skipped)", self.bad.total)]
        lines += self.bad.lines(REASON_NAMES)
        lines += [_row("prompts", self.prompts),
                  _row("completions", f"{self.completions} ({self.unscored_completions} unscored, never selected)"),
                  "  skipped"]
        lines += self.skipped.lines(SKIP_NAMES)
        lines.append(_row("records written", self.records_written))
        return "\n".join(lines)
