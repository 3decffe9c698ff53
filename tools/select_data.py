#!/usr/bin/env python
"""Select training data from scored completions: best-of-n SFT records or preference pairs.

    python tools/select_data.py --input scored.jsonl --output sft.jsonl --mode best-of-n
    python tools/select_data.py --input scored.jsonl --output pairs.jsonl --mode best-vs-worst [--min-margin 0.5]
    python tools/select_data.py --input policy_a.jsonl --input policy_b.jsonl --output pairs.jsonl --mode all-pairs

Input: tools/generate.py output scored by tools/score.py (JSONL: every input field plus `completions: [{text,
token_ids, logprobs, finish_reason, score}]`; score null = unscored, never selected), usually after
tools/filter_data.py. Several --input files are a committee: completions of the same prompt are pooled.
Modes (megatron/frontier/select.py): best-of-n writes the best-scored completion of each prompt as an SFT
record (with its `score`); best-vs-worst writes the best against the worst completion when their scores
differ by more than --min-margin; all-pairs writes every ordered pair that does. Pairs carry
`score_chosen` and `score_rejected` (the reward margin the `rpo` objective uses).

Writes --output (JSONL, the sft or pairwise layouts preprocessing reads), the report as JSON (default
<output>.report.json) and prints it as a table. Bad lines are named with file:line and counted
(--on-bad-record error stops at the first). Exit code 0, or 1 with the error printed.
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
    ap.add_argument("--input", action="append", required=True, help="scored JSONL; repeat for a committee")
    ap.add_argument("--output", required=True, help="selected records, JSONL")
    ap.add_argument("--mode", required=True, choices=("best-of-n", "best-vs-worst", "all-pairs"))
    ap.add_argument("--min-margin", type=float, default=0.0,
                    help="pairs need score_chosen - score_rejected above this (default 0: strictly better)")
    ap.add_argument("--report", help="report JSON (default <output>.report.json)")
    ap.add_argument("--on-bad-record", default="skip", choices=("skip", "error"),
                    help="skip (count and name) bad lines, or stop at the first")
    return ap


def main(argv: Optional[List[str]] = None) -> int:
    """CLI entry point; returns the process exit code (errors are printed, not raised)."""
    from megatron.config import ConfigError
    from megatron.data import BadRecordError
    from megatron.frontier import select_files
    from megatron.frontier.scored import write_jsonl

    args = build_parser().parse_args(argv)
    try:
        records, report = select_files(args.input, args.mode, args.min_margin, args.on_bad_record)
        report.output = args.output
        write_jsonl(args.output, records)
        report_path = args.report or args.output + ".report.json"
        report.write_json(report_path)
    except (ConfigError, BadRecordError, ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(report.format())
    print(f"wrote {args.output} and {report_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
