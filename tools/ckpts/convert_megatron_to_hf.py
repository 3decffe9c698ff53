#!/usr/bin/env python
"""Export a checkpoint of ours (any tensor x pipeline layout, any step) as a Hugging Face model directory.

    python tools/ckpts/convert_megatron_to_hf.py --ckpt O [--tag T] --out D [--architecture llama] [--dtype bf16]

Token ids (bos/eos/pad) come from the tokenizer the model was trained with, and generation_config.json from
the base model it was converted from (found through the checkpoint's starting points), so `generate` stops at
the EOS training appended to every response.

Reward models (model.value_head) export as *ForSequenceClassification with num_labels=1. Hugging Face's
score layer has no bias: a non-zero value-head bias is an error unless --drop-value-bias is given.
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
    from megatron.interop.convert import DTYPES, megatron_to_hf, run_cli
    from megatron.interop.hf_config import FAMILIES

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ckpt", required=True, help="checkpoint dir (follows `latest`) or a tag dir")
    ap.add_argument("--tag", default=None, help="tag to export instead of `latest` (e.g. a step dir)")
    ap.add_argument("--out", required=True, help="output Hugging Face model dir")
    ap.add_argument("--architecture", choices=FAMILIES, default=None,
                    help="export family (default: model.arch of the checkpoint)")
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="fp32", help="dtype of the written weights")
    ap.add_argument("--drop-value-bias", action="store_true",
                    help="export a reward model whose value-head bias is non-zero, dropping the bias")
    ap.add_argument("--tokenizer", default=None,
                    help="tokenizer to copy and take bos/eos/pad ids from (default: the checkpoint's own "
                         "tokenizer/ dir, else its data.tokenizer)")
    args = ap.parse_args(argv)
    return run_cli(lambda: "wrote " + megatron_to_hf(args.ckpt, args.out, args.tag, args.architecture, args.dtype,
                                                      args.drop_value_bias, args.tokenizer))


if __name__ == "__main__":
    sys.exit(main())
