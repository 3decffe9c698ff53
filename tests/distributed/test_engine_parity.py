"""Distributed training equals single-process training.

- ZeRO 0/1/2/3 on 2 data-parallel ranks give the same per-step losses (fp32, 1e-5), and equal one rank
  running the same global batch as 2 accumulated micro-batches.
- tensor=2 x data=2 (4 ranks) equals tensor=1 on one rank.
"""
import pytest

from megatron.testing.distributed import run_distributed


def _train_losses(rank, world_size, workdir, overrides_list):
    from megatron.testing.configs import tiny_test_config
    from megatron.training.trainer import run_training

    out = []
    for i, overrides in enumerate(overrides_list):
        cfg = tiny_test_config(f"{workdir}/run{i}", "sft", world_size, overrides, iters=3)
        out.append([row["loss"] for row in run_training(cfg).history])
    return out


def test_zero_stages_match_single_rank(tmp_path):
    single = run_distributed(_train_losses, 1, str(tmp_path / "single"), [[]])[0][0]
    assert len(single) == 3
    per_stage = run_distributed(_train_losses, 2, str(tmp_path / "dp"),
                                [[f"parallel.zero_stage={z}"] for z in (0, 1, 2, 3)])
    for rank_losses in per_stage:
        for z, losses in enumerate(rank_losses):
            assert losses == pytest.approx(single, abs=1e-5, rel=0), f"zero stage {z}"
    # The model really learns something over the 3 steps (the comparison is not between constants).
    assert single[0] != single[-1]


def test_tensor_by_data_parallel_matches_single_rank(tmp_path):
    single = run_distributed(_train_losses, 1, str(tmp_path / "single"), [[]])[0][0]
    tp = run_distributed(_train_losses, 4, str(tmp_path / "tp"), [["parallel.tensor=2"]])
    for rank_losses in tp:
        assert rank_losses[0] == pytest.approx(single, abs=1e-5, rel=0)
