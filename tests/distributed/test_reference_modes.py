"""reference.mode=precomputed equals reference.mode=live.

- DPO and KTO: the same first-step loss, the same losses over 3 steps and the same held-out eval losses
  (fp32, 1e-6), with the reference values written by `precompute_reference` (train and valid split).
- Precomputing on 2 ranks (data-parallel through deepy.py and the CLI, and tensor-parallel) writes the same
  values as on 1 rank.
- Training with reference.mode=precomputed and no values fails with an error naming the file and the tool.
"""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from megatron.testing.configs import DATA, REPO, TINY
from megatron.testing.distributed import run_distributed

_TRAIN = {"dpo": "pairwise.jsonl", "kto": "unpaired.jsonl"}
_VALID = {"dpo": "pairwise_valid.jsonl", "kto": "unpaired_valid.jsonl"}
SUBSET = 96  # training examples: enough for 3 steps of 4, small enough to precompute in a moment


def _subset(workdir, objective):
    """The first SUBSET records of the tiny training file, as a file in `workdir`."""
    os.makedirs(workdir, exist_ok=True)
    path = os.path.join(workdir, _TRAIN[objective])
    with open(os.path.join(DATA, _TRAIN[objective])) as src, open(path, "w") as dst:
        dst.writelines(line for _, line in zip(range(SUBSET), src))
    return path


def _overrides(workdir, objective, mode):
    return [f"reference.mode={mode}", f"data.train_path={_subset(workdir, objective)}",
            f"data.valid_path={os.path.join(DATA, _VALID[objective])}", "train.eval_interval=3", "train.eval_iters=2"]


def _live_vs_precomputed(rank, world_size, workdir, objective):
    from megatron.testing.configs import tiny_test_config
    from megatron.engines.precompute import precompute_reference
    from megatron.training.trainer import run_training

    live = run_training(tiny_test_config(f"{workdir}/live", objective, world_size,
                                         _overrides(workdir, objective, "live"), iters=3)).history
    cfg = tiny_test_config(f"{workdir}/pre", objective, world_size, _overrides(workdir, objective, "precomputed"),
                           iters=3)
    written = precompute_reference(cfg)
    pre = run_training(cfg).history
    return live, pre, written.paths


@pytest.mark.parametrize("objective", ["dpo", "kto"])
def test_precomputed_equals_live(tmp_path, objective):
    live, pre, paths = run_distributed(_live_vs_precomputed, 1, str(tmp_path), objective)[0]
    assert set(paths) == {"train", "valid"} and all(os.path.exists(p) for p in paths.values())
    train_live = [r["loss"] for r in live if "loss" in r]
    train_pre = [r["loss"] for r in pre if "loss" in r]
    assert len(train_live) == 3 and len(train_pre) == 3
    assert train_pre[0] == pytest.approx(train_live[0], abs=1e-6, rel=0)  # the first step
    assert train_pre == pytest.approx(train_live, abs=1e-6, rel=0)
    eval_live = [(r["step"], r["eval/loss"]) for r in live if "eval/loss" in r]
    eval_pre = [(r["step"], r["eval/loss"]) for r in pre if "eval/loss" in r]
    assert [s for s, _ in eval_live] == [0, 3] and [s for s, _ in eval_pre] == [0, 3]
    assert [v for _, v in eval_pre] == pytest.approx([v for _, v in eval_live], abs=1e-6, rel=0)
    # The policy moved away from the reference, so the reference values really enter the later losses.
    assert abs(train_live[-1] - train_live[0]) > 1e-3 and abs(eval_live[1][1] - eval_live[0][1]) > 1e-4


def _precompute(rank, world_size, workdir, runs):
    from megatron.testing.configs import tiny_test_config
    from megatron.engines.precompute import precompute_reference

    out = []
    for name, objective, overrides in runs:
        cfg = tiny_test_config(f"{workdir}/{name}", objective, world_size,
                               _overrides(workdir, objective, "precomputed")
                               + ["train.micro_batch_size=4", "train.global_batch_size=8"] + overrides)
        out.append(precompute_reference(cfg).paths)
    return out


def _load(paths):
    return {split: np.load(path) for split, path in paths.items()}


def test_two_ranks_write_the_same_values_as_one(tmp_path):
    runs = [("dpo", "dpo", []), ("kto", "kto", [])]
    single = [_load(p) for p in run_distributed(_precompute, 1, str(tmp_path / "one"), runs)[0]]
    two = run_distributed(_precompute, 2, str(tmp_path / "two"),
                          runs + [("kto_tp", "kto", ["parallel.tensor=2"])])[0]
    dp_dpo, dp_kto, tp_kto = (_load(p) for p in two)
    for got, want in ((dp_dpo, single[0]), (dp_kto, single[1])):
        assert set(got) == set(want) == {"train", "valid"}
        for split in want:
            # Each micro-batch is the same whatever the rank count: identical values.
            np.testing.assert_allclose(got[split], want[split], rtol=0, atol=1e-6)
    for split in single[1]:  # tensor-parallel: another summation order, the same values to fp32 rounding
        np.testing.assert_allclose(tp_kto[split], single[1][split], rtol=1e-5, atol=1e-4)
    # Unpaired data: one value per stored sequence plus one per KL sequence, and the KL seed recorded.
    kto_train = two[1]["train"]
    meta = json.load(open(kto_train.replace(".ref_logps.npy", ".meta.json")))
    assert dp_kto["train"].shape == (meta["num_sequences"] + meta["num_examples"],)
    assert json.load(open(kto_train.replace(".npy", ".json"))) == {"kl_seed": 1234}
    assert np.all(dp_kto["train"] < 0) and np.all(np.isfinite(dp_kto["train"]))

    # The command line, on 2 ranks through deepy.py (which must pass configs and overrides through unchanged).
    cache = tmp_path / "cli_cache"
    cmd = [sys.executable, "deepy.py", "tools/precompute_reference.py", os.path.join(TINY, "dpo.yml"),
           "--set", "model.max_seq_len=64", "--set", "launcher.num_gpus=2", "--set", f"data.cache_dir={cache}",
           "--set", "train.micro_batch_size=4", "--set", "train.global_batch_size=8",
           "--set", f"data.train_path={_subset(str(tmp_path), 'dpo')}",
           "--set", f"data.valid_path={os.path.join(DATA, 'pairwise_valid.jsonl')}",
           "--set", f"logging.dir={tmp_path / 'cli_logs'}", "--set", f"launcher.master_port={29900 + os.getpid() % 90}"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    files = sorted(str(p) for p in cache.glob("*/data.ref_logps.npy"))
    assert len(files) == 2, files
    by_split = {("valid" if "pairwise_valid" in f else "train"): np.load(f) for f in files}
    assert by_split["train"].shape == (2 * SUBSET,)
    for split in ("train", "valid"):
        np.testing.assert_allclose(by_split[split], single[0][split], rtol=0, atol=1e-6)


def _train_expecting_errors(rank, world_size, workdir):
    from megatron.config import ConfigError
    from megatron.testing.configs import tiny_test_config
    from megatron.engines.precompute import precompute_reference
    from megatron.training.trainer import run_training

    def error_of(cfg):
        try:
            run_training(cfg)
        except ConfigError as exc:
            return str(exc)
        return "no error"

    over = [f"data.train_path={_subset(workdir, 'dpo')}", "reference.mode=precomputed"]
    missing = error_of(tiny_test_config(workdir, "dpo", world_size, over, iters=1))
    precompute_reference(tiny_test_config(workdir, "dpo", world_size, over, iters=1))
    # Another seed is another seeded initial model: the stored values are not this run's reference.
    stale = error_of(tiny_test_config(workdir, "dpo", world_size, over + ["train.seed=7"], iters=1))
    return missing, stale


def test_missing_or_stale_precomputed_values_are_clear_errors(tmp_path):
    missing, stale = run_distributed(_train_expecting_errors, 1, str(tmp_path))[0]
    cached = [p for p in (tmp_path / "data_cache").iterdir() if p.name.startswith("pairwise.jsonl-")]
    assert len(cached) == 1
    values = str(cached[0] / "data.ref_logps.npy")
    assert values in missing and "does not exist" in missing, missing
    assert "data.train_path" in missing and "tools/precompute_reference.py" in missing, missing
    assert values in stale and "train.seed=1234" in stale and "train.seed=7" in stale, stale
    assert "tools/precompute_reference.py" in stale, stale
