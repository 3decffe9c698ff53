"""The shared `main` of config-driven workers (tools/generate.py, tools/score.py, tools/precompute_reference.py):
`SCRIPT CONFIG.yml [MORE.yml ...] [--set key=value ...]`, on one process or on every rank under deepy.py."""
from __future__ import annotations

import argparse
import json
import sys
from typing import Callable, Optional, Sequence, Tuple, Type


def run_worker(description: str, run: Callable, argv: Optional[Sequence[str]] = None,
               errors: Tuple[Type[BaseException], ...] = (),
               precheck: Optional[Callable] = None) -> int:
    """Parse the command line, load and validate the run config for this world size, call `run(cfg)`.

    `run` returns a JSON-able summary (printed as one line on stdout) or None. `precheck(cfg)` sees the
    unvalidated config first (for errors that would otherwise surface as a less helpful validation error).
    ConfigError, CheckpointError and `errors` become one line `error: ...` on stderr and exit code 2.
    A lone process (no launcher) gets a free rendezvous port. Returns the exit code.
    """
    from megatron.config.load import add_set_argument

    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("configs", nargs="+", help="YAML files, later ones override earlier ones")
    add_set_argument(p)
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(sys.argv[1:] if argv is None else argv)

    from megatron.checkpoint.checkpointing import CheckpointError
    from megatron.config import ConfigError
    from megatron.engines.run_config import load_run_config
    from megatron.mpu.distributed import shutdown_distributed, world_size_from_env
    from megatron.training.launcher import ensure_master_port

    ensure_master_port()  # a lone process gets a free port (two single-process runs never collide)
    try:
        if precheck is not None:
            precheck(load_run_config(args.configs, args.overrides, validate=False))
        cfg = load_run_config(args.configs, args.overrides, world_size=world_size_from_env())
        summary = run(cfg)
    except (ConfigError, CheckpointError) + tuple(errors) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    finally:
        shutdown_distributed()
    if summary:
        print(json.dumps(summary), flush=True)
    return 0
