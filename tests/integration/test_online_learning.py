"""configs/tiny/grpo.yml and configs/tiny/ppo.yml raise the mean reward of their verifiable task (exactly three
numbers that count right, configs/tiny/rewards.py): the last fifth of the run at least 0.25 above the first fifth.

Both start, weights only, from a tiny SFT model trained here (configs/tiny/sft.yml, shortened) and run as shipped
except for fewer steps, a shorter max_seq_len and no checkpoints. Every step logs the metrics the loop promises.
One spawned process runs the three trainings (one start-up).
"""
import os

import pytest

from megatron.testing.configs import REPO, TINY
from megatron.testing.distributed import run_distributed

STEPS = 30
REQUIRED = ("loss", "reward/mean", "reward/std", "reward/configs/tiny/rewards.py:three_numbers", "reward/exact_match",
            "kl", "entropy", "clip_fraction", "response_length/mean", "advantage/mean", "time/generate_s",
            "time/train_s", "time/step_s", "generate/tokens_per_s", "lr")
COMMON = ["checkpoint.save=null", "train.progress_bar=false", "model.max_seq_len=64", "train.log_interval=1"]


def _train_all(rank, world, root):
    from megatron.engines.run_config import load_run_config
    from megatron.training.online import run_online
    from megatron.training.trainer import run_training

    os.chdir(REPO)  # the configs name repository-relative paths
    sft = load_run_config([os.path.join(TINY, "sft.yml")], COMMON + [
        "train.iters=100", "train.eval_interval=0", "data.valid_path=null", f"data.cache_dir={root}/cache",
        f"checkpoint.save={root}/sft", "checkpoint.interval=0", f"logging.dir={root}/sft_logs",
        "optimizer.warmup_iters=5"], world_size=1)
    run_training(sft)
    out = {}
    for name in ("grpo", "ppo"):
        cfg = load_run_config([os.path.join(TINY, f"{name}.yml")], COMMON + [
            f"checkpoint.load={root}/sft", f"train.iters={STEPS}", f"logging.dir={root}/{name}_logs"], world_size=1)
        out[name] = run_online(cfg).history
    return out


@pytest.fixture(scope="module")
def histories(tmp_path_factory):
    return run_distributed(_train_all, 1, str(tmp_path_factory.mktemp("online_learning")))[0]


@pytest.mark.slow
@pytest.mark.parametrize("name", ["grpo", "ppo"])
def test_tiny_config_raises_the_mean_reward(histories, name):
    rows = histories[name]
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    for r in rows:
        missing = [k for k in REQUIRED if k not in r]
        assert not missing, f"step {r['step']} lacks {missing}"
    fifth = STEPS // 5
    first = sum(r["reward/mean"] for r in rows[:fifth]) / fifth
    last = sum(r["reward/mean"] for r in rows[-fifth:]) / fifth
    assert last >= first + 0.25, f"{name}: mean reward {first:.3f} in the first fifth, {last:.3f} in the last"
    if name == "ppo":
        assert all("critic/value_loss" in r for r in rows)
        assert rows[-1]["critic/value_loss"] < rows[0]["critic/value_loss"]  # the critic learns the returns
