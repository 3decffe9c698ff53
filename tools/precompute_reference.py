#!/usr/bin/env python
"""Precompute the reference policy's log-probs for reference.mode=precomputed.

    python tools/precompute_reference.py CONFIG.yml [MORE.yml ...] [--set key=value ...]        # 1 process
    python deepy.py tools/precompute_reference.py CONFIG.yml [MORE.yml ...] [--set key=value ...]  # N ranks

Give it the same configs and overrides as the training run. It runs the reference (the run's initial
weights, or reference.load) once over data.train_path and data.valid_path, split across data-parallel
ranks (tensor-parallel model when parallel.tensor > 1), and writes <dataset prefix>.ref_logps.npy beside
each indexed dataset. Exit code 0 on success, 2 on a config or checkpoint error (printed).
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository root


def main(argv=None) -> int:
    from megatron.engines.precompute import precompute_reference
    from megatron.training.worker_main import run_worker

    def run(cfg) -> None:
        precompute_reference(cfg)  # writes the values beside each dataset; no summary line

    return run_worker(__doc__, run, argv)


if __name__ == "__main__":
    sys.exit(main())
