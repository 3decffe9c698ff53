#!/usr/bin/env python
"""Re-shard a checkpoint to another tensor x pipeline layout (weights and config only, no optimizer state).

    python tools/ckpts/reshard.py --ckpt O --out O2 --tp 2 --pp 2 [--tag T] [--blocks-per-stage 3,2]
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
    from megatron.interop.convert import reshard_checkpoint, run_cli

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ckpt", required=True, help="source checkpoint dir (follows `latest`) or a tag dir")
    ap.add_argument("--tag", default=None, help="source tag instead of `latest`")
    ap.add_argument("--out", required=True, help="output checkpoint dir")
    ap.add_argument("--tp", type=int, required=True, help="new tensor-parallel size")
    ap.add_argument("--pp", type=int, required=True, help="new pipeline-parallel size")
    ap.add_argument("--blocks-per-stage", default=None,
                    help="comma-separated block counts per stage (default: uniform, remainder first)")
    args = ap.parse_args(argv)
    bps = None
    if args.blocks_per_stage:
        try:
            bps = [int(x) for x in args.blocks_per_stage.split(",")]
        except ValueError:
            ap.error(f"--blocks-per-stage {args.blocks_per_stage!r}: expected integers like 3,2")
    return run_cli(lambda: f"wrote {reshard_checkpoint(args.ckpt, args.out, args.tp, args.pp, args.tag, bps)} "
                           f"(tensor={args.tp}, pipeline={args.pp})")


if __name__ == "__main__":
    sys.exit(main())
