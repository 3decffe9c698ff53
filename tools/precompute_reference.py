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

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository root

from megatron.config.load import add_set_argument  # noqa: E402 (after the path set-up)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("configs", nargs="+", help="YAML files, later ones override earlier ones")
    add_set_argument(p)
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(sys.argv[1:] if argv is None else argv)

    from megatron.config import ConfigError
    from megatron.engines.run_config import load_run_config
    from megatron.checkpoint.checkpointing import CheckpointError
    from megatron.mpu.distributed import shutdown_distributed, world_size_from_env
    from megatron.engines.precompute import precompute_reference

    from megatron.training.launcher import ensure_master_port
    ensure_master_port()  # a lone process gets a free port (two single-process runs never collide)
    try:
        cfg = load_run_config(args.configs, args.overrides, world_size=world_size_from_env())
        precompute_reference(cfg)
    except (ConfigError, CheckpointError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    finally:
        shutdown_distributed()
    return 0


if __name__ == "__main__":
    sys.exit(main())
