#!/usr/bin/env python
"""Filter generated completions (or plain SFT-style records): refusals, lengths, scores, duplicates, top fraction.

    python tools/filter_data.py --input scored.jsonl --output kept.jsonl \\
        [--min-chars 1] [--max-tokens 512 --tokenizer data/tiny/tokenizer] [--min-score 0.0] [--top-fraction 0.5] \\
        [--near-dup-threshold 0.8 --ngram 3 --dedup-scope prompt] [--refusal-phrases FILE|none] \\
        [--drop-truncated] [--dropped dropped.jsonl] [--report kept.report.json] [--on-bad-record skip|error]

Input: tools/generate.py output (JSONL: every input field plus `completions: [{text, token_ids, logprobs,
finish_reason}]`, scored by tools/score.py as `completions[i].score`) or flat records (prompt/response,
prompt/completion, text or messages; `score` for the score rules); several --input files are read in
order. Each completion (or flat record) is a unit; the rules run in a fixed order and each dropped unit is
counted under the first rule that drops it (megatron/frontier/filter.py). Refusals use the shipped
megatron/frontier/refusal_phrases.txt unless --refusal-phrases names another file (or `none`). Exact
duplicates are removed by default (--no-exact-dedup keeps them).

Writes the kept records (other fields unchanged) to --output, the report as JSON (default
<output>.report.json) and prints it as a table. Bad lines (malformed JSON, missing fields) are named with
file:line and counted (--on-bad-record error stops at the first). Exit code 0, or 1 with the error printed.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import List, Optional

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository root


def build_parser() -> argparse.ArgumentParser:
    """The command-line interface."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--input", action="append", required=True, help="JSONL (or .json/.parquet/.csv); repeatable")
    ap.add_argument("--output", required=True, help="kept records, JSONL")
    ap.add_argument("--report", help="report JSON (default <output>.report.json)")
    ap.add_argument("--dropped", help="also write each dropped unit {where, rule, detail, text} to this JSONL")
    ap.add_argument("--refusal-phrases", default="default",
                    help="phrase file (one per line) replacing the shipped list; 'none' turns the rule off")
    ap.add_argument("--min-chars", type=int, help="drop responses with fewer characters")
    ap.add_argument("--max-chars", type=int, help="drop responses with more characters")
    ap.add_argument("--min-tokens", type=int, help="drop responses with fewer tokens")
    ap.add_argument("--max-tokens", type=int, help="drop responses with more tokens")
    ap.add_argument("--tokenizer", help="tokenizer for the token bounds (default: the completions' token_ids)")
    ap.add_argument("--min-score", type=float, help="drop units scored below this")
    ap.add_argument("--max-score", type=float, help="drop units scored above this")
    ap.add_argument("--top-fraction", type=float, help="keep the best-scored ceil(F * k) of each prompt's k units")
    ap.add_argument("--drop-truncated", action="store_true", help="drop completions with finish_reason 'length'")
    ap.add_argument("--no-exact-dedup", action="store_true", help="keep exact duplicates")
    ap.add_argument("--near-dup-threshold", type=float, help="drop units at n-gram Jaccard >= this to a kept one")
    ap.add_argument("--ngram", type=int, default=3, help="words per n-gram for near duplicates (default 3)")
    ap.add_argument("--dedup-scope", default="prompt", choices=("prompt", "global"),
                    help="duplicates among one prompt's responses (default) or across the file (prompt + response)")
    ap.add_argument("--text-field", help="flat records: the response field (response, completion, text, messages)")
    ap.add_argument("--on-bad-record", default="skip", choices=("skip", "error"),
                    help="skip (count and name) bad lines, or stop at the first")
    return ap


def main(argv: Optional[List[str]] = None) -> int:
    """CLI entry point; returns the process exit code (errors are printed, not raised)."""
    from megatron.config import ConfigError
    from megatron.data import BadRecordError, load_tokenizer
    from megatron.frontier import FilterSettings, filter_files, load_phrases
    from megatron.frontier.scored import write_jsonl

    args = build_parser().parse_args(argv)
    try:
        phrases = None if args.refusal_phrases == "none" else tuple(
            load_phrases(None if args.refusal_phrases == "default" else args.refusal_phrases))
        settings = FilterSettings(
            refusal_phrases=phrases, min_chars=args.min_chars, max_chars=args.max_chars, min_tokens=args.min_tokens,
            max_tokens=args.max_tokens, min_score=args.min_score, max_score=args.max_score,
            top_fraction=args.top_fraction, drop_truncated=args.drop_truncated, exact_dedup=not args.no_exact_dedup,
            near_dup_threshold=args.near_dup_threshold, ngram=args.ngram, dedup_scope=args.dedup_scope,
            text_field=args.text_field, on_bad_record=args.on_bad_record)
        settings.check()
        tokenizer = load_tokenizer(args.tokenizer, key="--tokenizer") if args.tokenizer else None
        result = filter_files(args.input, settings, tokenizer)
        result.report.output = args.output
        write_jsonl(args.output, result.records)
        if args.dropped:
            write_jsonl(args.dropped, result.dropped)
        report_path = args.report or args.output + ".report.json"
        result.report.write_json(report_path)
    except (ConfigError, BadRecordError, ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(result.report.format())
    print(f"wrote {args.output} and {report_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
