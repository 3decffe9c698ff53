#!/usr/bin/env python
"""DPO training throughput: our code path (packed / unpacked, live / precomputed reference) and, when `trl` is
installed, TRL's DPOTrainer on the same model weights, the same pairs and the same batch size.

    python tools/bench_dpo.py                       # default shape, every variant, a table and the ratios
    python tools/bench_dpo.py --variants ours-packed-live,trl-live --steps 8 --json out.json
    python tools/bench_dpo.py --vocab-size 8000 --hidden-size 256 --num-layers 4
    python tools/bench_dpo.py --variants ours-packed-live,ours-eager-packed-live   # kernels vs their eager twins

Every variant runs in its own subprocess (`--worker VARIANT`), so each one's peak memory is its own. A variant
trains `--warmup` + `--steps` optimizer steps (forward + backward + optimizer), one micro-batch of `--batch-pairs`
pairs per step; the warm-up steps are not timed and the median of the timed steps is reported.

Ours runs the trainer's own step (`megatron.training.trainer._step_micro_batches`): a DeepSpeed engine at ZeRO 0
on one process around `GPTModel` (`model.kernels` from `--kernels`, default auto; the opt-in `ours-eager-*`
variants use the plain-torch twins, model.kernels=eager and model.attention=sdpa, i.e. the step before the
kernel registry), `forward_stats` (vocab-parallel log-probs, `sequence_stats`), the frozen
reference of `build_reference` (live) or the collator's `ref_logps` (precomputed, computed by the same reference
forward before the timed loop), the registered `dpo` objective, `engine.backward` and `engine.step`.
TRL (optional dependency, `pip install trl`; without it the TRL rows say so and are skipped) runs
`trl.DPOTrainer` on a `transformers.LlamaForCausalLM` holding the same initial weights (converted with
`megatron.interop`), fed the same token ids through a word-level tokenizer (`t<id>` words, checked token by
token after TRL's own tokenisation), fp32 on both sides, no gradient checkpointing, no dropout, sequential
sampling, the same lr / clip / beta / sigmoid loss. Its step time is `on_step_begin` -> `on_step_end`
(forward, backward, clipping, optimizer step), like ours excluding the data loader.

Columns: pairs/s and tokens/s (real tokens, padding excluded) from the median step time ("step s"); "min s" the
fastest timed step; "cpu s" the median process CPU time of a step (all threads); pad = padding fraction of the
model's input positions; peak MB = the process's max RSS (`ru_maxrss`; on GPU also
`torch.cuda.max_memory_allocated` in the JSON); +MB = that peak minus the RSS measured after the imports (the
training working set: models, optimizer state, activations), which discounts the frameworks' different import
sizes. On a shared machine use `--rounds N`: the variants run N times interleaved and their steps are pooled.
Results: docs/benchmarks.md.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any, Dict, List, Optional, Sequence, Tuple

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

OURS = ("ours-packed-live", "ours-unpacked-live", "ours-packed-precomputed", "ours-unpacked-precomputed")
TRL = ("trl-live", "trl-precomputed")
# opt-in: our step with the plain-torch twins (model.kernels=eager, masked sdpa attention), i.e. before the
# kernel registry, for a before/after comparison in the same interleaved rounds
OURS_EAGER = ("ours-eager-packed-live", "ours-eager-unpacked-live")
VARIANTS = OURS + TRL
KNOWN = VARIANTS + OURS_EAGER
PAD_ID, EOS_ID, UNK_ID, FIRST_WORD_ID = 0, 1, 2, 3  # synthetic vocabulary: <pad>, </s>, <unk>, then t3 ...


# ---------------------------------------------------------------------------------------------- shared helpers
def rss_mb() -> float:
    """Current resident set size of this process in MiB (Linux /proc; psutil elsewhere)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    import psutil
    return psutil.Process().memory_info().rss / 2**20


def max_rss_mb() -> float:
    """Peak resident set size of this process so far in MiB (ru_maxrss is KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024.0


def trl_available() -> Tuple[bool, str]:
    """(True, version) when trl and its trainer import, else (False, why)."""
    try:
        import trl  # noqa: F401
        from trl import DPOConfig, DPOTrainer  # noqa: F401
        return True, getattr(trl, "__version__", "?")
    except Exception as exc:  # ImportError, or a broken install
        return False, f"{type(exc).__name__}: {exc}"


def make_pairs(n: int, seed: int, vocab_size: int, prompt_len: Sequence[int],
               response_len: Sequence[int]) -> List[Dict[str, List[int]]]:
    """`n` synthetic preference pairs {prompt, chosen, rejected} of token ids.

    Lengths uniform in the inclusive ranges; chosen and rejected each end with EOS (counted in their length);
    token ids uniform in [FIRST_WORD_ID, vocab_size). Deterministic in `seed`.
    """
    import numpy as np

    rng = np.random.default_rng(seed)
    lo_p, hi_p = prompt_len
    lo_r, hi_r = response_len
    if lo_r < 1 or lo_p < 1 or vocab_size <= FIRST_WORD_ID:
        raise ValueError("lengths must be >= 1 and vocab_size > 3")
    pairs = []
    for _ in range(n):
        p = int(rng.integers(lo_p, hi_p + 1))
        c, r = (int(x) for x in rng.integers(lo_r, hi_r + 1, size=2))
        words = lambda k: rng.integers(FIRST_WORD_ID, vocab_size, size=k).tolist()
        pairs.append({"prompt": words(p), "chosen": words(c - 1) + [EOS_ID], "rejected": words(r - 1) + [EOS_ID]})
    return pairs


def to_examples(pairs: Sequence[Dict[str, List[int]]], ref_logps: Optional[Sequence[float]] = None):
    """Pairs -> megatron.data Examples (pairwise: [chosen, rejected]); `ref_logps` [2 * len(pairs)] optional."""
    import numpy as np
    from megatron.data import Example, SequenceData

    out = []
    for i, p in enumerate(pairs):
        seqs = []
        for j, key in enumerate(("chosen", "rejected")):
            k = 2 * i + j
            seqs.append(SequenceData(ids=np.asarray(p["prompt"] + p[key], dtype=np.int64),
                                     prompt_len=len(p["prompt"]), dataset_index=k,
                                     ref_logp=None if ref_logps is None else float(ref_logps[k])))
        out.append(Example(index=i, kind="pairwise", sequences=seqs))
    return out


def model_config(args, pack: bool, reference: str, eager: bool = False):
    """Our validated Config for the benchmark shape (fp32, ZeRO 0, 1 process, one micro-batch per step);
    `eager`: the plain-torch twins (model.kernels=eager, model.attention=sdpa) instead of --kernels."""
    from megatron.engines.run_config import load_run_config

    sets = [
        "model.arch=llama", f"model.hidden_size={args.hidden_size}", f"model.num_layers={args.num_layers}",
        f"model.num_attention_heads={args.num_heads}", f"model.num_kv_heads={args.num_kv_heads or args.num_heads}",
        f"model.vocab_size={args.vocab_size}", f"model.max_seq_len={args.max_seq_len}", "model.norm=rmsnorm",
        "model.activation=swiglu", f"model.attention={'sdpa' if eager else args.attention}",
        f"model.kernels={'eager' if eager else args.kernels}",
        "model.dropout=0.0",
        "parallel.zero_stage=0", "parallel.tensor=1", "parallel.pipeline=1",
        f"train.micro_batch_size={args.batch_pairs}", f"train.global_batch_size={args.batch_pairs}",
        f"train.iters={args.warmup + args.steps}", f"train.seed={args.seed}", "train.precision=fp32",
        f"optimizer.lr={args.lr}", "optimizer.weight_decay=0.0", "optimizer.schedule=constant",
        "optimizer.warmup_iters=0", "optimizer.grad_clip=1.0",
        f"data.pack={'true' if pack else 'false'}", "objective.name=dpo", f"objective.beta={args.beta}",
        "objective.loss_type=sigmoid", f"reference.mode={reference}", "launcher.num_gpus=1",
    ]
    if args.ffn_hidden_size:
        sets.append(f"model.ffn_hidden_size={args.ffn_hidden_size}")
    return load_run_config([], sets, world_size=1)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _summary(variant: str, times: List[float], cpu: List[float], pairs_per_step: int, real_tokens: List[int],
             positions: List[int], extra: Dict[str, Any]) -> Dict[str, Any]:
    med = statistics.median(times)
    tok = statistics.mean(real_tokens)
    return dict(variant=variant, step_times_s=times, step_cpu_s=cpu, median_step_s=med,
                median_cpu_s=statistics.median(cpu), pairs_per_s=pairs_per_step / med,
                tokens_per_s=tok / med, real_tokens_per_step=tok, positions_per_step=statistics.mean(positions),
                padding_fraction=1.0 - sum(real_tokens) / max(sum(positions), 1), **extra)


def _memory(rss_base: float) -> Dict[str, Any]:
    import torch

    out = {"rss_after_imports_mb": rss_base, "peak_rss_mb": max_rss_mb()}
    out["peak_delta_mb"] = out["peak_rss_mb"] - rss_base
    if torch.cuda.is_available():
        out["cuda_max_allocated_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return out


def _sync() -> None:
    import torch
    if torch.cuda.is_available():
        torch.cuda.synchronize()


# --------------------------------------------------------------------------------------------------- our side
def run_ours(variant: str, args, rss_base: float) -> Dict[str, Any]:
    """Train through the trainer's step function and time it."""
    import deepspeed
    import torch

    from megatron.data import collate
    from megatron.mpu import initialize_parallel
    from megatron.objectives import build_objective
    from megatron.engines.deepspeed_config import build_deepspeed_config
    from megatron.mpu.distributed import init_distributed
    from megatron.engines.forward import batch_to, forward_stats
    from megatron.engines.schedules import lambda_lr_factory
    from megatron.engines.build import build_policy, build_reference, device_for_rank, param_groups
    from megatron.training.trainer import _step_micro_batches

    pack = "-packed-" in variant
    reference = "live" if variant.endswith("-live") else "precomputed"
    eager = variant in OURS_EAGER
    cfg = model_config(args, pack, reference, eager)
    init_distributed(cfg.parallel.backend)
    ps = initialize_parallel(1, 1)
    device = device_for_rank()
    n_steps = args.warmup + args.steps
    pairs = make_pairs(n_steps * args.batch_pairs, args.seed, args.vocab_size, args.prompt_len, args.response_len)

    model = build_policy(cfg, ps, None)
    ref_logps = None
    if reference == "precomputed":
        # The reference log-probs a precompute pass would store: the initial policy, no graph, any layout.
        ref = build_reference(model_config(args, pack, "live", eager), ps, model, device, deepspeed)
        values = []
        with torch.no_grad():
            for s in range(n_steps):
                b = collate(to_examples(pairs[s * args.batch_pairs:(s + 1) * args.batch_pairs]), pack, cfg.model.max_seq_len)
                values += forward_stats(ref, batch_to(b, device), ps, False).logp_sum.tolist()
        ref_logps = values
        del ref
    ref_model = build_reference(cfg, ps, model, device, deepspeed)
    ds_cfg = build_deepspeed_config(cfg, use_torch_adam=not torch.cuda.is_available())
    engine, _opt, _, _sched = deepspeed.initialize(
        model=model, model_parameters=param_groups(model, cfg.optimizer.weight_decay), config=ds_cfg,
        lr_scheduler=lambda_lr_factory(cfg.optimizer, cfg.train.iters), mpu=ps)
    objective = build_objective(cfg, ps)
    examples = to_examples(pairs, ref_logps)
    batches = [collate(examples[s * args.batch_pairs:(s + 1) * args.batch_pairs], pack, cfg.model.max_seq_len)
               for s in range(n_steps)]
    engine.train()
    times, cpu, losses, metrics0 = [], [], [], {}
    for s, batch in enumerate(batches):
        _sync()
        t0, c0 = time.perf_counter(), time.process_time()
        metrics, _tokens = _step_micro_batches(engine, ref_model, objective, [batch], ps, cfg, device, True)
        _sync()
        dt, dc = time.perf_counter() - t0, time.process_time() - c0
        losses.append(metrics["loss"])
        if s == 0:
            metrics0 = metrics
        if s >= args.warmup:
            times.append(dt)
            cpu.append(dc)
    timed = batches[args.warmup:]
    real = [int((b["segment_ids"] > 0).sum()) for b in timed]
    positions = [b["segment_ids"].numel() for b in timed]
    shapes = sorted({tuple(b["input_ids"].shape) for b in timed})
    return _summary(variant, times, cpu, args.batch_pairs, real, positions, dict(
        losses=losses, first_logps_chosen=metrics0.get("logps/chosen"),
        first_logps_rejected=metrics0.get("logps/rejected"), batch_shapes=[list(x) for x in shapes],
        **_memory(rss_base)))


# --------------------------------------------------------------------------------------------------- TRL side
def word_tokenizer(vocab_size: int):
    """A transformers fast tokenizer whose token id i is the word `t<i>` (ids 0-2: <pad>, </s>, <unk>)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": PAD_ID, "</s>": EOS_ID, "<unk>": UNK_ID}
    vocab.update({f"t{i}": i for i in range(FIRST_WORD_ID, vocab_size)})
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")


def words(ids: Sequence[int]) -> str:
    return " ".join(f"t{i}" for i in ids)


def save_hf_model(args, out_dir: str) -> None:
    """Our initial policy (same config and seed as our variants) as a LlamaForCausalLM in `out_dir`."""
    import torch
    from transformers import LlamaForCausalLM

    from megatron.interop.hf_config import model_to_hf_config
    from megatron.interop.hf_mapping import canonical_to_hf
    from megatron.mpu import ParallelState
    from megatron.engines.build import build_policy

    cfg = model_config(args, True, "live")
    ours = build_policy(cfg, ParallelState.single(), None)
    hf_cfg = model_to_hf_config(cfg, "llama", value_head=False, dtype="float32")
    hf_cfg.bos_token_id, hf_cfg.eos_token_id, hf_cfg.pad_token_id = None, EOS_ID, PAD_ID
    with torch.device("meta"):
        hf = LlamaForCausalLM(hf_cfg)
    hf.load_state_dict(canonical_to_hf(ours.state_dict(), cfg, "llama"), strict=True, assign=True)
    hf.save_pretrained(out_dir)


def run_trl(variant: str, args, rss_base: float) -> Dict[str, Any]:
    """Train with trl.DPOTrainer on the same weights / pairs / batch size and time its steps."""
    import torch
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import DPOConfig, DPOTrainer

    precompute = variant == "trl-precomputed"
    n_steps = args.warmup + args.steps
    pairs = make_pairs(n_steps * args.batch_pairs, args.seed, args.vocab_size, args.prompt_len, args.response_len)
    work = tempfile.mkdtemp(prefix="bench_dpo_trl_")
    try:
        model_dir = os.path.join(work, "model")
        save_hf_model(args, model_dir)
        tokenizer = word_tokenizer(args.vocab_size)
        # TRL appends the EOS string to chosen/rejected itself; a leading space keeps the prompt a word prefix.
        data = Dataset.from_dict({"prompt": [words(p["prompt"]) for p in pairs],
                                  "chosen": [" " + words(p["chosen"][:-1]) for p in pairs],
                                  "rejected": [" " + words(p["rejected"][:-1]) for p in pairs]})
        cuda = torch.cuda.is_available()
        config = DPOConfig(
            output_dir=os.path.join(work, "out"), per_device_train_batch_size=args.batch_pairs,
            gradient_accumulation_steps=1, max_steps=n_steps, learning_rate=args.lr, lr_scheduler_type="constant",
            warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0, beta=args.beta, loss_type=["sigmoid"],
            bf16=False, fp16=False, gradient_checkpointing=False, precompute_ref_log_probs=precompute,
            max_length=None, logging_steps=10**6, save_strategy="no", report_to="none", disable_tqdm=True,
            dataloader_num_workers=0, train_sampling_strategy="sequential", use_cpu=not cuda, seed=args.seed,
            model_init_kwargs={"dtype": torch.float32, "attn_implementation": "sdpa"})

        class Timer(TrainerCallback):
            def __init__(self) -> None:
                self.t0, self.c0, self.times, self.cpu, self.first = 0.0, 0.0, [], [], {}

            def on_step_begin(self, a, state, control, **kw):
                _sync()
                self.t0, self.c0 = time.perf_counter(), time.process_time()

            def on_step_end(self, a, state, control, **kw):
                _sync()
                self.times.append(time.perf_counter() - self.t0)
                self.cpu.append(time.process_time() - self.c0)
                if not self.first:
                    m = trainer._metrics["train"]
                    self.first = {k: m[k][0] for k in ("logps/chosen", "logps/rejected") if m.get(k)}

        timer = Timer()
        trainer = DPOTrainer(model=model_dir, args=config, train_dataset=data, processing_class=tokenizer,
                             callbacks=[timer])
        ds = trainer.train_dataset
        for i, p in enumerate(pairs):  # TRL's tokenisation must give back exactly our ids
            row = ds[i]
            if (row["prompt_ids"], row["chosen_ids"], row["rejected_ids"]) != (p["prompt"], p["chosen"], p["rejected"]):
                raise RuntimeError(f"TRL tokenised pair {i} differently from our ids; the comparison would be unfair")
        batches = [trainer.data_collator([ds[i] for i in range(s * args.batch_pairs, (s + 1) * args.batch_pairs)])
                   for s in range(n_steps)]
        out = trainer.train()
        times, cpu = timer.times[args.warmup:], timer.cpu[args.warmup:]
        timed = batches[args.warmup:]
        real = [int(b["attention_mask"].sum()) for b in timed]
        positions = [b["input_ids"].numel() for b in timed]
        shapes = sorted({tuple(b["input_ids"].shape) for b in timed})
        import trl
        return _summary(variant, times, cpu, args.batch_pairs, real, positions, dict(
            losses=[], train_loss=out.training_loss, first_logps_chosen=timer.first.get("logps/chosen"),
            first_logps_rejected=timer.first.get("logps/rejected"), batch_shapes=[list(x) for x in shapes],
            trl_version=trl.__version__, optim=str(config.optim), **_memory(rss_base)))
    finally:
        shutil.rmtree(work, ignore_errors=True)


# ------------------------------------------------------------------------------------------------ orchestration
def worker(variant: str, args) -> Dict[str, Any]:
    """Run one variant in this process (called as `--worker VARIANT` by the parent)."""
    import torch
    if args.threads:
        torch.set_num_threads(args.threads)
    if variant in TRL:
        ok, why = trl_available()
        if not ok:
            return {"variant": variant, "skipped": f"trl is not installed or does not import ({why})"}
    # The frameworks are imported before the after-imports RSS baseline (trl_available imported trl; the TRL
    # worker also imports megatron and deepspeed to convert our initial weights).
    import deepspeed  # noqa: F401
    import megatron.training.trainer  # noqa: F401
    rss_base = rss_mb()
    return run_trl(variant, args, rss_base) if variant in TRL else run_ours(variant, args, rss_base)


def _forward_args(args) -> List[str]:
    out = []
    for key in ("hidden_size", "num_layers", "num_heads", "num_kv_heads", "ffn_hidden_size", "vocab_size",
                "max_seq_len", "batch_pairs", "warmup", "steps", "seed", "lr", "beta", "attention", "kernels",
                "threads"):
        v = getattr(args, key)
        if v is not None:
            out += [f"--{key.replace('_', '-')}", str(v)]
    out += ["--prompt-len", *map(str, args.prompt_len), "--response-len", *map(str, args.response_len)]
    return out


def run_variant(variant: str, args) -> Dict[str, Any]:
    """Run `variant` in a fresh subprocess and return its result dict (or {'error': ...})."""
    with tempfile.TemporaryDirectory(prefix="bench_dpo_") as tmp:
        out = os.path.join(tmp, "result.json")
        env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), TQDM_DISABLE="1",
                   TOKENIZERS_PARALLELISM="false")
        for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
            env.pop(k, None)
        cmd = [sys.executable, os.path.abspath(__file__), "--worker", variant, "--result", out] + _forward_args(args)
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=args.timeout)
        if proc.returncode != 0 or not os.path.exists(out):
            tail = (proc.stdout + proc.stderr).strip().splitlines()[-25:]
            return {"variant": variant, "error": f"exit {proc.returncode}", "log_tail": tail}
        with open(out) as f:
            res = json.load(f)
        res["wall_s"] = time.perf_counter() - t0
        return res


def merge_rounds(rs: List[Dict[str, Any]], pairs_per_step: int) -> Dict[str, Any]:
    """One result from the rounds of a variant: all timed steps pooled (median), the highest peak memory."""
    good = [r for r in rs if "pairs_per_s" in r]
    if len(good) != len(rs) or not good:
        return next((r for r in rs if "pairs_per_s" not in r), {"variant": "?", "error": "no runs"})
    out = dict(good[0])
    out["step_times_s"] = [t for r in good for t in r["step_times_s"]]
    out["step_cpu_s"] = [t for r in good for t in r["step_cpu_s"]]
    out["median_step_s"] = statistics.median(out["step_times_s"])
    out["median_cpu_s"] = statistics.median(out["step_cpu_s"])
    out["pairs_per_s"] = pairs_per_step / out["median_step_s"]
    out["tokens_per_s"] = out["real_tokens_per_step"] / out["median_step_s"]
    for key in ("peak_rss_mb", "peak_delta_mb", "cuda_max_allocated_mb"):
        if key in out:
            out[key] = max(r[key] for r in good)
    out["rounds"] = len(good)
    out["loadavg_1min"] = [x for r in good for x in r.get("loadavg_1min", [])]
    return out


def format_table(results: Sequence[Dict[str, Any]]) -> str:
    head = f"{'variant':<27}{'pairs/s':>9}{'tokens/s':>10}{'step s':>9}{'min s':>8}{'cpu s':>8}{'pad':>7}{'peak MB':>9}{'+MB':>8}  rows x width"
    lines = [head, "-" * len(head)]
    for r in results:
        if "pairs_per_s" not in r:
            lines.append(f"{r['variant']:<27}  {r.get('skipped') or r.get('error')}")
            continue
        shapes = ", ".join("x".join(map(str, s)) for s in r["batch_shapes"][:3]) + (" ..." if len(r["batch_shapes"]) > 3 else "")
        lines.append(f"{r['variant']:<27}{r['pairs_per_s']:>9.2f}{r['tokens_per_s']:>10.0f}{r['median_step_s']:>9.3f}"
                     f"{min(r['step_times_s']):>8.3f}{r['median_cpu_s']:>8.2f}{r['padding_fraction']:>7.1%}{r['peak_rss_mb']:>9.0f}{r['peak_delta_mb']:>8.0f}  {shapes}")
    return "\n".join(lines)


def ratios(results: Sequence[Dict[str, Any]]) -> List[Tuple[str, str, float, float, float, float, float]]:
    """(ours, trl, pairs/s ratio (median wall), speed ratio on median CPU time per step, speed ratio on the fastest
    step, peak RSS ratio, peak-delta ratio)."""
    by = {r["variant"]: r for r in results if "pairs_per_s" in r}
    out = []
    for ours, theirs in (("ours-packed-live", "trl-live"), ("ours-unpacked-live", "trl-live"),
                         ("ours-eager-packed-live", "trl-live"), ("ours-packed-live", "ours-eager-packed-live"),
                         ("ours-unpacked-live", "ours-eager-unpacked-live"),
                         ("ours-packed-precomputed", "trl-precomputed"),
                         ("ours-unpacked-precomputed", "trl-precomputed"),
                         ("ours-packed-precomputed", "trl-live")):
        if ours in by and theirs in by:
            a, b = by[ours], by[theirs]
            out.append((ours, theirs, a["pairs_per_s"] / b["pairs_per_s"], b["median_cpu_s"] / a["median_cpu_s"],
                        min(b["step_times_s"]) / min(a["step_times_s"]),
                        a["peak_rss_mb"] / b["peak_rss_mb"], a["peak_delta_mb"] / max(b["peak_delta_mb"], 1e-9)))
    return out


def parse_args(argv: Optional[Sequence[str]] = None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"comma list of {', '.join(KNOWN)}")
    p.add_argument("--hidden-size", type=int, default=256)
    p.add_argument("--num-layers", type=int, default=4)
    p.add_argument("--num-heads", type=int, default=4)
    p.add_argument("--num-kv-heads", type=int, default=None, help="default: --num-heads (MHA)")
    p.add_argument("--ffn-hidden-size", type=int, default=None, help="default: our swiglu rule (8/3 H, rounded)")
    p.add_argument("--vocab-size", type=int, default=32000, help="synthetic vocabulary (Llama-2 size by default)")
    p.add_argument("--prompt-len", type=int, nargs=2, default=[32, 96], metavar=("MIN", "MAX"))
    p.add_argument("--response-len", type=int, nargs=2, default=[32, 160], metavar=("MIN", "MAX"),
                   help="tokens of each response, EOS included")
    p.add_argument("--max-seq-len", type=int, default=None,
                   help="packed row length; default 2 * (max prompt + max response), so any pair fits a row")
    p.add_argument("--batch-pairs", type=int, default=8)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--lr", type=float, default=1e-6)
    p.add_argument("--beta", type=float, default=0.1)
    p.add_argument("--attention", default="auto", help="our model.attention (auto: follow --kernels; TRL uses sdpa)")
    p.add_argument("--kernels", default="auto", choices=("auto", "eager", "fused"),
                   help="our model.kernels (auto: fused norm/rotary/SwiGLU, per-segment attention, fused head)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads in every variant")
    p.add_argument("--rounds", type=int, default=1, help="run the variant list this many times, interleaved; "
                   "the timed steps of all rounds are pooled (use >1 on a shared, noisy machine)")
    p.add_argument("--timeout", type=int, default=3600, help="seconds per variant")
    p.add_argument("--json", default=None, help="also write all results here")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--result", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.max_seq_len is None:
        args.max_seq_len = 2 * (args.prompt_len[1] + args.response_len[1])
    return args


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    if args.worker:
        try:
            res = worker(args.worker, args)
        finally:
            from megatron.mpu.distributed import shutdown_distributed
            shutdown_distributed()
        with open(args.result, "w") as f:
            json.dump(res, f)
        return 0
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    bad = [v for v in variants if v not in KNOWN]
    if bad:
        raise SystemExit(f"unknown variant(s) {bad}; choose from {', '.join(KNOWN)}")
    ok, why = trl_available()
    import torch
    print(f"# DPO benchmark: model.kernels={args.kernels}, model.attention={args.attention}, "
          f"hidden {args.hidden_size}, {args.num_layers} layers, {args.num_heads} heads, vocab "
          f"{args.vocab_size}, {args.batch_pairs} pairs/step, prompts {args.prompt_len[0]}-{args.prompt_len[1]}, "
          f"responses {args.response_len[0]}-{args.response_len[1]} tokens, max_seq_len {args.max_seq_len}, "
          f"{args.warmup} warm-up + {args.steps} timed steps (median), torch {torch.__version__}, "
          f"threads {args.threads or torch.get_num_threads()}, trl {why if ok else 'NOT AVAILABLE: ' + why}",
          flush=True)
    runs: Dict[str, List[Dict[str, Any]]] = {v: [] for v in variants}
    for rnd in range(args.rounds):  # rounds interleave the variants, so a load change hits all of them alike
        for v in variants:
            if v in TRL and not ok:
                if rnd == 0:
                    runs[v].append({"variant": v, "skipped": f"trl not available ({why}); `pip install trl` to compare"})
                continue
            load0 = os.getloadavg()[0]
            r = run_variant(v, args)
            r["loadavg_1min"] = [load0, os.getloadavg()[0]]
            runs[v].append(r)
            status = (f"{r['pairs_per_s']:.2f} pairs/s, median step {r['median_step_s']:.2f} s wall / "
                      f"{r['median_cpu_s']:.2f} s cpu" if "pairs_per_s" in r else (r.get("error") or r.get("skipped")))
            print(f"  [{rnd + 1}/{args.rounds}] {v}: {status} (load {load0:.1f})", flush=True)
            if "log_tail" in r:
                print("    " + "\n    ".join(r["log_tail"]), file=sys.stderr)
    results = [merge_rounds(runs[v], args.batch_pairs) for v in variants]
    print()
    print(format_table(results))
    rs = ratios(results)
    if rs:
        print(f"\n{'A / B (speed: higher is better; memory: lower)':<53}{'pairs/s':>8}{'cpu':>7}{'min':>7}"
              f"{'peak':>7}{'+MB':>7}")
        for a, b, pr, cr, br, mr, dr in rs:
            print(f"  {a + ' / ' + b:<51}{pr:>7.2f}x{cr:>6.2f}x{br:>6.2f}x{mr:>6.2f}x{dr:>6.2f}x")
    by = {r["variant"]: r for r in results}
    lc = [(v, by[v].get("first_logps_chosen")) for v in variants if by.get(v, {}).get("first_logps_chosen") is not None]
    if lc:
        print("\nstep-1 mean policy logp(chosen) (same weights and pairs should agree): "
              + ", ".join(f"{v} {x:.3f}" for v, x in lc))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "results": results}, f, indent=1)
    return 0 if all("error" not in r for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
