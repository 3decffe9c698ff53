"""The frontier loop's data phases (run in the loop's own process, on the same library as the tools):

    write_prompts      loop.prompts (+ loop.heldout_prompts) -> one generation input, each record tagged
                       `loop_split: train | heldout` (one generate launch serves both)
    merge_generations  the policy's and the committee's outputs -> one file to score; each completion tagged
                       `generator: policy | committee_<k>` (held-out prompts keep the policy's completions only)
    split_scored       the scored file -> samples (train prompts; every generator) and heldout (policy only),
                       tags removed from the records
    filter_round       tools/filter_data.py's rules (megatron.frontier.filter_files) with `loop.filter` settings
    select_round       best-of-n SFT records and preference pairs (megatron.frontier.select_files)
"""
from __future__ import annotations

import dataclasses
import json
from typing import Any, Dict, List, Optional, Sequence, Tuple

from megatron.config import ConfigError

from .filter import FilterSettings, filter_files
from .rules import load_phrases
from .scored import COMPLETIONS, write_jsonl
from .select import MODES, select_files

SPLIT, GENERATOR, POLICY = "loop_split", "generator", "policy"


def _jsonl(path: str, key: str) -> List[Dict]:
    """The JSON objects of `path`; ConfigError naming `key`, the file and line for anything else."""
    out = []
    try:
        fh = open(path, encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"key '{key}': cannot read {path!r} ({exc.strerror})") from None
    with fh:
        for n, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ConfigError(f"{path}:{n}: not valid JSON ({exc.msg})") from None
            if not isinstance(rec, dict):
                raise ConfigError(f"{path}:{n}: expected a JSON object")
            out.append(rec)
    return out


def write_prompts(prompts: str, heldout: Optional[str], out: str) -> Dict[str, int]:
    """Write the generation input `out`; returns {'train': n, 'heldout': m}."""
    train = _jsonl(prompts, "loop.prompts")
    if not train:
        raise ConfigError(f"key 'loop.prompts': {prompts} holds no prompt records")
    held = _jsonl(heldout, "loop.heldout_prompts") if heldout else []
    recs = [{**r, SPLIT: "train"} for r in train] + [{**r, SPLIT: "heldout"} for r in held]
    write_jsonl(out, recs)
    return {"train": len(train), "heldout": len(held)}


def merge_generations(files: Sequence[Tuple[str, str]], out: str) -> Dict[str, int]:
    """Pool the outputs `[(generator name, file)]` (the policy first; all from the same input) into `out`."""
    base = _jsonl(files[0][1], "generation.output")
    merged = []
    for i, rec in enumerate(base):
        rec = dict(rec)
        rec[COMPLETIONS] = [{**c, GENERATOR: files[0][0]} for c in rec.get(COMPLETIONS, [])]
        merged.append(rec)
    for name, path in files[1:]:
        other = _jsonl(path, "generation.output")
        if len(other) != len(base):
            raise ConfigError(f"{path}: {len(other)} records, but {files[0][1]} has {len(base)}; committee outputs "
                              "must answer the same prompts file")
        for rec, extra in zip(merged, other):
            if rec.get(SPLIT) == "train":
                rec[COMPLETIONS] += [{**c, GENERATOR: name} for c in extra.get(COMPLETIONS, [])]
    write_jsonl(out, merged)
    return {"records": len(merged), "completions": sum(len(r[COMPLETIONS]) for r in merged)}


def split_scored(scored: str, samples: str, heldout: str) -> Dict[str, int]:
    """Split the scored file into `samples` (train prompts) and `heldout` (policy completions of held-out prompts)."""
    train, held = [], []
    for rec in _jsonl(scored, "score.output"):
        split = rec.pop(SPLIT, "train")
        if split == "heldout":
            rec[COMPLETIONS] = [c for c in rec.get(COMPLETIONS, []) if c.get(GENERATOR, POLICY) == POLICY]
            held.append(rec)
        else:
            train.append(rec)
    write_jsonl(samples, train)
    write_jsonl(heldout, held)
    return {"samples": len(train), "heldout": len(held)}


_FILTER_FIELDS = {f.name for f in dataclasses.fields(FilterSettings)} - {"on_bad_record", "text_field"}


def filter_settings(options: Dict[str, Any]) -> FilterSettings:
    """FilterSettings from the `loop.filter` mapping (FilterSettings field names; `refusal_phrases`: default (the
    shipped list, also when absent), none, or a phrase file). ConfigError naming `loop.filter.<key>` otherwise."""
    opts = dict(options)
    unknown = sorted(set(opts) - _FILTER_FIELDS)
    if unknown:
        raise ConfigError(f"key 'loop.filter.{unknown[0]}' is unknown; valid keys: {', '.join(sorted(_FILTER_FIELDS))}")
    phrases = opts.pop("refusal_phrases", "default")
    try:
        opts["refusal_phrases"] = None if phrases == "none" else tuple(
            load_phrases(None if phrases == "default" else phrases))
        settings = FilterSettings(**opts)
        settings.check()
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"section 'loop.filter': {exc}") from None
    return settings


def filter_round(samples: str, out: str, settings: FilterSettings) -> Dict[str, Any]:
    """Filter `samples` into `out` (+ `<out>.report.json`); returns the report as a dict."""
    result = filter_files([samples], settings)
    result.report.output = out
    write_jsonl(out, result.records)
    result.report.write_json(out + ".report.json")
    return result.report.to_dict()


def select_round(filtered: str, sft_out: str, pairs_out: str, pair_mode: str, min_margin: float) -> Dict[str, int]:
    """Best-of-n SFT records into `sft_out`, `pair_mode` pairs into `pairs_out` (+ reports); returns the counts."""
    if pair_mode not in MODES or pair_mode == "best-of-n":
        raise ConfigError(f"key 'loop.pairs': {pair_mode!r} is not one of best-vs-worst, all-pairs")
    counts = {}
    for mode, out, name in (("best-of-n", sft_out, "sft"), (pair_mode, pairs_out, "pairs")):
        records, report = select_files([filtered], mode, min_margin if name == "pairs" else 0.0)
        report.output = out
        counts[name] = write_jsonl(out, records)
        report.write_json(out + ".report.json")
    return counts
