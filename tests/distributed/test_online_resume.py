"""A PPO run stopped after step 2 and resumed logs the same rewards and losses as an uninterrupted run: policy,
critic, both optimizers and schedulers, the reference, the prompt sampler and the RNG all come back (2 gloo ranks,
data parallel; two minibatches per rollout so the old log-probs and the optimizer state matter)."""
import os
import textwrap

import pytest

from megatron.testing.configs import REPO, TINY
from megatron.testing.distributed import run_distributed

STEPS, STOP = 4, 2
# metrics of a launch's first step only (the generator/trainer log-prob check) and wall-clock figures
IGNORED = ("time/", "generate/tokens_per_s", "generate/logprob_diff_max", "generate/token_mult_prob_error")


def _reward_file(root):
    path = os.path.join(root, "length_reward.py")
    with open(path, "w") as fh:
        fh.write(textwrap.dedent("""
            def length_reward(completions, completion_ids, **columns):
                return [(sum(ids) % 10) / 10.0 for ids in completion_ids]  # varies between samples
        """))
    return path


def _runs(rank, world, root):
    from megatron.engines.run_config import load_run_config
    from megatron.training.online import run_online
    from megatron.training.trainer import Hooks

    os.chdir(REPO)

    def cfg(name):
        return load_run_config([os.path.join(TINY, "ppo.yml")], [
            "checkpoint.load=null", f"checkpoint.save={root}/{name}/ckpt", "checkpoint.interval=2",
            f"logging.dir={root}/{name}/logs", "train.progress_bar=false", "model.max_seq_len=48",
            f"train.iters={STEPS}", f"reward.function=[{_reward_file(root)}:length_reward]", "reward.weights=[]",
            "rollout.prompts_per_step=4", "rollout.num_generations=2", "rollout.minibatches=2",
            "train.global_batch_size=4", "train.micro_batch_size=2", "objective.kl_coef=0.05",
            "generation.max_new_tokens=8", "optimizer.lr=1e-2", f"launcher.num_gpus={world}"], world_size=world)

    whole = run_online(cfg("whole")).history
    first = run_online(cfg("split"), Hooks(after_step=lambda step: step == STOP))
    second = run_online(cfg("split"))
    return whole, first.history, first.stopped_by_signal, second.history


@pytest.mark.slow
def test_resumed_run_logs_what_an_uninterrupted_run_logs(tmp_path):
    for whole, first, stopped, second in run_distributed(_runs, 2, str(tmp_path)):
        assert stopped and [r["step"] for r in first] == [1, 2] and [r["step"] for r in second] == [3, 4]
        assert [r["step"] for r in whole] == [1, 2, 3, 4]
        assert len({round(r["reward/mean"], 6) for r in whole}) > 1  # the policy moves
        for got, want in zip(first + second, whole):
            keys = {k for k in want if not k.startswith(IGNORED)}
            assert keys == {k for k in got if not k.startswith(IGNORED)}, got["step"]
            for k in sorted(keys):
                assert got[k] == pytest.approx(want[k], abs=1e-6, rel=1e-6), (got["step"], k)
        assert {"loss", "critic/value_loss", "reward/mean", "kl"} <= set(second[-1])
