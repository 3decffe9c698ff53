"""Kernel measurements behind docs/benchmarks.md (CPU time, one torch thread by default).

    python -m megatron.model.kernels.bench ops
        forward + backward of each fast path and its twin at the DPO benchmark's shapes
    python -m megatron.model.kernels.bench step --variant fused="" \
        --variant eager="model.kernels=eager model.attention=sdpa"
        policy forward + backward and reference forward of the DPO benchmark model (hidden 256, 4 layers,
        8 pairs per micro-batch, prompts 32-96 / responses 32-160 tokens) under each variant's --set overrides,
        steps interleaved across variants; prints the first step (compilation shows there) and the median
        of the others. --vocab-size, --pack/--no-pack, --steps.

The step numbers are the model's own work (no optimizer, no DeepSpeed); tools/bench_dpo.py times the
trainer's whole step against TRL.
"""
from __future__ import annotations

import argparse
import random
import time
from typing import Callable, Dict, List, Sequence

import torch


def cpu_ms(fn: Callable[[], None], n: int = 21) -> float:
    """Median process CPU time of `fn()` over n calls after one warm-up call, in ms."""
    fn()
    times = []
    for _ in range(n):
        c = time.process_time()
        fn()
        times.append(time.process_time() - c)
    return sorted(times)[n // 2] * 1000


def _fwd_bwd(fn, inputs: Sequence[torch.Tensor], grads: Sequence[torch.Tensor]) -> Callable[[], None]:
    def run():
        for t in inputs:
            t.grad = None
        out = fn(*inputs)
        torch.autograd.backward(out if isinstance(out, tuple) else (out,), grads)
    return run


def packed_segments(rows: int, width: int, lo: int, hi: int, seed: int = 0) -> torch.Tensor:
    """segment_ids [rows, width]: sequences of lo..hi tokens packed greedily, padding at the row ends."""
    rng = random.Random(seed)
    seg = torch.zeros(rows, width, dtype=torch.long)
    for b in range(rows):
        t, i = 0, 1
        while t < width - lo:
            n = min(rng.randint(lo, hi), width - t)
            seg[b, t:t + n] = i
            t, i = t + n, i + 1
    return seg


def op_table() -> List[str]:
    """Per-op CPU ms (forward + backward) of each fast path against its twin."""
    from megatron.model.attention_backends import eager_attention, sdpa_attention, segment_attention
    from megatron.model.kernels import fused_rms_norm, fused_rotary, fused_swiglu, swiglu
    from megatron.model.norm import rms_norm
    from megatron.model.rotary import apply_rotary

    g = torch.Generator().manual_seed(0)
    T, H, F = 2900, 256, 704
    x = torch.randn(T, H, generator=g, requires_grad=True)
    w = (1 + 0.1 * torch.randn(H, generator=g)).requires_grad_()
    gx = torch.randn(T, H, generator=g)
    lines = ["rmsnorm [2900, 256]: eager %.2f ms, fused %.2f ms" % (
        cpu_ms(_fwd_bwd(lambda a, b: rms_norm(a, b, 1e-5), [x, w], [gx])),
        cpu_ms(_fwd_bwd(lambda a, b: fused_rms_norm(a, b, 1e-5), [x, w], [gx])))]
    h = torch.randn(T, 2 * F, generator=g, requires_grad=True)
    gh = torch.randn(T, F, generator=g)
    lines.append("swiglu [2900, 2 x 704]: eager %.2f ms, fused %.2f ms" % (
        cpu_ms(_fwd_bwd(swiglu, [h], [gh])), cpu_ms(_fwd_bwd(fused_swiglu, [h], [gh]))))
    B, S, nh, hd = 6, 484, 4, 64
    q = torch.randn(B, S, nh, hd, generator=g, requires_grad=True)
    k = torch.randn(B, S, nh, hd, generator=g, requires_grad=True)
    freqs = torch.rand(B, S, hd // 2, generator=g) * 100
    c, s = freqs.cos(), freqs.sin()
    cc, ss = torch.cat((c, c), -1), torch.cat((s, s), -1)
    gq, gk = torch.randn_like(q), torch.randn_like(k)
    lines.append("rotary q + k [6, 484, 4, 64]: eager %.2f ms, fused %.2f ms" % (
        cpu_ms(_fwd_bwd(lambda a, b: (apply_rotary(a, cc, ss), apply_rotary(b, cc, ss)), [q, k], [gq, gk])),
        cpu_ms(_fwd_bwd(lambda a, b: fused_rotary(a, b, c, s), [q, k], [gq, gk]))))
    seg = packed_segments(B, S, 64, 256)
    v = torch.randn(B, S, nh, hd, generator=g, requires_grad=True)
    go = torch.randn(B, S, nh, hd, generator=g)
    backends = (("eager", eager_attention), ("sdpa (mask)", sdpa_attention), ("segments", segment_attention))
    res = {name: cpu_ms(_fwd_bwd(lambda a, b, d: fn(a, b, d, seg), [q, k, v], [go]), 9) for name, fn in backends}
    lines.append("attention, packed rows [6, 484], 4 heads x 64, segments of 64-256: "
                 + ", ".join(f"{name} {ms:.1f} ms" for name, ms in res.items()))
    return lines


def dpo_like_batches(n: int, vocab: int, pack: bool, seed: int = 1234, pairs: int = 8):
    """n micro-batches of `pairs` synthetic preference pairs (prompts 32-96, responses 32-160 tokens)."""
    import numpy as np
    from megatron.data import Example, SequenceData, collate

    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        examples = []
        for i in range(pairs):
            prompt = rng.integers(3, vocab, int(rng.integers(32, 97))).tolist()
            seqs = [SequenceData(ids=np.asarray(prompt + rng.integers(3, vocab, int(rng.integers(32, 161))).tolist(),
                                                dtype=np.int64), prompt_len=len(prompt), dataset_index=2 * i + j)
                    for j in range(2)]
            examples.append(Example(index=i, kind="pairwise", sequences=seqs))
        out.append(collate(examples, pack, 512))
    return out


def step_table(variants: Dict[str, List[str]], vocab: int, pack: bool, steps: int) -> List[str]:
    """First-step and median CPU s of the policy + reference forward/backward per variant (interleaved)."""
    from megatron.config import load_config
    from megatron.model import GPTModel
    from megatron.mpu import ParallelState

    base = ["model.arch=llama", "model.hidden_size=256", "model.num_layers=4", "model.num_attention_heads=4",
            f"model.vocab_size={vocab}", "model.max_seq_len=512", "train.micro_batch_size=8",
            "train.global_batch_size=8", "objective.name=dpo"]
    ps = ParallelState.single()
    models = {}
    for name, sets in variants.items():
        cfg = load_config([], base + sets, world_size=1)
        torch.manual_seed(0)
        policy, ref = GPTModel(cfg, ps), GPTModel(cfg, ps)
        ref.load_state_dict(policy.state_dict())
        models[name] = (policy, ref.eval())
    batches = dpo_like_batches(steps, vocab, pack)

    def logp_sum(model, b):
        index = (b["loss_mask"].reshape(-1) != 0).nonzero().squeeze(1)
        return model(b["input_ids"], b["position_ids"], b["segment_ids"], logit_index=index,
                     labels=b["labels"].reshape(-1).index_select(0, index)).sum()

    times: Dict[str, List[float]] = {name: [] for name in models}
    for b in batches:
        for name, (policy, ref) in models.items():
            c = time.process_time()
            with torch.no_grad():
                logp_sum(ref, b)
            logp_sum(policy, b).backward()
            times[name].append(time.process_time() - c)
    lines = []
    for name, t in times.items():
        rest = sorted(t[1:])
        lines.append(f"{name}: first step {t[0]:.3f} CPU s, median of the other {len(rest)} {rest[len(rest) // 2]:.3f} "
                     f"CPU s, all {sum(t):.2f} CPU s")
    return lines


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=("ops", "step"))
    p.add_argument("--variant", action="append", default=[], metavar='NAME="a.b=c d.e=f"',
                   help="step: a named list of --set overrides (repeat)")
    p.add_argument("--vocab-size", type=int, default=512)
    p.add_argument("--pack", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.what == "ops":
        lines = op_table()
    else:
        variants = {}
        for v in args.variant or ['auto=']:
            name, _, sets = v.partition("=")
            variants[name] = sets.split()
        lines = step_table(variants, args.vocab_size, args.pack, args.steps)
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
