"""Resuming a training checkpoint at another data-parallel or tensor size continues the uninterrupted run.

The chains below save every 2 steps; a later run loads an intermediate checkpoint at another layout, so the
losses it logs for the next steps must equal those the saving run logged for the same steps without stopping
(fp32; the only differences are reduction orders, see the tolerance note). Each resumed run also saves, so
the chain goes back to the first layout ("and back").
"""
import os

import pytest

from megatron.testing.distributed import run_distributed

# fp32 throughout. A different data-parallel size sums the same micro-batch gradients in another order and a
# different tensor size splits the matmuls differently: the losses then agree to ~1e-7 relative (measured
# up to 3e-7 over these steps), not bit for bit. 1e-5 is the bound.
TOL = 1e-5


def _train(rank, world_size, workdir, save_dir, load_dir, iters, overrides):
    from megatron.testing.configs import tiny_test_config
    from megatron.training.trainer import run_training

    sets = [f"checkpoint.save={save_dir}", "checkpoint.interval=2", "checkpoint.keep_last=10",
            "model.num_layers=2", "train.global_batch_size=8"] + list(overrides)
    if load_dir:
        sets.append(f"checkpoint.load={load_dir}")
    cfg = tiny_test_config(workdir, "sft", world_size, sets, iters=iters)
    result = run_training(cfg)
    return [(row["step"], row["loss"]) for row in result.history]


def _chain(tmp_path, first, second, third, capfd):
    """first: steps 1-4 (saves 2, 4); second: from first's step 2, steps 3-6; third: from second's step 4."""
    a = run_distributed(_train, first[0], str(tmp_path / "a"), str(tmp_path / "ck_a"), None, 4, first[1])[0]
    b = run_distributed(_train, second[0], str(tmp_path / "b"), str(tmp_path / "ck_b"),
                        str(tmp_path / "ck_a" / "step_0000002"), 6, second[1])[0]
    printed_b = capfd.readouterr().out
    c = run_distributed(_train, third[0], str(tmp_path / "c"), str(tmp_path / "ck_c"),
                        str(tmp_path / "ck_b" / "step_0000004"), 6, third[1])[0]
    printed_c = capfd.readouterr().out
    assert [s for s, _ in a] == [1, 2, 3, 4] and [s for s, _ in b] == [3, 4, 5, 6] and [s for s, _ in c] == [5, 6]
    for (sa, la), (sb, lb) in zip(a[2:], b[:2]):
        assert sa == sb and lb == pytest.approx(la, rel=TOL, abs=0), f"step {sa}: {lb} vs uninterrupted {la}"
    for (sb, lb), (sc, lc) in zip(b[2:], c):
        assert sb == sc and lc == pytest.approx(lb, rel=TOL, abs=0), f"step {sb}: {lc} vs uninterrupted {lb}"
    return printed_b, printed_c


@pytest.mark.slow
def test_resume_data_2_to_1_and_back(tmp_path, capfd):
    """ZeRO-1: the optimizer state is partitioned over the data-parallel ranks, and re-partitioned on resume."""
    zero1 = ["parallel.zero_stage=1"]
    printed_b, printed_c = _chain(tmp_path, (2, zero1), (1, zero1), (2, zero1), capfd)
    assert "re-sharded: data 2 -> 1" in printed_b
    assert "re-sharded: data 1 -> 2" in printed_c


@pytest.mark.slow
def test_resume_tensor_2_to_1_and_back(tmp_path, capfd):
    tp2 = ["parallel.tensor=2"]
    printed_b, printed_c = _chain(tmp_path, (2, tp2), (1, []), (2, tp2), capfd)
    assert "re-sharded: tensor 2 -> 1" in printed_b
    assert "re-sharded: tensor 1 -> 2" in printed_c
    # The canonical optimizer state sits next to the weights, laid out like them.
    tag = tmp_path / "ck_a" / "step_0000002"
    for sub in ("weights", "optimizer/exp_avg", "optimizer/exp_avg_sq"):
        assert sorted(os.listdir(tag / sub)) == ["tp00_pp00.safetensors", "tp01_pp00.safetensors"], sub


@pytest.mark.slow
def test_resume_pipeline_2_to_1_and_back(tmp_path, capfd):
    """Tied embeddings: the pipeline's last stage holds a copy of the embedding (and of its Adam state)."""
    pp2 = ["parallel.pipeline=2", "model.tie_embeddings=true"]
    printed_b, printed_c = _chain(tmp_path, (2, pp2), (1, ["model.tie_embeddings=true"]), (2, pp2), capfd)
    assert "re-sharded: pipeline 2 -> 1" in printed_b
    assert "re-sharded: pipeline 1 -> 2" in printed_c
