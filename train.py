#!/usr/bin/env python
"""Worker entry point: `train.py CONFIG.yml [MORE.yml ...] [--set key=value ...]`.

Started on every rank by deepy.py (DeepSpeed's launcher), or directly by torchrun, deepspeed, srun or
mpirun: rank information is read from whichever launcher set it.
"""
from __future__ import annotations

import argparse
import sys


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("configs", nargs="+")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(sys.argv[1:] if argv is None else argv)

    from megatron.config import ConfigError
    from megatron.engines.run_config import load_run_config
    from megatron.checkpoint.checkpointing import CheckpointError
    from megatron.mpu.distributed import shutdown_distributed, world_size_from_env
    from megatron.training.trainer import run_training

    try:
        cfg = load_run_config(args.configs, args.overrides, world_size=world_size_from_env())
        result = run_training(cfg)
    except (ConfigError, CheckpointError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    finally:
        shutdown_distributed()
    print(f"finished at step {result.step}" + (" (stopped by SIGTERM)" if result.stopped_by_signal else ""),
          file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
