#!/usr/bin/env python
"""Tokenise a raw dataset into an indexed dataset (<prefix>.bin/.idx/.meta.json) and print a report.

    python tools/preprocess_data.py --input data/tiny/sft.jsonl --output-prefix out/sft \\
        --tokenizer data/tiny/tokenizer [--config cfg.yaml] [--set data.kind=sft] [--workers 4] \\
        [--max-seq-len 256] [--max-prompt-len 64] [--chat-template chatml] [--on-bad-record skip]

Settings come from the config files / --set overrides (data.* and model.max_seq_len) with the
flags applied last. Training can use the output with data.format=indexed, data.train_path=<prefix>.
Exit code 0 on success, 1 with the error printed (bad record with file:line, or a config error).
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
    ap.add_argument("--input", required=True, help="raw file: .jsonl .json .parquet .csv or a save_to_disk dir")
    ap.add_argument("--output-prefix", required=True, help="writes <prefix>.bin, .idx, .meta.json")
    ap.add_argument("--tokenizer", help="HF tokenizer dir or SentencePiece .model (data.tokenizer)")
    ap.add_argument("--config", action="append", default=[], help="YAML config file(s), merged in order")
    from megatron.config.load import add_set_argument
    add_set_argument(ap)
    ap.add_argument("--workers", type=int, help="tokenising processes (data.num_workers)")
    ap.add_argument("--format", help="data.format")
    ap.add_argument("--kind", help="data.kind: auto | sft | pairwise | unpaired")
    ap.add_argument("--chat-template", help="data.chat_template")
    ap.add_argument("--max-seq-len", type=int, help="model.max_seq_len (row length)")
    ap.add_argument("--max-prompt-len", type=int, help="data.max_prompt_len")
    ap.add_argument("--on-bad-record", choices=("error", "skip"), help="data.on_bad_record")
    ap.add_argument("--micro-batch-size", type=int, default=8, help="for the padding-fraction report")
    ap.add_argument("--no-progress", action="store_true", help="no progress bar")
    return ap


def main(argv: Optional[List[str]] = None) -> int:
    """CLI entry point; returns the process exit code (errors are printed, not raised)."""
    from megatron.config import ConfigError, load_config
    from megatron.data import BadRecordError, load_tokenizer, preprocess, preprocess_settings

    args = build_parser().parse_args(argv)
    flags = {"data.tokenizer": args.tokenizer, "data.num_workers": args.workers, "data.format": args.format,
             "data.kind": args.kind, "data.chat_template": args.chat_template, "model.max_seq_len": args.max_seq_len,
             "data.max_prompt_len": args.max_prompt_len, "data.on_bad_record": args.on_bad_record}
    overrides = list(args.overrides) + [f"{k}={v}" for k, v in flags.items() if v is not None]
    try:
        cfg = load_config(args.config, overrides, validate=False)
        settings = preprocess_settings(cfg)
        tokenizer = load_tokenizer(cfg.data.tokenizer)
        preprocess(args.input, args.output_prefix, tokenizer, settings, workers=cfg.data.num_workers,
                   progress=not args.no_progress, micro_batch_size=args.micro_batch_size)
    except (ConfigError, BadRecordError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
