"""deepy.py's translation of `launcher:` into DeepSpeed runner arguments, and rank discovery per launcher."""
import pytest

from megatron.config import ConfigError, load_config
from megatron.mpu.distributed import _first_slurm_host, launcher_env
from megatron.training.launcher import runner_args, world_size_for


def _cfg(tmp_path, *sets):
    pre = load_config([], list(sets), validate=False)
    return load_config([], list(sets), world_size=world_size_for(pre))


def test_local_and_hostfile(tmp_path):
    cfg = _cfg(tmp_path, "launcher.num_gpus=2", "train.micro_batch_size=2", "train.global_batch_size=4")
    args = runner_args(cfg, "train.py", ["a.yml"])
    assert args[-2:] == ["train.py", "a.yml"] and args[args.index("--num_gpus") + 1] == "2"
    hf = tmp_path / "hosts"
    hf.write_text("node1 slots=4\nnode2 slots=4  # comment\n")
    cfg = _cfg(tmp_path, "launcher.type=hostfile", f"launcher.hostfile={hf}", "train.global_batch_size=32")
    assert cfg.derived.world_size == 8 and cfg.derived.data_parallel == 8
    args = runner_args(cfg, "train.py", [])
    assert args[args.index("--hostfile") + 1] == str(hf) and args[args.index("--launcher") + 1] == "pdsh"
    bad = tmp_path / "bad"
    bad.write_text("node1 slots=four\n")
    with pytest.raises(ConfigError, match=r"bad:1: expected 'hostname slots=N'"):
        _cfg(tmp_path, "launcher.type=hostfile", f"launcher.hostfile={bad}")


def test_openmpi_writes_local_hostfile_and_passes_master(tmp_path):
    cfg = _cfg(tmp_path, "launcher.type=openmpi", "launcher.num_gpus=2", f"logging.dir={tmp_path}",
               "train.micro_batch_size=2", "train.global_batch_size=4")
    args = runner_args(cfg, "train.py", [])
    assert (tmp_path / "hostfile").read_text() == "localhost slots=2\n"
    mpi = args[args.index("--launcher_args") + 1]
    assert "MASTER_ADDR=127.0.0.1" in mpi and args[args.index("--launcher") + 1] == "openmpi"


def test_rank_discovery_from_each_launcher():
    assert launcher_env({"RANK": "3", "WORLD_SIZE": "4"}) == {}
    ompi = launcher_env({"OMPI_COMM_WORLD_RANK": "1", "OMPI_COMM_WORLD_SIZE": "2", "OMPI_COMM_WORLD_LOCAL_RANK": "1",
                         "MASTER_ADDR": "10.0.0.1"})
    assert ompi == {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "MASTER_PORT": "29500"}
    slurm = launcher_env({"SLURM_PROCID": "5", "SLURM_NTASKS": "16", "SLURM_LOCALID": "1",
                          "SLURM_JOB_NODELIST": "gpu[007-008,010]"})
    assert slurm["RANK"] == "5" and slurm["WORLD_SIZE"] == "16" and slurm["MASTER_ADDR"] == "gpu007"
    mpich = launcher_env({"PMI_RANK": "0", "PMI_SIZE": "2"})
    assert mpich["RANK"] == "0" and mpich["LOCAL_RANK"] == "0"
    assert _first_slurm_host("node1,node2") == "node1"


def _listening_socket():
    import socket
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("0.0.0.0", 0))
    sock.listen()
    return sock, sock.getsockname()[1]


def test_unset_master_port_is_a_free_one(tmp_path):
    from megatron.training.launcher import port_in_use
    cfg = _cfg(tmp_path)
    assert cfg.launcher.master_port is None
    args = runner_args(cfg, "train.py", [])
    port = int(args[args.index("--master_port") + 1])
    assert 0 < port < 65536 and not port_in_use(port)


def test_taken_master_port_names_the_key(tmp_path):
    from megatron.training.launcher import port_in_use
    sock, port = _listening_socket()
    try:
        assert port_in_use(port)
        cfg = _cfg(tmp_path, f"launcher.master_port={port}")
        with pytest.raises(ConfigError, match=rf"launcher.master_port={port} is already in use on this machine.*"
                                              r"leave launcher.master_port unset"):
            runner_args(cfg, "train.py", [])
        # Rank 0 on another host: the port cannot be checked from here and is passed through.
        hosts = tmp_path / "hosts"
        hosts.write_text("node1 slots=1\nnode2 slots=1\n")
        cfg = _cfg(tmp_path, "launcher.type=hostfile", f"launcher.hostfile={hosts}", f"launcher.master_port={port}",
                   "train.micro_batch_size=1", "train.global_batch_size=2")
        args = runner_args(cfg, "train.py", [])
        assert args[args.index("--master_port") + 1] == str(port)
    finally:
        sock.close()
    assert not port_in_use(port)
    args = runner_args(_cfg(tmp_path, f"launcher.master_port={port}"), "train.py", [])
    assert args[args.index("--master_port") + 1] == str(port)


def test_openmpi_workers_get_the_chosen_port(tmp_path):
    cfg = _cfg(tmp_path, "launcher.type=openmpi", "launcher.num_gpus=2", f"logging.dir={tmp_path}",
               "train.micro_batch_size=2", "train.global_batch_size=4")
    args = runner_args(cfg, "train.py", [])
    port = args[args.index("--master_port") + 1]
    assert f"MASTER_PORT={port}" in args[args.index("--launcher_args") + 1]


def test_train_py_says_which_port_is_taken(tmp_path):
    """A worker whose rendezvous port is held by another job: one line naming it and the key, no traceback."""
    import os
    import subprocess
    import sys
    from megatron.testing.configs import REPO, TINY
    sock, port = _listening_socket()
    env = dict(os.environ, RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    try:
        proc = subprocess.run([sys.executable, "train.py", os.path.join(TINY, "sft.yml"), "--set",
                               f"logging.dir={tmp_path}/logs", "checkpoint.save=null", "train.progress_bar=false",
                               f"data.cache_dir={tmp_path}/cache"],
                              cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    finally:
        sock.close()
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert f"error: the master port 127.0.0.1:{port} is already in use" in proc.stderr
    assert "launcher.master_port" in proc.stderr and "Traceback" not in proc.stderr


def test_lone_process_gets_a_free_port():
    from megatron.training.launcher import ensure_master_port, port_in_use
    env = {}
    ensure_master_port(env)
    assert not port_in_use(int(env["MASTER_PORT"]))
    launched = {"RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "10.0.0.1"}
    ensure_master_port(launched)
    assert "MASTER_PORT" not in launched  # the launcher's ranks must agree on theirs
    given = {"MASTER_PORT": "12345"}
    ensure_master_port(given)
    assert given["MASTER_PORT"] == "12345"
