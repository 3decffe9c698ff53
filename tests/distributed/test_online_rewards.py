"""Reward sources inside the online loop.

- reward.model: a reward model of ours saved at tensor 2 scores (prompt, completion) texts identically when loaded at
  tensor 2 and at tensor 1, and equal to a plain single-process forward of its merged weights (value head at the
  last token of prompt + completion + EOS); a PPO step runs with it as the only reward and as the critic's start.
- A reward function that raises stops every rank with the same one-line error naming the function and the prompt
  (2 data-parallel ranks, only rank 1's prompt fails), and train.py prints that line and exits with code 2.
"""
import json
import os
import textwrap

import pytest
import torch

from megatron.testing.configs import REPO, TINY
from megatron.testing.distributed import run_distributed

TEXTS = [("count up from 7:", " 7 8 9"), ("count down from 12:", " 12 11 10 9"), ("reverse: a b c", " c b"),
         ("count up from 40:", " 40")]


def _prompts(root, n=2):
    path = os.path.join(root, "prompts.jsonl")
    with open(path, "w") as fh:
        for p, a in TEXTS[:n]:
            fh.write(json.dumps({"prompt": p, "answer": a}) + "\n")
    return path


def _sets(root, world):
    return [f"rollout.prompts_path={_prompts(root)}", "checkpoint.load=null", "checkpoint.save=null",
            f"logging.dir={root}/logs_{world}", "train.progress_bar=false", "model.max_seq_len=48", "train.iters=1",
            "rollout.prompts_per_step=2", "rollout.num_generations=2", "train.global_batch_size=4",
            "train.micro_batch_size=2", "generation.max_new_tokens=6", "data.shuffle=false",
            f"launcher.num_gpus={world}"]


def _online_config(root, world, sets):
    from megatron.engines.run_config import load_run_config
    return load_run_config([os.path.join(TINY, "grpo.yml")], _sets(root, world) + list(sets), world_size=world)


# ------------------------------------------------------------------------------------------------ workers
BAD = """
def picky(prompts, completions, answer):
    if any("12" in p for p in prompts):
        raise ValueError("cannot score\\nthis prompt")
    return [0.0] * len(completions)
"""


def _bad_file(root):
    path = os.path.join(root, "bad_reward.py")
    with open(path, "w") as fh:
        fh.write(textwrap.dedent(BAD))
    return path


def _bad_sets(root):
    return [f"reward.function=[{_bad_file(root)}:picky]", "reward.weights=[]"]


def _plain_scores(ckpt, tokenizer_dir):
    """The reward model's merged weights in a single-process GPTModel: value head at the last token."""
    from megatron.checkpoint.weights_io import read_weights, resolve_tag_dir
    from megatron.config import derive_and_validate
    from megatron.data import load_tokenizer
    from megatron.model import GPTModel
    from megatron.mpu import ParallelState

    full, _, saved = read_weights(resolve_tag_dir(ckpt))
    saved.parallel.tensor = 1
    model = GPTModel(derive_and_validate(saved, 1), ParallelState.single())
    model.load_state_dict(full)
    tok = load_tokenizer(tokenizer_dir)
    out = []
    for p, c in TEXTS:
        ids = torch.tensor([[tok.bos_id] + tok.encode(p + c) + [tok.eos_id]])
        with torch.no_grad():
            out.append(float(model(ids, torch.arange(ids.shape[1])[None], torch.ones_like(ids))[0, -1]))
    return out


def _worker(rank, world, root):
    """world 2: train the reward model at tensor 2, score with it at tensor 2, a PPO step with it, a raising reward
    at data 2. world 1: score at tensor 1, the plain twin, then train.py's command line with the raising reward."""
    import contextlib
    import io

    import deepspeed
    from megatron.engines.build import device_for_rank
    from megatron.mpu import initialize_parallel
    from megatron.mpu.distributed import init_distributed
    from megatron.rewards import RewardError
    from megatron.rewards.model import build_reward_model
    from megatron.testing.configs import tiny_test_config
    from megatron.training.online import run_online
    from megatron.training.trainer import run_training

    os.chdir(REPO)
    ckpt = f"{root}/rm"
    out = {}
    if world == 2:  # the reward model: one step of objective rm at tensor 2, saved
        run_training(tiny_test_config(f"{root}/rm_run", "rm", 2, [
            "parallel.tensor=2", f"checkpoint.save={ckpt}", "model.max_seq_len=48", "optimizer.lr=0.05"], iters=1))
    cfg = _online_config(root, world, [f"reward.model={ckpt}", "reward.weights=[]", f"parallel.tensor={world}"])
    init_distributed(cfg.parallel.backend)
    source = build_reward_model(cfg, initialize_parallel(world, 1), deepspeed, device_for_rank())
    out["scores"] = source.score([p for p, _ in TEXTS], [c for _, c in TEXTS], {}).tolist()
    out["name"] = source.name
    if world == 2:
        ppo = _online_config(root, world, [f"reward.model={ckpt}", "parallel.tensor=2", "objective.name=ppo",
                                           "reward.function=[]", "reward.weights=[]", "objective.kl_coef=0.0",
                                           "objective.clip_high=null"])
        out["ppo"] = run_online(ppo).history
        try:
            run_online(_online_config(root, world, _bad_sets(root)))
        except RewardError as exc:
            out["error"] = str(exc)
    else:
        out["plain"] = _plain_scores(ckpt, cfg.data.tokenizer)
        import train  # the command line, last: it shuts the process group down when it returns
        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            out["exit"] = train.main([os.path.join(TINY, "grpo.yml"), "--set"] + _sets(root, 1) + _bad_sets(root))
        out["stderr"] = err.getvalue()
    return out


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("online_rewards"))
    two = run_distributed(_worker, 2, root)
    one = run_distributed(_worker, 1, root)[0]
    return root, two, one


@pytest.mark.slow
def test_reward_model_scores_at_any_tensor_size(results):
    _, two, one = results
    assert one["name"] == "model"
    assert max(one["plain"]) - min(one["plain"]) > 1e-4  # the scores tell the texts apart
    assert one["scores"] == pytest.approx(one["plain"], abs=1e-5)
    for rank in (0, 1):
        assert two[rank]["scores"] == pytest.approx(one["plain"], abs=1e-5)
        (row,) = two[rank]["ppo"]
        assert {"reward/model", "reward/mean", "critic/value_loss", "loss"} <= set(row)
        assert row["reward/mean"] == pytest.approx(row["reward/model"], abs=1e-6)


@pytest.mark.slow
def test_a_raising_reward_function_stops_every_rank_with_one_line(results):
    root, two, one = results
    want = f"reward function '{_bad_file(root)}:picky' raised on prompt index 1: ValueError: cannot score this prompt"
    assert [two[0]["error"], two[1]["error"]] == [want, want]  # rank 0's prompt was fine; it stops all the same
    assert one["exit"] == 2
    lines = [line for line in one["stderr"].splitlines() if line.startswith("error:")]
    assert lines == [f"error: {want}"], one["stderr"][-2000:]
