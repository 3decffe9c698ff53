"""Turn a validated config into DeepSpeed runner arguments (`deepspeed.launcher.runner`).

local    -> N worker processes on this machine (`launcher.num_gpus`; CPU ranks where there is no GPU)
hostfile -> multi-node over pdsh from `launcher.hostfile` ("host slots=N" lines)
slurm    -> srun inside an allocation (`configs/slurm/*.sbatch`)
openmpi / mpich -> mpirun; without a hostfile, one is written for localhost with `num_gpus` slots
"""
from __future__ import annotations

import errno
import os
import socket
from typing import List, Optional, Sequence

from megatron.config import Config, ConfigError


def read_hostfile(path: str) -> List[tuple]:
    """[(host, slots)] from a DeepSpeed/OpenMPI hostfile; errors name the file and line."""
    if not os.path.exists(path):
        raise ConfigError(f"launcher.hostfile: {path} does not exist")
    hosts = []
    with open(path, "r", encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            line = line.split("#", 1)[0].strip()
            if not line:
                continue
            parts = line.split()
            slots = [p for p in parts[1:] if p.startswith("slots=")]
            if not slots or not slots[0][6:].isdigit():
                raise ConfigError(f"{path}:{lineno}: expected 'hostname slots=N', got {line!r}")
            hosts.append((parts[0], int(slots[0][6:])))
    if not hosts:
        raise ConfigError(f"{path}: no hosts listed")
    return hosts


def world_size_for(cfg: Config) -> int:
    """Number of ranks the configured launcher will start.

    With a hostfile (types hostfile/openmpi/mpich) every listed slot of the first `launcher.num_nodes`
    hosts (all hosts when num_nodes is 1) is a rank; otherwise num_gpus * num_nodes.
    """
    lc = cfg.launcher
    if lc.hostfile and lc.type in ("hostfile", "openmpi", "mpich"):
        hosts = read_hostfile(lc.hostfile)
        if lc.num_nodes > 1:
            if lc.num_nodes > len(hosts):
                raise ConfigError(f"launcher.num_nodes={lc.num_nodes} but {lc.hostfile} lists {len(hosts)} hosts")
            hosts = hosts[: lc.num_nodes]
        return sum(slots for _, slots in hosts)
    return lc.num_gpus * lc.num_nodes


_LOCAL_NAMES = ("localhost", "127.0.0.1", "::1")


def port_in_use(port: int) -> bool:
    """True when a process on this machine listens on TCP `port` (any address), as torch's TCPStore would find.

    Binds with SO_REUSEADDR like the store does, so a port held only by closing (TIME_WAIT) sockets is free.
    """
    for family, addr in ((socket.AF_INET, "0.0.0.0"), (socket.AF_INET6, "::")):
        try:
            sock = socket.socket(family, socket.SOCK_STREAM)
        except OSError:  # no IPv6 on this machine
            continue
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind((addr, port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                return True
        finally:
            sock.close()
    return False


def free_port() -> int:
    """A TCP port nobody listens on now (the kernel's choice of an ephemeral port)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("", 0))
        return int(sock.getsockname()[1])


def ensure_master_port(environ=None) -> None:
    """Give a lone process started without a launcher (world size 1, no MASTER_PORT) a free rendezvous port, so
    two single-process runs on one machine never collide on torch's default 29500."""
    from megatron.mpu.distributed import world_size_from_env

    env = os.environ if environ is None else environ
    if world_size_from_env(env) == 1 and "MASTER_PORT" not in env:
        env["MASTER_PORT"] = str(free_port())


def _master_is_here(cfg: Config) -> bool:
    """Whether rank 0 (which opens the master port) runs on this machine, as far as the config tells."""
    lc = cfg.launcher
    names = _LOCAL_NAMES + (socket.gethostname(),)
    if lc.master_addr:
        return lc.master_addr in names
    if lc.type == "local":
        return True
    if lc.type in ("hostfile", "openmpi", "mpich") and lc.hostfile and os.path.exists(lc.hostfile):
        return read_hostfile(lc.hostfile)[0][0] in names
    return lc.type in ("openmpi", "mpich")  # no hostfile: one is written for localhost


def resolve_master_port(cfg: Config) -> int:
    """The rendezvous port: `launcher.master_port`, or a free port of this machine when it is unset.

    A set port that is already taken here (another job) is a ConfigError naming the key, instead of the
    workers' EADDRINUSE traceback; when rank 0 runs on another host the port cannot be checked from here.
    """
    port = cfg.launcher.master_port
    if port is None:
        return free_port()
    if not 0 < port < 65536:
        raise ConfigError(f"launcher.master_port={port} is not a TCP port (1-65535); leave it unset to use a "
                          "free port")
    if _master_is_here(cfg) and port_in_use(port):
        raise ConfigError(f"launcher.master_port={port} is already in use on this machine (another training "
                          "job?); leave launcher.master_port unset to use a free port, or choose another with "
                          "--set launcher.master_port=N")
    return port


def runner_args(cfg: Config, user_script: str, user_args: Sequence[str],
                scratch_dir: Optional[str] = None) -> List[str]:
    """Arguments for `deepspeed.launcher.runner.main` that start `user_script user_args` on every rank.

    The rendezvous port is `resolve_master_port(cfg)`: a free one when `launcher.master_port` is unset.
    """
    lc = cfg.launcher
    port = resolve_master_port(cfg)
    args: List[str] = ["--master_port", str(port)]
    if lc.master_addr:
        args += ["--master_addr", lc.master_addr]
    if lc.type == "local":
        args += ["--num_gpus", str(lc.num_gpus), "--num_nodes", "1", "--no_local_rank"]
    elif lc.type == "hostfile":
        if not lc.hostfile:
            raise ConfigError("launcher.type=hostfile needs launcher.hostfile (lines 'host slots=N')")
        read_hostfile(lc.hostfile)
        args += ["--hostfile", lc.hostfile, "--launcher", "pdsh", "--no_local_rank"]
        if lc.num_nodes > 1:
            args += ["--num_nodes", str(lc.num_nodes)]
        if lc.include:
            args += ["--include", lc.include]
        if lc.exclude:
            args += ["--exclude", lc.exclude]
    elif lc.type == "slurm":
        args += ["--launcher", "slurm", "--no_local_rank", "--num_nodes", str(lc.num_nodes),
                 "--num_gpus", str(lc.num_gpus)]
        if lc.hostfile:
            args += ["--hostfile", lc.hostfile]
    elif lc.type in ("openmpi", "mpich"):
        hostfile = lc.hostfile
        if not hostfile:
            scratch = scratch_dir or cfg.logging.dir
            os.makedirs(scratch, exist_ok=True)
            hostfile = os.path.join(scratch, "hostfile")
            with open(hostfile, "w", encoding="utf-8") as fh:
                fh.write(f"localhost slots={lc.num_gpus}\n")
        hosts = read_hostfile(hostfile)
        first = lc.master_addr or ("127.0.0.1" if hosts[0][0] == "localhost" else hosts[0][0])
        mpi_args = list(lc.extra_args)
        if lc.type == "openmpi":
            # Rank 0's address travels as env vars: our workers read OMPI_COMM_WORLD_* and need no mpi4py.
            mpi_args += ["-x", f"MASTER_ADDR={first}", "-x", f"MASTER_PORT={port}"]
            if not any("btl_tcp_if" in a for a in mpi_args):
                mpi_args += ["--mca", "btl_tcp_if_include", "lo" if hosts[0][0] == "localhost" else "eth0"]
            if hasattr(os, "geteuid") and os.geteuid() == 0:
                mpi_args.append("--allow-run-as-root")
        else:
            mpi_args += ["-genv", "MASTER_ADDR", first, "-genv", "MASTER_PORT", str(port)]
        if not lc.master_addr:  # else DeepSpeed's runner asks the first host over ssh
            args += ["--master_addr", first]
        args += ["--hostfile", hostfile, "--launcher", lc.type, "--force_multi", "--no_ssh_check",
                 "--launcher_args", " ".join(mpi_args)]
    else:  # validated earlier; kept for a clear message if the schema grows
        raise ConfigError(f"launcher.type={lc.type!r} is not supported")
    if lc.type not in ("openmpi", "mpich"):
        args += list(lc.extra_args)
    return args + [user_script] + list(user_args)
