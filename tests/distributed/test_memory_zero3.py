"""ZeRO-3 without the full model (issue 11): parameters are partitioned as they are created, the live reference is
copied partition by partition from the policy, a save gathers one parameter at a time, and its canonical
optimizer state resumes at another layout.

DPO on 2 data-parallel ranks at ZeRO-3 with a live reference: at step 1 the policy equals its reference, so
the loss is exactly log 2 (a wrongly copied reference partition would move it). The run saves at step 2; a
run resuming that checkpoint on ONE rank at ZeRO 0 (data 2 -> 1, ZeRO stage 3 -> 0: weights and Adam state
gathered from the ZeRO-3 partitions through their canonical form) logs the losses of steps 3-4 the ZeRO-3
run logged without stopping. A third run resumes the same checkpoint at data 2 / ZeRO-3 again, which is
DeepSpeed's own exact path (as tests/distributed/test_engine_resume.py checks it, to 1e-6).
"""
import math

import pytest

from megatron.testing.distributed import run_distributed

TOL = 1e-5  # fp32; data 2 -> 1 sums the same gradients in another order (see test_resume_reshard.py)


def _dpo(rank, world_size, workdir, save_dir, load_dir, overrides):
    import os

    from megatron.checkpoint.weights_io import read_weights
    from megatron.testing.configs import tiny_test_config
    from megatron.training.trainer import run_training

    sets = [f"checkpoint.save={save_dir}", "checkpoint.interval=2", "checkpoint.keep_last=10",
            "train.global_batch_size=8"] + list(overrides)
    if load_dir:
        sets.append(f"checkpoint.load={load_dir}")
    cfg = tiny_test_config(workdir, "dpo", world_size, sets, iters=4)
    result = run_training(cfg)
    losses = [(row["step"], row["loss"]) for row in result.history]
    saved = None
    if rank == 0 and os.path.isdir(os.path.join(save_dir, "step_0000002")):
        full, _, _ = read_weights(os.path.join(save_dir, "step_0000002"))
        saved = {k: v.sum().item() for k, v in full.items()}
    return losses, saved


@pytest.mark.slow
def test_zero3_live_reference_streamed_save_and_resume_elsewhere(tmp_path, capfd):
    z3 = ["parallel.zero_stage=3"]
    a, saved = run_distributed(_dpo, 2, str(tmp_path / "a"), str(tmp_path / "ck_a"), None, z3)[0]
    assert [s for s, _ in a] == [1, 2, 3, 4]
    assert a[0][1] == pytest.approx(math.log(2), abs=1e-6)  # policy == live reference at step 1
    assert saved and all(math.isfinite(v) for v in saved.values())
    capfd.readouterr()
    b, _ = run_distributed(_dpo, 1, str(tmp_path / "b"), str(tmp_path / "ck_b"),
                           str(tmp_path / "ck_a" / "step_0000002"), ["parallel.zero_stage=0"])[0]
    printed = capfd.readouterr().out
    assert "re-sharded: data 2 -> 1, ZeRO stage 3 -> 0" in printed
    assert [s for s, _ in b] == [3, 4]
    for (sa, la), (sb, lb) in zip(a[2:], b):
        assert sa == sb and lb == pytest.approx(la, rel=TOL, abs=0), f"step {sa}: {lb} vs uninterrupted {la}"
    c, _ = run_distributed(_dpo, 2, str(tmp_path / "c"), str(tmp_path / "ck_c"),
                           str(tmp_path / "ck_a" / "step_0000002"), z3)[0]
    assert "re-sharded" not in capfd.readouterr().out  # same layout: DeepSpeed's own exact resume
    assert [s for s, _ in c] == [3, 4]
    for (sa, la), (sc, lc) in zip(a[2:], c):
        assert lc == pytest.approx(la, abs=1e-6, rel=0), f"step {sa}"
