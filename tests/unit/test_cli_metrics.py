"""metrics.jsonl after a resume (one row per step), wandb's mode for a `wandb login` user, the end-of-run summary."""
import json
import os

from megatron.testing.configs import tiny_test_config
from megatron.training.metrics import MetricsLogger, read_metrics, truncate_metrics, wandb_mode
from megatron.training.summary import best_eval, run_summary


def _write(path, rows):
    with open(path, "w") as fh:
        fh.writelines(json.dumps(r) + "\n" for r in rows)


def test_reopening_drops_rows_after_the_resumed_step(tmp_path):
    cfg = tiny_test_config(str(tmp_path), "sft")
    os.makedirs(cfg.logging.dir)
    path = os.path.join(cfg.logging.dir, "metrics.jsonl")
    # The interrupted run logged steps 1..3 (and an eval at 2) but its last checkpoint is step 2.
    _write(path, [{"step": 1, "loss": 3.0}, {"step": 2, "loss": 2.5}, {"step": 2, "eval/loss": 2.7},
                  {"step": 3, "loss": 2.2}])
    with open(path, "a") as fh:
        fh.write('{"step": 4, "lo')  # torn last line of a killed process
    logger = MetricsLogger(cfg, enabled=True, start_step=2)
    logger.log(3, {"loss": 2.1})
    logger.close()
    rows = read_metrics(path)
    assert [(r["step"], sorted(r)) for r in rows] == [(1, ["loss", "step"]), (2, ["loss", "step"]),
                                                      (2, ["eval/loss", "step"]), (3, ["loss", "step"])]
    assert rows[-1]["loss"] == 2.1 and logger.dropped_rows == 2  # step 3 and the torn line
    # A run that starts at step 0 starts its file anew.
    assert truncate_metrics(path, 0) == 4 and read_metrics(path) == []


def test_wandb_is_online_for_a_wandb_login_user(tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    assert wandb_mode({"HOME": str(home)}) == "offline"
    # What `wandb login` writes.
    (home / ".netrc").write_text("machine api.wandb.ai\n  login user\n  password " + "a" * 40 + "\n")
    assert wandb_mode({"HOME": str(home)}) == "online"
    # Another W&B server: its own entry counts, api.wandb.ai's does not.
    assert wandb_mode({"HOME": str(home), "WANDB_BASE_URL": "https://wandb.example.com"}) == "offline"
    other = tmp_path / "netrc"
    other.write_text("machine wandb.example.com login user password " + "b" * 40 + "\n")
    assert wandb_mode({"HOME": str(home), "NETRC": str(other), "WANDB_BASE_URL": "https://wandb.example.com"}) \
        == "online"
    assert wandb_mode({"HOME": str(tmp_path), "WANDB_API_KEY": "x" * 40}) == "online"
    assert wandb_mode({"HOME": str(home), "WANDB_MODE": "disabled"}) == "disabled"


def test_summary_lists_final_and_best_eval_paths_and_export(tmp_path):
    ck = tmp_path / "ck"
    cfg = tiny_test_config(str(tmp_path), "dpo", overrides=[f"checkpoint.save={ck}"], iters=30)
    os.makedirs(cfg.logging.dir)
    rows = [{"step": 0, "eval/loss": 0.69, "eval/rewards/accuracy": 0.5},
            {"step": 10, "loss": 0.6}, {"step": 10, "eval/loss": 0.55, "eval/rewards/accuracy": 0.8},
            {"step": 20, "loss": 0.5}, {"step": 20, "eval/loss": 0.58, "eval/rewards/accuracy": 0.75},
            {"step": 30, "loss": 0.45}]
    _write(os.path.join(cfg.logging.dir, "metrics.jsonl"), rows)
    assert best_eval(rows) == {"eval/loss": (0.55, 10), "eval/rewards/accuracy": (0.8, 10)}
    ck.mkdir()
    (ck / "step_0000030").mkdir()
    (ck / "latest").write_text("step_0000030")
    text = run_summary(cfg, 30)
    assert "step 30 of 30" in text
    assert "final eval (step 20): eval/loss 0.58, eval/rewards/accuracy 0.75" in text
    assert "best eval: eval/loss 0.55 at step 10, eval/rewards/accuracy 0.8 at step 10" in text
    assert f"checkpoint: {ck / 'step_0000030'}" in text
    assert os.path.join(cfg.logging.dir, "metrics.jsonl") in text
    assert f"python tools/ckpts/convert_megatron_to_hf.py --ckpt {ck} --out {tmp_path / 'logs' / 'hf'}" in text
    # No checkpoint and no eval: says so and how to get them.
    bare = tiny_test_config(str(tmp_path / "b"), "sft")
    text = run_summary(bare, 3, stopped_by_signal=True)
    assert "stopped by SIGTERM" in text and "checkpoint: none (set checkpoint.save" in text
    assert "eval: none" in text and "convert_megatron_to_hf" not in text
