"""End to end through the user's command line: deepy.py -> DeepSpeed launcher -> train.py workers."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import psutil
import pytest

from megatron.testing.configs import DATA, REPO, TINY


def _metrics(path):
    with open(path) as fh:
        return [json.loads(line) for line in fh]


def _deepy(config, workdir, extra=(), **popen):
    cmd = [sys.executable, "deepy.py", "train.py", os.path.join(TINY, config),
           "--set", f"logging.dir={workdir}/logs", "--set", f"checkpoint.save={workdir}/ckpt",
           "--set", f"data.cache_dir={workdir}/cache", "train.progress_bar=false"] + list(extra)
    # launcher.master_port is left unset: deepy picks a free port, so parallel test runs never collide.
    return subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **popen)


def test_deepy_tiny_sft_loss_falls(tmp_path):
    proc = _deepy("sft.yml", tmp_path, ["--set", "train.iters=60", "--set", "checkpoint.interval=0",
                                        "--set", "logging.wandb_project=tiny-test"],
                  env={**{k: v for k, v in os.environ.items() if k not in ("WANDB_API_KEY", "WANDB_MODE")},
                       "NETRC": os.devnull})  # no credentials anywhere: offline
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out[-3000:]
    rows = [r for r in _metrics(tmp_path / "logs" / "metrics.jsonl") if "loss" in r]
    assert [r["step"] for r in rows] == list(range(10, 61, 10))
    for key in ("loss", "lr", "grad_norm", "tokens_per_s", "samples_per_s", "nll"):
        assert key in rows[0], key
    assert rows[-1]["loss"] < rows[0]["loss"] - 0.5, [r["loss"] for r in rows]
    evals = [r for r in _metrics(tmp_path / "logs" / "metrics.jsonl") if "eval/loss" in r]
    assert evals[0]["step"] == 0 and evals[-1]["eval/loss"] < evals[0]["eval/loss"]
    assert (tmp_path / "ckpt" / "latest").read_text().strip() == "step_0000060"
    # wandb ran offline (no key, no prompt) and recorded the run.
    runs = list((tmp_path / "logs" / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(runs) == 1 and runs[0].stat().st_size > 0
    # The end-of-run summary: final/best eval, where the checkpoint and metrics are, how to export.
    assert "run summary: step 60 of 60" in out and "best eval: eval/loss" in out
    assert f"checkpoint: {tmp_path}/ckpt/step_0000060" in out
    assert f"convert_megatron_to_hf.py --ckpt {tmp_path}/ckpt --out {tmp_path}/logs/hf" in out


def _kill_tree(proc):
    """Never leave training workers behind when a test fails half-way."""
    if proc.poll() is None:
        for child in psutil.Process(proc.pid).children(recursive=True):
            child.kill()
        proc.kill()


def test_deepy_two_cpu_ranks_and_sigterm_saves(tmp_path):
    proc = _deepy("sft.yml", tmp_path, ["--set", "launcher.num_gpus=2", "--set", "train.micro_batch_size=8",
                                        "--set", "train.iters=100000", "--set", "train.log_interval=1",
                                        "--set", "checkpoint.interval=0"])
    try:
        metrics = tmp_path / "logs" / "metrics.jsonl"
        deadline = time.time() + 300
        while time.time() < deadline and proc.poll() is None:
            if metrics.exists() and sum(1 for r in _metrics(metrics) if "loss" in r) >= 3:
                break
            time.sleep(0.5)
        assert proc.poll() is None, proc.communicate()[0][-3000:]
        # What Slurm does to every task before preemption: SIGTERM to each worker process.
        workers = [c for c in psutil.Process(proc.pid).children(recursive=True)
                   if any(part.endswith("train.py") for part in c.cmdline())
                   and not any("deepspeed.launcher" in part for part in c.cmdline())]
        assert len(workers) == 2
        for w in workers:
            w.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=300)
    finally:
        _kill_tree(proc)
    assert proc.returncode == 0, out[-3000:]
    assert "SIGTERM received" in out
    tag = (tmp_path / "ckpt" / "latest").read_text().strip()
    step = int(tag.split("_")[1])
    assert step >= 3 and (tmp_path / "ckpt" / tag / "meta.json").exists()
    meta = json.loads((tmp_path / "ckpt" / tag / "meta.json").read_text())
    assert meta["data_parallel"] == 2 and meta["consumed_samples"] == step * 16


def test_deepy_rejects_bad_config_before_launch(tmp_path):
    proc = _deepy("sft.yml", tmp_path, ["--set", "launcher.num_gpus=3", "--set", "parallel.tensor=2"])
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 2
    assert "world size 3 is not divisible by parallel.tensor * parallel.pipeline = 2 * 1 = 2" in out
    proc = _deepy("sft.yml", tmp_path, ["--set", "train.itres=5"])
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 2 and "did you mean 'iters'" in out


@pytest.mark.mpi
@pytest.mark.skipif(shutil.which("mpirun") is None,
                    reason="OpenMPI's mpirun is not installed (optional for users; .ci/run installs openmpi-bin "
                           "and fails without it)")
def test_mpirun_two_ranks(tmp_path):
    proc = _deepy("sft.yml", tmp_path, ["--set", "launcher.type=openmpi", "--set", "launcher.num_gpus=2", "--set", "train.micro_batch_size=8",
                                        "--set", "train.iters=4", "--set", "train.log_interval=1"])
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out[-3000:]
    assert "mpirun" in out or (tmp_path / "logs" / "hostfile").exists()
    meta = json.loads((tmp_path / "ckpt" / "step_0000004" / "meta.json").read_text())
    assert meta["world_size"] == 2 and meta["data_parallel"] == 2
