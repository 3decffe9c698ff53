#!/usr/bin/env python
"""Launcher front: `python deepy.py train.py CONFIG.yml [MORE.yml ...] [--set key=value ...]`.

Reads and validates the YAML configs (plus overrides) before anything starts, then hands over to
DeepSpeed's launcher, which starts `train.py` with the same arguments on every rank (locally, over a
hostfile with pdsh, under Slurm's srun, or with OpenMPI/MPICH's mpirun; see `launcher:` in the config).
"""
from __future__ import annotations

import argparse
import sys

from megatron.config.load import add_set_argument


def parse(argv):
    """(user_script, config_paths, overrides, dry_run) from the command line."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("script", help="worker entry point, normally train.py")
    p.add_argument("configs", nargs="+", help="YAML files, later ones override earlier ones")
    add_set_argument(p)
    p.add_argument("--dry-run", action="store_true", help="print the launcher command and exit")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse(sys.argv[1:] if argv is None else argv)
    from megatron.config import ConfigError
    from megatron.engines.run_config import load_run_config
    from megatron.training.launcher import runner_args, world_size_for

    try:
        pre = load_run_config(args.configs, args.overrides, validate=False)
        cfg = load_run_config(args.configs, args.overrides, world_size=world_size_for(pre))
        user_args = list(args.configs) + [a for o in args.overrides for a in ("--set", o)]
        ds_args = runner_args(cfg, args.script, user_args)
    except ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return 2
    if args.dry_run:
        print("deepspeed " + " ".join(ds_args))
        return 0
    from deepspeed.launcher.runner import main as ds_main
    return ds_main(ds_args) or 0


if __name__ == "__main__":
    sys.exit(main())
