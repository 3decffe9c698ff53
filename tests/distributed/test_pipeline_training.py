"""Pipeline parallelism (DeepSpeed's pipeline engine) trains exactly like the unpipelined engine.

One 1-rank process group runs the references, then one 2-rank group runs the same configs at pipeline=2
(several runs per group: DeepSpeed start-up dominates). fp32, 1e-5, gradient clipping active everywhere
(grad_clip below every gradient norm, so the pipeline's global norm decides each update):
- SFT, DPO with a live reference (and held-out eval with it) and with a precomputed one, SimPO, ORPO, KTO
  with a live and with a precomputed reference, RM, and a 3-layer model split 2,1 (explicit partition):
  the same per-step losses, objective metrics and gradient norms for 3 steps;
- checkpoints: pipeline=2 saved after 3 steps and resumed to 6 gives the losses of 6 uninterrupted steps;
  its weight shards merge (weights_io.read_weights) into the canonical tensors of the pipeline=1 run, with
  untied and tied embeddings; a pipeline=1 checkpoint loaded weights-only into the stages trains on
  identically.
"""
import math
import os

import pytest
import torch

from megatron.testing.configs import DATA
from megatron.testing.distributed import run_distributed

IGNORED = ("tokens_per_s", "samples_per_s")
SUBSET = 96  # records trained with a precomputed reference: enough for 3 steps, quick to precompute


def _subset(root, name):
    """Path of the first SUBSET records of data/tiny/<name>.jsonl (written by `_write_subsets`)."""
    return os.path.join(root, f"{name}_subset.jsonl")


def _write_subsets(root):
    for name in ("pairwise", "unpaired"):
        with open(os.path.join(DATA, f"{name}.jsonl")) as src, open(_subset(root, name), "w") as dst:
            dst.writelines(line for _, line in zip(range(SUBSET), src))


def _plan(root, side):
    """[(name, objective, overrides, iters, precompute)] of one side ('single' or 'piped')."""
    ckpt = lambda name: f"checkpoint.save={root}/{side}/{name}/ckpt"  # noqa: E731
    valid = [f"data.valid_path={DATA}/pairwise_valid.jsonl", "train.eval_interval=3", "train.eval_iters=1"]
    pre = ["reference.mode=precomputed", f"data.train_path={_subset(root, 'pairwise')}"] + valid
    kto_pre = ["reference.mode=precomputed", f"data.train_path={_subset(root, 'unpaired')}"]
    warm = [f"checkpoint.load={root}/single/sft/ckpt", "checkpoint.load_optimizer=false"]
    if side == "single":
        return [("sft", "sft", [ckpt("sft")], 3, False),
                ("dpo_live", "dpo", valid, 3, False),
                ("dpo_pre", "dpo", pre, 3, True),
                ("simpo", "simpo", [], 3, False),
                ("orpo", "orpo", [], 3, False),
                ("kto", "kto", [], 3, False),
                ("kto_pre", "kto", kto_pre, 3, True),
                ("rm", "rm", [], 3, False),
                ("split21", "sft", ["model.num_layers=3"], 3, False),
                ("tied", "sft", ["model.tie_embeddings=true", ckpt("tied")], 2, False),
                ("warm", "sft", warm, 2, False)]
    pp = ["parallel.pipeline=2"]
    return [("sft6", "sft", pp, 6, False),
            ("sft", "sft", pp + [ckpt("sft")], 3, False),
            ("sft_resumed", "sft", pp + [ckpt("sft")], 6, False),  # auto-resumes from its step-3 checkpoint
            ("dpo_live", "dpo", pp + valid, 3, False),
            ("dpo_pre", "dpo", pp + pre, 3, False),
            ("simpo", "simpo", pp, 3, False),
            ("orpo", "orpo", pp, 3, False),
            ("kto", "kto", pp, 3, False),
            ("kto_pre", "kto", pp + kto_pre, 3, False),
            ("rm", "rm", pp, 3, False),
            ("split21", "sft", pp + ["model.num_layers=3", "parallel.pipeline_partition=2,1"], 3, False),
            ("tied", "sft", pp + ["model.tie_embeddings=true", ckpt("tied")], 2, False),
            ("warm", "sft", pp + warm, 2, False)]


def _run_plan(rank, world_size, root, side):
    from megatron.testing.configs import tiny_test_config
    from megatron.engines.precompute import precompute_reference
    from megatron.training.trainer import run_training

    out = {}
    for name, objective, overrides, iters, precompute in _plan(root, side):
        common = ["optimizer.grad_clip=0.05", f"data.cache_dir={root}/cache"]
        cfg = tiny_test_config(f"{root}/{side}/{name}", objective, world_size, common + overrides, iters=iters)
        if precompute:
            precompute_reference(cfg)
        out[name] = run_training(cfg).history
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("pipeline"))
    _write_subsets(root)
    single = run_distributed(_run_plan, 1, root, "single")[0]
    piped = run_distributed(_run_plan, 2, root, "piped")
    return root, single, piped[0], piped[1]


def _train_rows(history):
    return [r for r in history if "loss" in r]


def _assert_rows_equal(got, want, what):
    assert len(got) == len(want), what
    for g, w in zip(got, want):
        assert set(g) == set(w), what
        for key in w:
            if key not in IGNORED:
                # rel: metrics such as ppl = exp(loss) are in the hundreds
                assert g[key] == pytest.approx(w[key], abs=1e-5, rel=1e-6), f"{what}: step {w['step']} {key}"


def test_every_stage_reports_the_last_stage_metrics(runs):
    _, _, stage0, stage1 = runs
    assert set(stage0) == set(stage1)
    for name in stage0:
        _assert_rows_equal(stage0[name], stage1[name], name)


@pytest.mark.parametrize("name", ["sft", "dpo_live", "dpo_pre", "simpo", "orpo", "kto", "kto_pre", "rm", "split21"])
def test_pipeline_matches_single_rank(runs, name):
    _, single, piped, _ = runs
    want = single[name]
    assert len(_train_rows(want)) == 3
    _assert_rows_equal(piped[name], want, name)
    losses = [r["loss"] for r in _train_rows(want)]
    assert losses[0] != losses[-1]  # the model learns: not a comparison of constants
    assert all(r["grad_norm"] > 0.05 for r in _train_rows(want))  # clipping is active


def test_pipeline_evaluates_with_live_reference(runs):
    _, single, piped, _ = runs
    evals = [r for r in piped["dpo_live"] if "eval/loss" in r]
    assert [r["step"] for r in evals] == [0, 3]
    assert evals[1]["eval/loss"] != evals[0]["eval/loss"]


@pytest.mark.parametrize("name", ["dpo_live", "dpo_pre"])
def test_pipelined_reference_equals_initial_policy(runs, name):
    _, _, piped, _ = runs
    # The live reference engine and the precomputed values both come from the initial weights, so the first
    # DPO step sees a zero log-ratio for every pair: loss log 2, rewards 0.
    first = _train_rows(piped[name])[0]
    assert first["loss"] == pytest.approx(math.log(2.0), abs=1e-6)
    assert first["rewards/chosen"] == pytest.approx(0.0, abs=1e-6)


def test_pipeline_resume_continues_exactly(runs):
    _, single, piped, _ = runs
    whole = _train_rows(piped["sft6"])
    assert [r["step"] for r in _train_rows(piped["sft_resumed"])] == [4, 5, 6]
    _assert_rows_equal(_train_rows(piped["sft"]), whole[:3], "first half")
    _assert_rows_equal(_train_rows(piped["sft_resumed"]), whole[3:], "resumed half")
    _assert_rows_equal(whole[:3], _train_rows(single["sft"]), "6-step run vs single")


@pytest.mark.parametrize("name", ["sft", "tied"])
def test_pipeline_checkpoint_merges_to_canonical_weights(runs, name):
    from megatron.checkpoint.weights_io import read_weights, resolve_tag_dir

    root, single, _, _ = runs
    tag = "step_0000003" if name == "sft" else None
    merged, meta, _cfg = read_weights(f"{root}/piped/{name}/ckpt", tag=tag)
    reference, ref_meta, _ = read_weights(f"{root}/single/{name}/ckpt")
    assert (meta["pipeline"], ref_meta["pipeline"]) == (2, 1) and meta["step"] == ref_meta["step"]
    assert meta["blocks_per_stage"] == [1, 1]
    assert set(merged) == set(reference)
    assert ("lm_head.weight" in merged) == (name == "sft")
    for key, tensor in reference.items():
        assert merged[key].shape == tensor.shape, key
        torch.testing.assert_close(merged[key], tensor, atol=1e-5, rtol=0, msg=key)
    # Both stages' files hold canonical names: stage 1 the last block, the final norm and the head (or the
    # tied embedding copy).
    tag_dir = resolve_tag_dir(f"{root}/piped/{name}/ckpt", tag)
    from megatron.checkpoint.weights_io import load_shard, weights_file
    stage1 = load_shard(weights_file(tag_dir, 0, 1))
    assert "blocks.1.attention.qkv.weight" in stage1 and "final_norm.weight" in stage1
    assert not any(k.startswith("blocks.0.") for k in stage1)


def test_pipeline_loads_single_rank_weights(runs):
    _, single, piped, _ = runs
    _assert_rows_equal(piped["warm"], single["warm"], "weights-only load of a pipeline=1 checkpoint")
    # It really starts from the trained weights, not from the seeded init.
    assert _train_rows(single["warm"])[0]["loss"] < _train_rows(single["sft"])[0]["loss"]
