"""Checkpoints: exact resume, a save killed half-way, and clear errors for unusable checkpoints."""
import os

import pytest

from megatron.testing.distributed import run_distributed


class _SaveCrash(RuntimeError):
    pass


def _run(rank, world_size, workdir, save_dir, iters, stop_at, crash_at_save, overrides):
    from megatron.testing.configs import tiny_test_config
    from megatron.training.trainer import Hooks, run_training

    cfg = tiny_test_config(workdir, "sft", world_size,
                           [f"checkpoint.save={save_dir}", "checkpoint.interval=2", "checkpoint.keep_last=5"]
                           + list(overrides), iters=iters)

    def before_commit(step):
        if step == crash_at_save:
            raise _SaveCrash(f"simulated crash while saving step {step}")

    hooks = Hooks(after_step=(lambda s: s == stop_at) if stop_at else None, before_commit=before_commit)
    try:
        result = run_training(cfg, hooks)
    except _SaveCrash:
        return "crashed"
    return [(row["step"], row["loss"]) for row in result.history]


def test_resume_equals_uninterrupted(tmp_path):
    full = run_distributed(_run, 2, str(tmp_path / "a"), str(tmp_path / "ckpt_a"), 8, 0, 0, ["parallel.zero_stage=1"])[0]
    assert [s for s, _ in full] == list(range(1, 9))
    first = run_distributed(_run, 2, str(tmp_path / "b"), str(tmp_path / "ckpt_b"), 8, 4, 0, ["parallel.zero_stage=1"])[0]
    assert [s for s, _ in first] == [1, 2, 3, 4]
    with open(tmp_path / "ckpt_b" / "latest") as fh:
        assert fh.read().strip() == "step_0000004"
    rest = run_distributed(_run, 2, str(tmp_path / "b"), str(tmp_path / "ckpt_b"), 8, 0, 0, ["parallel.zero_stage=1"])[0]
    assert [s for s, _ in rest] == [5, 6, 7, 8]
    resumed = dict(first + rest)
    for step, loss in full:
        assert resumed[step] == pytest.approx(loss, abs=1e-6, rel=0), f"step {step}"


def test_resume_after_save_killed_half_way(tmp_path):
    full = run_distributed(_run, 1, str(tmp_path / "a"), str(tmp_path / "ckpt_a"), 6, 0, 0, [])[0]
    ckpt = tmp_path / "ckpt_b"
    assert run_distributed(_run, 1, str(tmp_path / "b"), str(ckpt), 6, 0, 4, [])[0] == "crashed"
    # The step-4 save was written but never committed: latest still names step 2.
    assert (ckpt / "step_0000004.tmp").is_dir()
    assert not (ckpt / "step_0000004").exists()
    assert (ckpt / "latest").read_text().strip() == "step_0000002"
    rest = run_distributed(_run, 1, str(tmp_path / "b"), str(ckpt), 6, 0, 0, [])[0]
    assert [s for s, _ in rest] == [3, 4, 5, 6]
    for (s1, l1), (s2, l2) in zip(full[2:], rest):
        assert s1 == s2 and l2 == pytest.approx(l1, abs=1e-6, rel=0)
    assert not (ckpt / "step_0000004.tmp").exists()
    assert (ckpt / "latest").read_text().strip() == "step_0000006"


def _expect_error(rank, world_size, workdir, overrides):
    from megatron.config import ConfigError
    from megatron.testing.configs import tiny_test_config
    from megatron.checkpoint.checkpointing import CheckpointError
    from megatron.training.trainer import run_training

    try:
        cfg = tiny_test_config(workdir, "sft", world_size, overrides, iters=2)
        run_training(cfg)
    except (ConfigError, CheckpointError) as exc:
        return f"{type(exc).__name__}: {exc}"
    return "no error"


def test_clear_errors(tmp_path):
    # A good checkpoint to corrupt or mismatch.
    ckpt = tmp_path / "ckpt"
    run_distributed(_run, 1, str(tmp_path / "ok"), str(ckpt), 2, 0, 0, [])
    missing = tmp_path / "nope.jsonl"
    msg = run_distributed(_expect_error, 1, str(tmp_path / "e1"), [f"data.train_path={missing}"])[0]
    assert str(missing) in msg and "data.train_path" in msg

    msg = run_distributed(_expect_error, 1, str(tmp_path / "e2"),
                          [f"checkpoint.load={ckpt}", "model.hidden_size=128"])[0]
    assert "CheckpointError" in msg and "model.hidden_size: checkpoint 64 vs config 128" in msg

    (ckpt / "latest").write_text("step_00\x00garbage")
    msg = run_distributed(_expect_error, 1, str(tmp_path / "e3"), [f"checkpoint.load={ckpt}"])[0]
    assert "is corrupt" in msg and "step_0000002" in msg and os.path.join(str(ckpt), "latest") in msg


def _stages(rank, world_size, root):
    """SFT, then RM and DPO starting from it; then a restarted DPO run resuming its own checkpoint."""
    import torch

    from megatron.testing.configs import tiny_test_config
    from megatron.checkpoint.checkpointing import canonical_state_dict
    from megatron.training.trainer import Hooks, run_training
    from megatron.checkpoint.weights_io import read_weights

    sft_ckpt = f"{root}/sft_ckpt"
    run_training(tiny_test_config(f"{root}/sft", "sft", world_size, [f"checkpoint.save={sft_ckpt}"], iters=2))
    sft_full, _, _ = read_weights(sft_ckpt)
    out = {}
    start = ["checkpoint.load_optimizer=false", f"checkpoint.load={sft_ckpt}"]
    rm = run_training(tiny_test_config(f"{root}/rm", "rm", world_size, start + [f"checkpoint.save={root}/rm_ckpt"],
                                       iters=2))
    rm_full, _, _ = read_weights(f"{root}/rm_ckpt")
    out["rm_steps"] = [r["step"] for r in rm.history]
    out["rm_has_value_head"] = "value_head.weight" in rm_full and "lm_head.weight" not in rm_full
    # The trunk trained from the SFT weights: equal shapes, values moved by two small steps only.
    out["rm_trunk_close"] = float((rm_full["blocks.0.mlp.fc1.weight"] - sft_full["blocks.0.mlp.fc1.weight"]).abs().max())
    dpo_args = start + [f"checkpoint.save={root}/dpo_ckpt", "checkpoint.interval=1"]
    first = run_training(tiny_test_config(f"{root}/dpo", "dpo", world_size, dpo_args, iters=4),
                         Hooks(after_step=lambda s: s == 2))
    # At step 1 the policy equals its reference (both the SFT weights): DPO's loss is exactly log 2.
    out["dpo_first_loss"] = first.history[0]["loss"]
    out["dpo_steps"] = [r["step"] for r in first.history]
    rest = run_training(tiny_test_config(f"{root}/dpo", "dpo", world_size, dpo_args, iters=4))
    out["dpo_resumed_steps"] = [r["step"] for r in rest.history]
    return out


def test_new_stage_starts_from_weights_and_restart_resumes_own_checkpoint(tmp_path):
    import math

    out = run_distributed(_stages, 1, str(tmp_path))[0]
    assert out["rm_steps"] == [1, 2] and out["rm_has_value_head"]
    assert 0 < out["rm_trunk_close"] < 0.05
    assert out["dpo_steps"] == [1, 2]
    assert out["dpo_first_loss"] == pytest.approx(math.log(2), abs=1e-6)
    # Restarted with the same config (checkpoint.load still set): it continues from its own step 2.
    assert out["dpo_resumed_steps"] == [3, 4]
