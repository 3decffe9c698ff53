#!/usr/bin/env python
"""GRPO step throughput: our online loop against TRL's GRPOTrainer (transformers generation, no vLLM), the same
model weights, prompts, group size, completion length, KL and loss, in one run.

    python tools/bench_grpo.py                       # default shape, both sides, a table and the ratio
    python tools/bench_grpo.py --steps 4 --rounds 2 --json out.json
    python tools/bench_grpo.py --hidden-size 512 --num-layers 8 --completion-len 128

Each side runs in its own subprocess (`--worker ours|trl`) and trains `--warmup` + `--steps` GRPO steps; one step =
generate `--group` completions for each of `--prompts` prompts, score them, reference log-probs, group-normalised
advantages, one optimizer step over all completions. The warm-up steps are not timed; the median of the timed steps
is reported as completions/s ("cpu s": the median process CPU time of a step, all threads: steadier than wall
time on a shared machine).

Same work on both sides: the policy is our seeded initial model (converted to `LlamaForCausalLM` with
`megatron.interop` for TRL), fp32, one process, no dropout; the tokenizer is a word-level one whose word `t<i>` is
token i, so both sides see the same prompt ids (all `--prompt-len` tokens: no padding for TRL either); completions
are exactly `--completion-len` tokens (ours `generation.ignore_eos`, TRL `min_new_tokens`); temperature 1, no
top-k/top-p; KL to the initial model with the k3 estimator and coefficient `--beta` in the loss (TRL's `beta`),
token-mean loss (TRL's `dapo`), clip 0.2, group scaling of rewards, one update per generation (TRL:
steps_per_generation 1, num_iterations 1); the reward is the same python function (the fraction of even token ids).
Ours: `megatron.training.online.run_online`, its per-step `time/step_s` (generate + score + experience + train).
TRL: `on_step_begin` -> `on_step_end` of its Trainer (generation happens inside the step). Results:
docs/benchmarks.md.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any, Dict, List, Optional, Sequence

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
for path in (REPO, os.path.join(REPO, "tools")):
    if path not in sys.path:
        sys.path.insert(0, path)

import bench_dpo as dpo  # noqa: E402  (shared helpers: memory, word tokenizer, ports)

SIDES = ("ours", "trl")
REWARD_SOURCE = '''
def even_tokens(completions, **columns):
    """The fraction of a completion's words t<i> with an even id i."""
    out = []
    for text in completions:
        ids = [int(w[1:]) for w in text.split() if w.startswith("t") and w[1:].isdigit()]
        out.append(sum(1 for i in ids if i % 2 == 0) / max(len(ids), 1))
    return out
'''


# ----------------------------------------------------------------------------------------------- shared set-up
def make_prompts(n: int, seed: int, vocab_size: int, length: int) -> List[List[int]]:
    """`n` prompts of `length` token ids uniform in [FIRST_WORD_ID, vocab_size); deterministic in `seed`."""
    import numpy as np
    rng = np.random.default_rng(seed)
    return [rng.integers(dpo.FIRST_WORD_ID, vocab_size, size=length).tolist() for _ in range(n)]


def write_inputs(args, work: str) -> Dict[str, str]:
    """The word tokenizer, the prompt file and the reward file both sides read, under `work`."""
    tok_dir = os.path.join(work, "tokenizer")
    dpo.word_tokenizer(args.vocab_size).save_pretrained(tok_dir)
    prompts = os.path.join(work, "prompts.jsonl")
    with open(prompts, "w") as fh:
        for ids in make_prompts(args.prompts * (args.warmup + args.steps), args.seed, args.vocab_size,
                                args.prompt_len):
            fh.write(json.dumps({"prompt": dpo.words(ids)}) + "\n")
    reward = os.path.join(work, "bench_reward.py")
    with open(reward, "w") as fh:
        fh.write(REWARD_SOURCE)
    return {"tokenizer": tok_dir, "prompts": prompts, "reward": reward}


def config(args, files: Dict[str, str], work: str):
    """Our validated Config of the benchmark (fp32, ZeRO 0, one process, one optimizer step per rollout)."""
    from megatron.engines.run_config import load_run_config

    completions = args.prompts * args.group
    sets = [
        "model.arch=llama", f"model.hidden_size={args.hidden_size}", f"model.num_layers={args.num_layers}",
        f"model.num_attention_heads={args.num_heads}", f"model.num_kv_heads={args.num_heads}",
        f"model.vocab_size={args.vocab_size}", f"model.max_seq_len={args.prompt_len + args.completion_len}",
        f"model.kernels={args.kernels}", "model.dropout=0.0", "parallel.zero_stage=0",
        f"train.micro_batch_size={args.micro_batch or completions}", f"train.global_batch_size={completions}",
        f"train.iters={args.warmup + args.steps}", f"train.seed={args.seed}", "train.precision=fp32",
        "train.progress_bar=false", f"optimizer.lr={args.lr}", "optimizer.weight_decay=0.0",
        "optimizer.schedule=constant", "optimizer.grad_clip=1.0", f"data.tokenizer={files['tokenizer']}",
        "data.shuffle=false", "objective.name=grpo", f"objective.kl_coef={args.beta}", "objective.kl_estimator=k3",
        "objective.loss_agg=token_mean", "objective.scale_rewards=group", "objective.clip_low=0.2",
        f"rollout.prompts_path={files['prompts']}", f"rollout.num_generations={args.group}",
        f"rollout.prompts_per_step={args.prompts}", "generation.temperature=1.0",
        f"generation.max_new_tokens={args.completion_len}", "generation.ignore_eos=true",
        f"generation.batch_size={completions}", f"generation.seed={args.seed}",
        f"reward.function=[{files['reward']}:even_tokens]", "checkpoint.save=null", "checkpoint.load=null",
        f"logging.dir={os.path.join(work, 'logs')}", "launcher.num_gpus=1"]
    return load_run_config([], sets, world_size=1)


def _summary(side: str, times: List[float], completions: int, extra: Dict[str, Any]) -> Dict[str, Any]:
    med = statistics.median(times)
    out = dict(side=side, step_times_s=times, median_step_s=med, completions_per_s=completions / med, **extra)
    out["median_cpu_s"] = statistics.median(out["step_cpu_s"])
    return out


# ------------------------------------------------------------------------------------------------------ sides
def run_ours(args, work: str, rss_base: float) -> Dict[str, Any]:
    """Our online loop; the per-step time it logs, and the process CPU time between its steps."""
    from megatron.training.online import run_online
    from megatron.training.trainer import Hooks

    files = write_inputs(args, work)
    marks = [time.process_time()]

    def mark(step: int) -> bool:
        marks.append(time.process_time())
        return False  # never asks the loop to stop

    hist = run_online(config(args, files, work), Hooks(after_step=mark)).history
    timed = hist[args.warmup:]
    cpu = [b - a for a, b in zip(marks[:-1], marks[1:])][args.warmup:]
    return _summary("ours", [r["time/step_s"] for r in timed], args.prompts * args.group, dict(
        step_cpu_s=cpu, generate_s=statistics.median(r["time/generate_s"] for r in timed),
        train_s=statistics.median(r["time/train_s"] for r in timed),
        response_length=statistics.mean(r["response_length/mean"] for r in timed),
        rewards=[r["reward/mean"] for r in hist], **dpo._memory(rss_base)))


def save_hf_model(args, files: Dict[str, str], work: str, out_dir: str) -> None:
    """Our initial policy (the same config and seed) as a LlamaForCausalLM in `out_dir`."""
    import torch
    from transformers import LlamaForCausalLM

    from megatron.engines.build import build_policy
    from megatron.interop.hf_config import model_to_hf_config
    from megatron.interop.hf_mapping import canonical_to_hf
    from megatron.mpu import ParallelState

    cfg = config(args, files, work)
    ours = build_policy(cfg, ParallelState.single(), None)
    hf_cfg = model_to_hf_config(cfg, "llama", value_head=False, dtype="float32")
    hf_cfg.bos_token_id, hf_cfg.eos_token_id, hf_cfg.pad_token_id = None, dpo.EOS_ID, dpo.PAD_ID
    with torch.device("meta"):
        hf = LlamaForCausalLM(hf_cfg)
    hf.load_state_dict(canonical_to_hf(ours.state_dict(), cfg, "llama"), strict=True, assign=True)
    hf.save_pretrained(out_dir)


def run_trl(args, work: str, rss_base: float) -> Dict[str, Any]:
    """TRL's GRPOTrainer on the same weights, prompts and settings; its step times."""
    import importlib.util

    import torch
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    files = write_inputs(args, work)
    model_dir = os.path.join(work, "hf_model")
    save_hf_model(args, files, work, model_dir)
    spec = importlib.util.spec_from_file_location("bench_reward", files["reward"])
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    with open(files["prompts"]) as fh:
        prompts = [json.loads(line)["prompt"] for line in fh]
    completions = args.prompts * args.group
    cfg = GRPOConfig(
        output_dir=os.path.join(work, "trl_out"), per_device_train_batch_size=completions,
        gradient_accumulation_steps=1, steps_per_generation=1, num_iterations=1, num_generations=args.group,
        max_completion_length=args.completion_len, generation_kwargs={"min_new_tokens": args.completion_len},
        temperature=1.0, top_p=1.0, top_k=0, beta=args.beta, loss_type="dapo", scale_rewards="group",
        epsilon=0.2, learning_rate=args.lr, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0,
        max_grad_norm=1.0, max_steps=args.warmup + args.steps, bf16=False, fp16=False, use_cpu=not
        torch.cuda.is_available(), shuffle_dataset=False, disable_dropout=True, logging_steps=10**6,
        save_strategy="no", report_to="none", disable_tqdm=True, dataloader_num_workers=0, seed=args.seed,
        model_init_kwargs={"dtype": torch.float32, "attn_implementation": "sdpa"})

    class Timer(TrainerCallback):
        def __init__(self) -> None:
            self.t0, self.c0, self.times, self.cpu, self.lengths, self.rewards = 0.0, 0.0, [], [], [], []

        def on_step_begin(self, a, state, control, **kw):
            dpo._sync()
            self.t0, self.c0 = time.perf_counter(), time.process_time()

        def on_step_end(self, a, state, control, **kw):
            dpo._sync()
            self.times.append(time.perf_counter() - self.t0)
            self.cpu.append(time.process_time() - self.c0)
            m = trainer._metrics["train"]  # this step's generation metrics (cleared when TRL logs)
            if m.get("completions/mean_length"):
                self.lengths.append(m["completions/mean_length"][-1])
            if m.get("reward"):
                self.rewards.append(m["reward"][-1])

    timer = Timer()
    trainer = GRPOTrainer(model=model_dir, reward_funcs=module.even_tokens, args=cfg,
                          train_dataset=Dataset.from_dict({"prompt": prompts}),
                          processing_class=dpo.word_tokenizer(args.vocab_size), callbacks=[timer])
    trainer.train()
    import trl
    lengths = timer.lengths[args.warmup:]
    return _summary("trl", timer.times[args.warmup:], completions, dict(
        step_cpu_s=timer.cpu[args.warmup:], response_length=statistics.mean(lengths) if lengths else None,
        rewards=timer.rewards,
        trl_version=trl.__version__, **dpo._memory(rss_base)))


# ------------------------------------------------------------------------------------------------ orchestration
def worker(side: str, args) -> Dict[str, Any]:
    """Run one side in this process (called as `--worker SIDE` by the parent)."""
    import torch
    if args.threads:
        torch.set_num_threads(args.threads)
    if side == "trl":
        try:
            import trl  # noqa: F401
            from trl import GRPOTrainer  # noqa: F401
        except Exception as exc:  # noqa: BLE001
            return {"side": side, "skipped": f"trl is not installed or does not import ({exc})"}
    import deepspeed  # noqa: F401  (imported before the memory baseline on both sides)
    import megatron.training.online  # noqa: F401
    rss_base = dpo.rss_mb()
    work = tempfile.mkdtemp(prefix=f"bench_grpo_{side}_")
    try:
        return run_trl(args, work, rss_base) if side == "trl" else run_ours(args, work, rss_base)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _forward_args(args) -> List[str]:
    out = []
    for key in ("hidden_size", "num_layers", "num_heads", "vocab_size", "prompts", "group", "prompt_len",
                "completion_len", "micro_batch", "warmup", "steps", "seed", "lr", "beta", "kernels", "threads"):
        v = getattr(args, key)
        if v is not None:
            out += [f"--{key.replace('_', '-')}", str(v)]
    return out


def run_side(side: str, args) -> Dict[str, Any]:
    """Run `side` in a fresh subprocess and return its result dict (or {'error': ...})."""
    with tempfile.TemporaryDirectory(prefix="bench_grpo_") as tmp:
        out = os.path.join(tmp, "result.json")
        env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(dpo.free_port()), TQDM_DISABLE="1",
                   TOKENIZERS_PARALLELISM="false")
        for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
            env.pop(k, None)
        cmd = [sys.executable, os.path.abspath(__file__), "--worker", side, "--result", out] + _forward_args(args)
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=args.timeout)
        if proc.returncode != 0 or not os.path.exists(out):
            return {"side": side, "error": f"exit {proc.returncode}",
                    "log_tail": (proc.stdout + proc.stderr).strip().splitlines()[-25:]}
        with open(out) as fh:
            res = json.load(fh)
        res["wall_s"] = time.perf_counter() - t0
        return res


def merge_rounds(rs: List[Dict[str, Any]], completions: int) -> Dict[str, Any]:
    """One result per side from its rounds: the timed steps pooled (median), the highest peak memory."""
    good = [r for r in rs if "completions_per_s" in r]
    if not good or len(good) != len(rs):
        return next((r for r in rs if "completions_per_s" not in r), {"side": "?", "error": "no runs"})
    out = dict(good[0])
    out["step_times_s"] = [t for r in good for t in r["step_times_s"]]
    out["step_cpu_s"] = [t for r in good for t in r["step_cpu_s"]]
    out["median_step_s"] = statistics.median(out["step_times_s"])
    out["median_cpu_s"] = statistics.median(out["step_cpu_s"])
    out["completions_per_s"] = completions / out["median_step_s"]
    out["peak_rss_mb"] = max(r["peak_rss_mb"] for r in good)
    out["rounds"] = len(good)
    return out


def format_table(results: Sequence[Dict[str, Any]], args) -> str:
    head = (f"{'side':<6}{'completions/s':>15}{'gen tokens/s':>14}{'step s':>9}{'min s':>8}{'cpu s':>8}{'gen s':>8}"
            f"{'peak MB':>9}")
    lines = [head, "-" * len(head)]
    for r in results:
        if "completions_per_s" not in r:
            lines.append(f"{r['side']:<6}  {r.get('skipped') or r.get('error')}")
            continue
        gen = f"{r['generate_s']:.2f}" if r.get("generate_s") is not None else "-"
        lines.append(f"{r['side']:<6}{r['completions_per_s']:>15.2f}"
                     f"{r['completions_per_s'] * args.completion_len:>14.0f}{r['median_step_s']:>9.2f}"
                     f"{min(r['step_times_s']):>8.2f}{r['median_cpu_s']:>8.2f}{gen:>8}{r['peak_rss_mb']:>9.0f}")
    return "\n".join(lines)


def parse_args(argv: Optional[Sequence[str]] = None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sides", default="ours,trl", help="comma list of ours, trl")
    p.add_argument("--hidden-size", type=int, default=256)
    p.add_argument("--num-layers", type=int, default=4)
    p.add_argument("--num-heads", type=int, default=4)
    p.add_argument("--vocab-size", type=int, default=8000)
    p.add_argument("--prompts", type=int, default=8, help="prompts per step")
    p.add_argument("--group", type=int, default=4, help="completions per prompt (num_generations)")
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--completion-len", type=int, default=64, help="tokens of every completion")
    p.add_argument("--micro-batch", type=int, default=None, help="our completions per forward (default: all)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--lr", type=float, default=1e-6)
    p.add_argument("--beta", type=float, default=0.04, help="KL coefficient (TRL's beta; our objective.kl_coef)")
    p.add_argument("--kernels", default="auto", choices=("auto", "eager", "fused"), help="our model.kernels")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads on both sides")
    p.add_argument("--rounds", type=int, default=1, help="run the sides this many times, interleaved, pooling the "
                   "timed steps (use >1 on a shared, noisy machine)")
    p.add_argument("--timeout", type=int, default=3600, help="seconds per side and round")
    p.add_argument("--json", default=None, help="also write all results here")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--result", default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    if args.worker:
        try:
            res = worker(args.worker, args)
        finally:
            from megatron.mpu.distributed import shutdown_distributed
            shutdown_distributed()
        with open(args.result, "w") as fh:
            json.dump(res, fh)
        return 0
    sides = [s.strip() for s in args.sides.split(",") if s.strip()]
    bad = [s for s in sides if s not in SIDES]
    if bad:
        raise SystemExit(f"unknown side(s) {bad}; choose from {', '.join(SIDES)}")
    import torch
    completions = args.prompts * args.group
    print(f"# GRPO benchmark: hidden {args.hidden_size}, {args.num_layers} layers, {args.num_heads} heads, vocab "
          f"{args.vocab_size}, {args.prompts} prompts x {args.group} completions per step, prompts "
          f"{args.prompt_len} tokens, completions {args.completion_len} tokens, beta {args.beta}, "
          f"{args.warmup} warm-up + {args.steps} timed steps (median), torch {torch.__version__}, "
          f"threads {args.threads or torch.get_num_threads()}", flush=True)
    runs: Dict[str, List[Dict[str, Any]]] = {s: [] for s in sides}
    for rnd in range(args.rounds):  # interleaved, so a change of machine load hits both sides alike
        for s in sides:
            load0 = os.getloadavg()[0]
            r = run_side(s, args)
            r["loadavg_1min"] = [load0, os.getloadavg()[0]]
            runs[s].append(r)
            status = (f"{r['completions_per_s']:.2f} completions/s, median step {r['median_step_s']:.2f} s"
                      if "completions_per_s" in r else (r.get("error") or r.get("skipped")))
            print(f"  [{rnd + 1}/{args.rounds}] {s}: {status} (load {load0:.1f})", flush=True)
            if "log_tail" in r:
                print("    " + "\n    ".join(r["log_tail"]), file=sys.stderr)
    results = [merge_rounds(runs[s], completions) for s in sides]
    print()
    print(format_table(results, args))
    by = {r["side"]: r for r in results if "completions_per_s" in r}
    if "ours" in by and "trl" in by:
        a, b = by["ours"], by["trl"]
        print(f"\nours / TRL: {a['completions_per_s'] / b['completions_per_s']:.2f}x completions/s (median step), "
              f"{b['median_cpu_s'] / a['median_cpu_s']:.2f}x on CPU time per step, "
              f"{min(b['step_times_s']) / min(a['step_times_s']):.2f}x on the fastest step; response length "
              f"{a.get('response_length')} vs {b.get('response_length')} tokens")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"args": vars(args), "results": results}, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
