"""One online RL update on FIXED rollouts is the same at every layout (fp32, 1e-5): tensor 2, and data 2 with ZeRO 1
and ZeRO 3, against one rank. Two presets cover the loop's paths:

- grpo: KL to a live reference in the loss, DAPO clip-higher, two epochs of two minibatches (old log-probs
  recomputed because the fixed "generator" log-probs differ from the training forward) with truncated importance
  sampling;
- ppo: a critic engine (value loss, its own optimizer), GAE over the critic's values, the KL in the reward.

Compared: every logged metric of the step (loss, pg_loss, kl, entropy, clip fractions, ratio, value loss,
advantage mean, ...), and the policy's log-probs of every rollout token after the update (all weights moved).

Then the whole loop (generate, score, train) for two grpo steps at tensor 2 and at data 2 with ZeRO 3 (the weights
gathered once per generation phase) logs what one rank logs: the same samples, rewards and losses.
"""
import json
import os

import pytest
import torch

from megatron.testing.configs import REPO, TINY
from megatron.testing.distributed import run_distributed

N_PROMPTS, GROUP = 4, 2
IGNORED = ("time/", "generate/tokens_per_s", "lr")
PRESETS = {
    "grpo": ["objective.name=grpo", "objective.kl_coef=0.05", "objective.clip_high=0.28",
             "objective.loss_agg=seq_mean_token_mean", "rollout.minibatches=2", "rollout.epochs=2",
             "rollout.importance_correction=true", "rollout.importance_cap=1.5", "train.global_batch_size=4"],
    "ppo": ["objective.name=ppo", "objective.kl_coef=0.05", "objective.kl_estimator=k1", "objective.lam=0.9",
            "objective.vf_coef=0.5", "rollout.minibatches=1", "train.global_batch_size=8"],
}
LAYOUTS = {"tensor2": ["parallel.tensor=2"], "data2_zero1": ["parallel.zero_stage=1"],
           "data2_zero3": ["parallel.zero_stage=3"]}


def fixed_rollouts(dp_rank=0, dp_size=1):
    """N_PROMPTS prompts x GROUP completions with random ids, lengths, rewards and 'generator' log-probs; data-parallel
    rank r takes its contiguous slice of prompts (all completions of a prompt on one rank)."""
    from megatron.training.experience import Rollouts
    g = torch.Generator().manual_seed(11)
    rows = []
    for p in range(N_PROMPTS):
        prompt = [1] + [int(x) for x in torch.randint(3, 500, (int(torch.randint(2, 7, (1,), generator=g)),),
                                                       generator=g)]
        for k in range(GROUP):
            n = int(torch.randint(1, 7, (1,), generator=g))
            comp = [int(x) for x in torch.randint(3, 500, (n,), generator=g)]
            logps = (-6.2 + 0.3 * torch.randn(n, generator=g)).tolist()
            rows.append((prompt, comp, logps, p, float(k % 2) + 0.25 * p))  # rewards vary in every group
    per = N_PROMPTS // dp_size * GROUP
    mine = rows[dp_rank * per:(dp_rank + 1) * per]
    return Rollouts(prompt_ids=[r[0] for r in mine], completion_ids=[r[1] for r in mine],
                    behaviour_logps=[r[2] for r in mine], group_ids=torch.tensor([r[3] for r in mine]),
                    rewards=torch.tensor([r[4] for r in mine], dtype=torch.float64))


def _prompts_file(root):
    path = os.path.join(root, "prompts.jsonl")
    with open(path, "w") as fh:
        fh.write(json.dumps({"prompt": "count up from 7:", "answer": " 7 8 9"}) + "\n")
    return path


def _config(root, world, preset, layout):
    from megatron.engines.run_config import load_run_config
    sets = [f"rollout.prompts_path={_prompts_file(root)}", "checkpoint.load=null", "checkpoint.save=null",
            f"logging.dir={root}/logs", "train.progress_bar=false", "model.max_seq_len=32", "train.micro_batch_size=2",
            f"rollout.num_generations={GROUP}", f"rollout.prompts_per_step={N_PROMPTS}",
            "reward.function=[exact_match]", "reward.weights=[]", "optimizer.lr=1e-2",
            f"launcher.num_gpus={world}"] + PRESETS[preset] + layout
    return load_run_config([os.path.join(TINY, "grpo.yml")], sets, world_size=world)


def _reward_file(root):
    path = os.path.join(root, "token_sum_reward.py")
    with open(path, "w") as fh:
        fh.write("def token_sum(completion_ids, **columns):\n"
                 "    return [(sum(ids) % 10) / 10.0 for ids in completion_ids]\n")
    return path


def _loop_config(root, world, layout):
    return _config(root, world, "grpo", layout + [
        f"reward.function=[{_reward_file(root)}:token_sum]", "train.iters=2", "generation.max_new_tokens=6",
        f"logging.dir={root}/loop_{world}_{'_'.join(layout)}"])


def _update(rank, world, root, runs):
    from megatron.data import load_tokenizer
    from megatron.engines.build import device_for_rank
    from megatron.engines.token_forward import token_logps
    from megatron.engines.forward import batch_to
    from megatron.mpu import initialize_parallel
    from megatron.mpu.distributed import init_distributed
    from megatron.training.experience import pack_rollouts, strip_private
    from megatron.training.online import build_models
    from megatron.training.online_step import LogpCheck, prepare_experience, train_on_experience
    from megatron.training.trainer import _mean_over_dp

    os.chdir(REPO)
    out = {}
    for preset, name, layout in runs:
        cfg = _config(root, world, preset, layout)
        init_distributed(cfg.parallel.backend)
        ps = initialize_parallel(cfg.parallel.tensor, 1)
        device = device_for_rank()
        models = build_models(cfg, ps, None, device, load_tokenizer(cfg.data.tokenizer))
        rollouts = fixed_rollouts(ps.dp_rank, ps.dp_size)
        batches, metrics = prepare_experience(models, cfg, ps, rollouts, LogpCheck(), device)
        metrics.update(_mean_over_dp(train_on_experience(models, cfg, ps, batches, device), ps, device))
        probe = pack_rollouts(fixed_rollouts(), 1, N_PROMPTS * GROUP, cfg.model.max_seq_len)[0][0]
        with torch.no_grad():
            logps, _ = token_logps(models.engine, batch_to(strip_private(probe), device))
        out[(preset, name)] = (metrics, logps[probe["loss_mask"] > 0].tolist())
    from megatron.training.online import run_online
    for layout in ([[]] if world == 1 else [LAYOUTS["tensor2"], LAYOUTS["data2_zero3"]]):
        out[("loop", tuple(layout))] = run_online(_loop_config(root, world, layout)).history
    return out


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("online_layouts"))
    single = run_distributed(_update, 1, root, [(p, "single", []) for p in PRESETS])[0]
    two = run_distributed(_update, 2, root, [(p, n, lay) for p in PRESETS for n, lay in LAYOUTS.items()])
    return single, two


@pytest.mark.slow
@pytest.mark.parametrize("preset", list(PRESETS))
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_one_update_matches_one_rank(results, preset, layout):
    single, two = results
    want_metrics, want_logps = single[(preset, "single")]
    assert want_metrics["generate/logprob_diff_max"] > 0.1  # the fixed generator log-probs are not the model's
    if preset == "grpo":
        assert want_metrics["kl"] > 0 and want_metrics["clip_fraction"] > 0  # the KL and the clipping are exercised
    else:
        assert want_metrics["critic/value_loss"] > 0
    for rank in (0, 1):
        got_metrics, got_logps = two[rank][(preset, layout)]
        keys = {k for k in want_metrics if not k.startswith(IGNORED)}
        assert keys <= set(got_metrics), (preset, layout, rank)
        for k in sorted(keys):
            assert got_metrics[k] == pytest.approx(want_metrics[k], abs=1e-5, rel=1e-5), (preset, layout, rank, k)
        assert got_logps == pytest.approx(want_logps, abs=1e-5, rel=1e-5), (preset, layout, rank)
    # the update moved the policy: its log-probs after the step differ from the generator's fixed ones
    assert want_logps != pytest.approx(sum(fixed_rollouts().behaviour_logps, []), abs=1e-3)


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["tensor2", "data2_zero3"])
def test_whole_loop_matches_one_rank(results, layout):
    single, two = results
    want = single[("loop", ())]
    assert len(want) == 2 and len({round(r["reward/mean"], 6) for r in want}) == 2
    for rank in (0, 1):
        got = two[rank][("loop", tuple(LAYOUTS[layout]))]
        for g, w in zip(got, want):
            for k in sorted(k for k in w if not k.startswith(IGNORED)):
                assert g[k] == pytest.approx(w[k], abs=1e-5, rel=1e-5), (layout, rank, g["step"], k)
