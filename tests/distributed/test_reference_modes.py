"""reference.mode=precomputed equals reference.mode=live.

- DPO and KTO: the same first-step loss, the same losses over 3 steps and the same held-out eval losses
  (fp32, 1e-6), with the reference values written by `precompute_reference` (train and valid split).
- Precomputing on 2 ranks (data-parallel through deepy.py and the CLI, and tensor-parallel) writes the same
  values as on 1 rank.
- Training with reference.mode=precomputed and no values computes them at start-up, on all ranks (data=2, and
  pipeline=2 folded into data parallelism for that pass): the same cached values and the same run as after
  tools/precompute_reference.py. Values from another reference are an error naming the file and the tool.
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


def _with_and_without_tool(rank, world_size, workdir):
    """DPO at data=2: (a) tools' precompute then train; (b) train only (values computed at start-up);
    (c) pipeline=2 x data=1 train only; (d) (b)'s cache with another seed: stale values, an error."""
    from megatron.config import ConfigError
    from megatron.engines.precompute import precompute_reference
    from megatron.testing.configs import tiny_test_config
    from megatron.training.trainer import run_training

    def cfg(name, extra=()):
        over = _overrides(workdir, "dpo", "precomputed") + [f"data.cache_dir={workdir}/{name}_cache"] + list(extra)
        return tiny_test_config(f"{workdir}/{name}", "dpo", world_size, over, iters=3)

    tool = cfg("tool")
    written = precompute_reference(tool).paths
    out = {"tool": run_training(tool).history, "tool_paths": written}
    out["auto"] = run_training(cfg("auto")).history
    out["piped"] = run_training(cfg("piped", ["parallel.pipeline=2"])).history
    try:
        run_training(cfg("auto", ["train.seed=7"]))
        out["stale"] = "no error"
    except ConfigError as exc:
        out["stale"] = str(exc)
    return out


def _values(cache):
    """{split: values} of the .ref_logps.npy files under a data cache directory."""
    files = sorted(str(p) for p in cache.glob("*/data.ref_logps.npy"))
    return {("valid" if "_valid" in f else "train"): np.load(f) for f in files}


def test_precomputed_without_the_tool_equals_after_the_tool(tmp_path):
    runs = run_distributed(_with_and_without_tool, 2, str(tmp_path))
    out = runs[0]
    tool = _values(tmp_path / "tool_cache")
    assert set(tool) == {"train", "valid"} and tool["train"].shape == (2 * SUBSET,)
    assert {s: np.load(p) for s, p in out["tool_paths"].items()}.keys() == tool.keys()
    for name in ("auto", "piped"):  # computed at start-up by the training launch: the tool's values
        got = _values(tmp_path / f"{name}_cache")
        assert set(got) == {"train", "valid"}, name
        for split in tool:
            np.testing.assert_allclose(got[split], tool[split], rtol=0, atol=1e-6, err_msg=f"{name} {split}")
    losses = {k: [r["loss"] for r in out[k] if "loss" in r] for k in ("tool", "auto", "piped")}
    evals = {k: [(r["step"], r["eval/loss"]) for r in out[k] if "eval/loss" in r] for k in ("tool", "auto", "piped")}
    assert len(losses["tool"]) == 3 and [s for s, _ in evals["tool"]] == [0, 3]
    assert losses["auto"] == pytest.approx(losses["tool"], abs=1e-6, rel=0)  # the same run, step for step
    assert evals["auto"] == [(s, pytest.approx(v, abs=1e-6, rel=0)) for s, v in evals["tool"]]
    assert losses["piped"] == pytest.approx(losses["tool"], abs=1e-5, rel=0)
    assert abs(losses["tool"][-1] - losses["tool"][0]) > 1e-3  # the policy moved: the reference values matter
    assert [r["loss"] for r in runs[1]["auto"] if "loss" in r] == losses["auto"]  # every rank logged the same
    # Values from another reference (another seed = another seeded initial model) are not silently used.
    stale, values = out["stale"], str(next((tmp_path / "auto_cache").glob("pairwise.jsonl-*")) / "data.ref_logps.npy")
    assert values in stale and "train.seed=1234" in stale and "train.seed=7" in stale, stale
    assert "tools/precompute_reference.py" in stale and "delete" in stale, stale
