"""Every preference objective learns the tiny synthetic preference (chosen = the correct answer) and
generalises it to HELD-OUT pairs (data/tiny/pairwise_valid.jsonl) within a few seconds of training.

For each of DPO, IPO, SimPO, ORPO, KTO and the reward model: `run_training` on the tiny model from its seeded
initialisation, then score every valid pair with the objective's own implicit reward and count how often
chosen ranks above rejected (ties count 1/2):

    dpo, kto   logp_sum(policy) - logp_sum(reference)           (nats; KTO trained on unpaired data)
    ipo        mean_logp(policy) - mean_logp(reference)        (IPO's length-averaged log-ratio)
    simpo, orpo mean_logp(policy)                               (length-normalised, reference-free)
    rm         value-head score at the last token

The same measurement on the initial model must be near chance (< 0.65; for the log-ratio rewards the
policy IS the reference, so every pair ties at 0.5), and after training >= 0.75. The trainer's own eval
path (eval/rewards/accuracy, eval/accuracy over the whole valid split) must agree with it.
All six objectives run in sequence in one spawned process.
"""
import os

import pytest

from megatron.testing.configs import DATA
from megatron.testing.distributed import run_distributed

VALID_PAIRS = 100  # records in pairwise_valid.jsonl
MICRO_BATCH = 25  # divides VALID_PAIRS: the trainer's eval then sees every valid pair exactly once

# name -> (objective, implicit reward, overrides, steps). Few steps, a large learning rate and batches of 32.
PLAN = {
    "dpo": ("dpo", "logratio_sum", ["objective.beta=0.1"], 40),
    "ipo": ("dpo", "logratio_mean", ["objective.loss_type=ipo", "objective.beta=0.1"], 40),
    "simpo": ("simpo", "mean_logp", ["objective.beta=2.0", "objective.gamma=0.5"], 40),
    "orpo": ("orpo", "mean_logp", ["objective.orpo_lambda=1.0"], 40),
    "kto": ("kto", "logratio_sum", ["objective.beta=0.1"], 40),
    "rm": ("rm", "score", [], 40),
}
SFT_STEPS = 60
COMMON = [f"train.micro_batch_size={MICRO_BATCH}", f"train.global_batch_size={2 * MICRO_BATCH}", "optimizer.lr=3.0e-3",
          "optimizer.grad_clip=1.0", "model.max_seq_len=64", "train.log_interval=10"]


def _scores(model, dataset, cfg, ps, reward):
    """Float[P, 2] implicit reward of (chosen, rejected) of every pair of `dataset`, in order."""
    import torch

    from megatron.data import iterate_all
    from megatron.training.forward import forward_stats

    out = []
    for batch in iterate_all(dataset, MICRO_BATCH, cfg.data.pack, cfg.model.max_seq_len):
        with torch.no_grad():
            stats = forward_stats(model, batch, ps, value_head=reward == "score")
        value = {"score": stats.scores, "logratio_mean": stats.mean_logp(), "mean_logp": stats.mean_logp()}.get(
            reward, stats.logp_sum)
        out.append(torch.stack([value[batch["chosen_idx"]], value[batch["rejected_idx"]]], dim=1).double())
    return torch.cat(out)


def _accuracy(policy, reference):
    """Fraction of pairs with chosen above rejected, ties 1/2; `reference` (or None) is subtracted."""
    import torch

    r = policy - reference if reference is not None else policy
    return float(((r[:, 0] > r[:, 1]).double() + 0.5 * (r[:, 0] == r[:, 1]).double()).mean())


def _learn_all(rank, world_size, workdir):
    import torch

    from megatron.data import load_tokenizer, open_dataset
    from megatron.mpu import ParallelState
    from megatron.testing.configs import tiny_test_config
    from megatron.training.checkpointing import read_latest
    from megatron.training.trainer import build_policy, run_training

    ps = ParallelState.single()
    results = {}
    sft_dir = None
    if any(len(item) > 4 and item[4] == "sft" for item in PLAN.values()):
        sft_dir = os.path.join(workdir, "sft")
        sft_cfg = tiny_test_config(sft_dir, "sft", world_size, COMMON + [
            f"data.cache_dir={workdir}/cache", f"checkpoint.save={sft_dir}/ckpt", "optimizer.lr=3.0e-3"],
            iters=SFT_STEPS)
        run_training(sft_cfg)
    for name, item in PLAN.items():
        objective, reward, overrides, steps = item[:4]
        init = None
        if len(item) > 4 and item[4] == "sft":
            init = read_latest(f"{sft_dir}/ckpt")
            overrides = overrides + [f"checkpoint.load={sft_dir}/ckpt", "checkpoint.load_optimizer=false"]
        run_dir = os.path.join(workdir, name)
        valid = "unpaired_valid.jsonl" if objective == "kto" else "pairwise_valid.jsonl"
        cfg = tiny_test_config(run_dir, objective, world_size, COMMON + overrides + [
            f"data.cache_dir={workdir}/cache", f"data.valid_path={os.path.join(DATA, valid)}",
            f"checkpoint.save={run_dir}/ckpt", f"train.eval_interval={steps}",
            f"train.eval_iters={VALID_PAIRS // MICRO_BATCH}"], iters=steps)
        history = run_training(cfg).history
        # Held-out pairs (KTO, trained on unpaired data, is judged on the same pairwise valid data).
        pair_cfg = tiny_test_config(run_dir, "rm" if reward == "score" else "dpo", world_size,
                                    COMMON + [f"data.cache_dir={workdir}/cache",
                                              f"data.valid_path={os.path.join(DATA, 'pairwise_valid.jsonl')}"])
        dataset = open_dataset(pair_cfg, load_tokenizer(cfg.data.tokenizer), "valid", log=None)
        initial = build_policy(cfg, ps, init).eval()  # the run's starting point = its reference
        trained = build_policy(cfg, ps, read_latest(f"{run_dir}/ckpt")).eval()
        ref = _scores(initial, dataset, cfg, ps, reward)
        uses_ref = reward.startswith("logratio")
        before = _accuracy(ref, ref if uses_ref else None)
        after = _accuracy(_scores(trained, dataset, cfg, ps, reward), ref if uses_ref else None)
        results[name] = {"before": before, "after": after, "history": history}
        print(name, before, after, [r for r in history if any(k.startswith("eval") for k in r)], flush=True)
    return results


def test_every_objective_learns_the_held_out_preference(tmp_path):
    results = run_distributed(_learn_all, 1, str(tmp_path))[0]
    report = {k: (round(v["before"], 3), round(v["after"], 3)) for k, v in results.items()}
    for name, r in results.items():
        assert r["before"] < 0.65, (name, report)
        assert r["after"] >= 0.75, (name, report)
