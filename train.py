#!/usr/bin/env python
"""Worker entry point: `train.py CONFIG.yml [MORE.yml ...] [--set key=value ...]`.

Started on every rank by deepy.py (DeepSpeed's launcher), or directly by torchrun, deepspeed, srun or
mpirun: rank information is read from whichever launcher set it.
"""
from __future__ import annotations

import argparse
import os
import sys

from megatron.config.load import add_set_argument


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("configs", nargs="+")
    add_set_argument(p)
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(sys.argv[1:] if argv is None else argv)

    from megatron.config import ConfigError
    from megatron.engines.run_config import load_run_config
    from megatron.checkpoint.checkpointing import CheckpointError
    from megatron.data.errors import DataError
    from megatron.mpu.distributed import shutdown_distributed, world_size_from_env
    from megatron.objectives import get_objective_class
    from megatron.rewards import RewardError
    from megatron.training.trainer import run_training

    from megatron.training.launcher import ensure_master_port
    ensure_master_port()  # a lone process gets a free port (two single-process runs never collide)
    try:
        cfg = load_run_config(args.configs, args.overrides, world_size=world_size_from_env())
        if get_objective_class(cfg.objective.name).batch_kind == "rollout":  # online RL: generate, score, train
            from megatron.training.online import run_online
            result = run_online(cfg)
        else:
            result = run_training(cfg)
    except (ConfigError, CheckpointError, DataError, RewardError) as exc:  # one line naming the file/key and the fix
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except RuntimeError as exc:  # torch's DistNetworkError when rank 0 cannot open the rendezvous port
        if "EADDRINUSE" not in str(exc):
            raise
        print(f"error: {port_taken_message()}", file=sys.stderr)
        return 2
    finally:
        shutdown_distributed()
    print(f"finished at step {result.step}" + (" (stopped by SIGTERM)" if result.stopped_by_signal else ""),
          file=sys.stderr)
    return 0


def port_taken_message() -> str:
    """One line for a rendezvous port that another process holds (what to change, per launcher)."""
    where = f"{os.environ.get('MASTER_ADDR', '?')}:{os.environ.get('MASTER_PORT', '?')}"
    return (f"the master port {where} is already in use (another training job?): with deepy.py leave "
            "launcher.master_port unset (a free port is chosen) or pick another with --set launcher.master_port=N; "
            "with torchrun/mpirun/srun set MASTER_PORT (torchrun --master_port N)")


if __name__ == "__main__":
    sys.exit(main())
