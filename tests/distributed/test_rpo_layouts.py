"""RPO trains the same in every layout, with a live or a precomputed reference.

- One rank, live reference, the three loss types: the first step's loss is the float64 formula at a zero implicit
  margin (policy = reference), D[0 || eta (score_chosen - score_rejected)] averaged over the first 4 records, so
  the reward margins reach the loss pair by pair through the data path.
- tensor=2, pipeline=2 and data=2 (2 gloo ranks) give the single rank's per-step losses and metrics (fp32, 1e-5).
- reference.mode=precomputed (values written by precompute_reference, here on 2 data-parallel ranks) gives
  the live reference's losses.
"""
import json
import math
import os

import pytest

from megatron.testing.configs import DATA
from megatron.testing.distributed import run_distributed

SUBSET = 48  # records: 3 steps of 4 pairs and quick to precompute
ETA, BETA = 0.7, 0.1
IGNORED = ("tokens_per_s", "samples_per_s")


def _scored_subset(root):
    """The first SUBSET tiny pairs with reward-model scores (a known margin per record), as a JSONL file."""
    path = os.path.join(root, "scored_pairs.jsonl")
    with open(os.path.join(DATA, "pairwise.jsonl")) as src, open(path, "w") as dst:
        for i, line in zip(range(SUBSET), src):
            rec = json.loads(line)
            rec["margin"] = 0.5 + 0.5 * (i % 5)  # score_chosen - score_rejected
            dst.write(json.dumps(rec) + "\n")
    return path


def _runs(root, side):
    """[(name, overrides, precompute)]: side 'single' (1 rank) or 'two' (2 ranks)."""
    common = [f"data.train_path={os.path.join(root, 'scored_pairs.jsonl')}", "data.shuffle=false",
              f"objective.eta={ETA}", f"objective.beta={BETA}", f"data.cache_dir={root}/cache"]
    bwd = common + ["objective.loss_type=bwd_kl"]
    if side == "single":
        return [("bwd_kl", bwd, False), ("fwd_kl", common + ["objective.loss_type=fwd_kl"], False),
                ("sq", common + ["objective.loss_type=sq"], False)]
    return [("tensor2", bwd + ["parallel.tensor=2"], False),
            ("pipeline2", bwd + ["parallel.pipeline=2"], False),
            ("data2", bwd, False),
            ("data2_pre", bwd + ["reference.mode=precomputed"], True)]


def _train(rank, world_size, root, side):
    from megatron.engines.precompute import precompute_reference
    from megatron.testing.configs import tiny_test_config
    from megatron.training.trainer import run_training

    out = {}
    for name, overrides, precompute in _runs(root, side):
        # tiny_test_config takes the dpo defaults; the overrides make it rpo
        cfg = tiny_test_config(f"{root}/{side}/{name}", "dpo", world_size, ["objective.name=rpo"] + overrides, iters=3)
        if precompute:
            precompute_reference(cfg)
        out[name] = run_training(cfg).history
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("rpo"))
    _scored_subset(root)
    single = run_distributed(_train, 1, root, "single")[0]
    two = run_distributed(_train, 2, root, "two")
    return single, two


def _rows(history):
    return [r for r in history if "loss" in r]


def _sig(x):
    return 1.0 / (1.0 + math.exp(-x))


def _first_loss(loss_type):
    """Step 1 (records 0-3, no shuffling), policy = reference so a = 0, b = eta * margin."""
    total = 0.0
    for i in range(4):
        b = ETA * (0.5 + 0.5 * (i % 5))
        if loss_type == "bwd_kl":
            total += _sig(b) * math.log(_sig(b) / 0.5) + _sig(-b) * math.log(_sig(-b) / 0.5)
        elif loss_type == "fwd_kl":
            total += 0.5 * math.log(0.5 / _sig(b)) + 0.5 * math.log(0.5 / _sig(-b))
        else:
            total += b * b
    return total / 4


@pytest.mark.parametrize("loss_type", ["bwd_kl", "fwd_kl", "sq"])
def test_first_step_is_the_formula_and_the_policy_learns(runs, loss_type):
    single, _ = runs
    rows = _rows(single[loss_type])
    assert len(rows) == 3
    assert rows[0]["loss"] == pytest.approx(_first_loss(loss_type), abs=1e-6, rel=1e-6)
    assert rows[0]["target_margin"] == pytest.approx(ETA * (0.5 + 1.0 + 1.5 + 2.0) / 4, abs=1e-6)
    assert rows[0]["rewards/margin"] == pytest.approx(0.0, abs=1e-6)
    # Later steps move the implicit reward margin up towards the (positive) reward margins.
    assert rows[-1]["rewards/margin"] > 0 and rows[0]["loss"] != rows[-1]["loss"]


@pytest.mark.parametrize("name", ["tensor2", "pipeline2", "data2", "data2_pre"])
def test_layouts_and_precomputed_reference_match_one_rank(runs, name):
    single, two = runs
    want = _rows(single["bwd_kl"])
    for rank in (0, 1):
        got = _rows(two[rank][name])
        assert len(got) == len(want)
        for g, w in zip(got, want):
            assert set(g) == set(w)
            for key in w:
                if key not in IGNORED:
                    assert g[key] == pytest.approx(w[key], abs=1e-5, rel=1e-6), f"{name} rank {rank} {key}"
