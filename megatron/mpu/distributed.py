"""Start torch.distributed from whatever launched us: deepspeed/torchrun, Slurm's srun, OpenMPI or MPICH.

Launchers publish rank information under different names; we translate them to the torch.distributed
`env://` variables (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT) before initialising, so
`train.py` works the same under every launcher without mpi4py.
"""
from __future__ import annotations

import os
import re
from typing import Dict, Mapping, Optional

# (rank, world size, local rank) variable names per launcher, checked in this order.
_LAUNCHER_VARS = (
    ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK"),  # OpenMPI
    ("PMI_RANK", "PMI_SIZE", "MPI_LOCALRANKID"),  # MPICH / Intel MPI (Hydra)
    ("SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID"),  # srun
)


def _first_slurm_host(nodelist: str) -> str:
    """First host of a Slurm nodelist such as 'node[003-005,009],gpu1' -> 'node003'."""
    m = re.match(r"([^\[,]+)(\[([^\]]+)\])?", nodelist)
    if not m:
        return nodelist
    prefix, _, ranges = m.groups()
    if not ranges:
        return prefix
    first = ranges.split(",")[0].split("-")[0]
    return prefix + first


def launcher_env(env: Mapping[str, str]) -> Dict[str, str]:
    """The env:// variables implied by `env` (empty when RANK/WORLD_SIZE are already set)."""
    if "RANK" in env and "WORLD_SIZE" in env:
        return {}
    for rank_key, size_key, local_key in _LAUNCHER_VARS:
        if rank_key in env and size_key in env:
            out = {"RANK": env[rank_key], "WORLD_SIZE": env[size_key], "LOCAL_RANK": env.get(local_key, "0")}
            if "MASTER_ADDR" not in env:
                if "SLURM_JOB_NODELIST" in env:
                    out["MASTER_ADDR"] = _first_slurm_host(env["SLURM_JOB_NODELIST"])
                else:
                    out["MASTER_ADDR"] = "127.0.0.1"
            if "MASTER_PORT" not in env:
                out["MASTER_PORT"] = "29500"
            return out
    return {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": env.get("MASTER_ADDR", "127.0.0.1"),
            "MASTER_PORT": env.get("MASTER_PORT", "29500")}


def init_distributed(backend: str = "auto") -> None:
    """Initialise torch.distributed (idempotent) through DeepSpeed so its comm layer knows the group.

    backend: 'auto' picks nccl when CUDA is available, else gloo.
    """
    import torch
    import deepspeed

    os.environ.update(launcher_env(os.environ))
    if backend == "auto":
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    # Also binds DeepSpeed's comm layer when a process group already exists (tests spawn their own).
    deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False)


def world_size_from_env(env: Optional[Mapping[str, str]] = None) -> int:
    """World size a worker will see, from env:// or launcher variables (1 when not launched)."""
    env = os.environ if env is None else env
    merged = dict(env)
    merged.update(launcher_env(env))
    return int(merged.get("WORLD_SIZE", "1"))


def shutdown_distributed() -> None:
    """Destroy the process group before interpreter exit; gloo's C++ threads may otherwise abort the
    process at exit ("terminate called without an active exception"), turning a finished run into a crash."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
