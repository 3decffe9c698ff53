"""The shipped online RL configs: the 8B GRPO recipe validates through `deepy.py --dry-run`, the tiny demos validate
as shipped (their prompt file and reward function load), and a global batch that does not count the completions
of an optimizer step is a config error naming the numbers."""
import json
import os
import subprocess
import sys

import pytest

from megatron.config import ConfigError
from megatron.engines.run_config import load_run_config
from megatron.testing.configs import REPO, TINY


def test_grpo_8b_recipe_dry_run():
    proc = subprocess.run([sys.executable, "deepy.py", "train.py", "configs/grpo_8b.yml", "--dry-run"], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "--num_gpus 8" in proc.stdout and "train.py configs/grpo_8b.yml" in proc.stdout
    cfg = load_run_config([os.path.join(REPO, "configs", "grpo_8b.yml")], world_size=8)
    ro = cfg.rollout
    assert ro.prompts_per_step * ro.num_generations // ro.minibatches == cfg.train.global_batch_size
    assert cfg.derived.data_parallel == 4 and cfg.reward.function == ["math"]


@pytest.mark.parametrize("name", ["grpo", "rloo", "ppo"])
def test_tiny_online_configs_validate(name, monkeypatch):
    monkeypatch.chdir(REPO)
    cfg = load_run_config([os.path.join(TINY, f"{name}.yml")], world_size=1)
    ro = cfg.rollout
    assert cfg.objective.name == name and cfg.checkpoint.load == "runs/tiny_sft/checkpoints"
    assert ro.prompts_per_step * ro.num_generations // ro.minibatches == cfg.train.global_batch_size
    from megatron.rewards import build_reward_set
    rewards = build_reward_set(cfg)
    with open(ro.prompts_path) as fh:
        rec = json.loads(fh.readline())
    scores = rewards.score([rec["prompt"]] * 3, [rec["answer"], " 1 2", rec["answer"] + " 3"],
                           {"answer": [rec["answer"]] * 3})
    assert scores.total.tolist() == [2.0, 0.0, 0.0]  # three numbers (1) that are the answer (1)


def test_global_batch_must_count_the_completions_of_an_optimizer_step(monkeypatch):
    monkeypatch.chdir(REPO)
    with pytest.raises(ConfigError, match=r"8 x 4 / 1 = 32, but it is 16"):
        load_run_config([os.path.join(TINY, "grpo.yml")], ["train.global_batch_size=16", "train.micro_batch_size=16"],
                        world_size=1)
