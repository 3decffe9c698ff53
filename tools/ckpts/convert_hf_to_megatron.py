#!/usr/bin/env python
"""Convert a Hugging Face model directory into a checkpoint of ours.

    python tools/ckpts/convert_hf_to_megatron.py --hf-dir D --out O --tp 2 [--pp 1] [--dtype fp32|bf16]

Writes O/latest = release, O/release/{config.yaml, meta.json, weights/tp{t}_pp{p}.pt}, O/model.yaml
(model + parallel sections: use it with `checkpoint.load: O`), O/tokenizer/ and O/hf/ (original config).
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import List, Optional

_REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if _REPO not in sys.path:  # run as `python tools/ckpts/<script>.py` from anywhere
    sys.path.insert(0, _REPO)


def main(argv: Optional[List[str]] = None) -> int:
    """CLI entry point; returns the process exit code (errors are printed, not raised)."""
    from megatron.interop.convert import DTYPES, hf_to_megatron, run_cli
    from megatron.interop.hf_config import SUPPORTED_ARCHITECTURES

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="supported architectures: " + ", ".join(SUPPORTED_ARCHITECTURES))
    ap.add_argument("--hf-dir", required=True, help="transformers model dir (config.json + weights)")
    ap.add_argument("--out", required=True, help="output checkpoint dir")
    ap.add_argument("--tp", type=int, default=1, help="tensor-parallel size (default 1)")
    ap.add_argument("--pp", type=int, default=1, help="pipeline-parallel size (default 1)")
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="fp32",
                    help="training precision recorded in config.yaml; weights are stored fp32")
    args = ap.parse_args(argv)
    return run_cli(lambda: f"wrote {hf_to_megatron(args.hf_dir, args.out, args.tp, args.pp, args.dtype)} "
                           f"(tensor={args.tp}, pipeline={args.pp}); model yaml: {os.path.join(args.out, 'model.yaml')}")


if __name__ == "__main__":
    sys.exit(main())
