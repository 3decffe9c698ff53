#!/usr/bin/env python
"""Generation throughput: ours (`megatron.generation.generate`) against transformers `generate` on the same
weights, the same prompts and the same lengths, greedy and sampled, at several batch sizes, in one run.

    python tools/bench_generate.py                                   # 4-layer 256-wide Llama, batch 16 and 64
    python tools/bench_generate.py --batch-sizes 16 --new-tokens 64 --vocab-size 32000 --json out.json

The model is a `transformers.LlamaForCausalLM` built from a config (random init, seeded), saved, and converted
into our checkpoint format with `megatron.interop` (tensor 1); ours loads it through `engines.build.build_policy`.
Both run fp32 on the CPU in this process with the same torch thread count, under `torch.inference_mode`.
Prompts: `--batch` rows of `--prompt-len` random token ids (equal lengths: transformers needs no padding);
every row generates exactly `--new-tokens` tokens (EOS ignored on both sides). Sampled: temperature 1, no
top-k / top-p on both sides (transformers' default top_k=50 switched off). Each configuration runs one
untimed warm-up, then `--repeats` timed runs alternating ours / transformers; tokens/s = batch * new tokens
/ median wall time (prefill included); `cpu_speedup` compares the median process CPU times (less
sensitive to other load on a shared machine). Greedy outputs are compared token for token (reported as
`greedy_match`, the fraction of rows equal). Results: docs/benchmarks.md.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from typing import Dict, List

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)


def build_models(args, workdir: str):
    """(hf_model, our_cfg, our_model): a seeded transformers Llama and the same weights in our GPTModel."""
    import torch
    import transformers
    from megatron.checkpoint import weights_io as wio
    from megatron.engines.build import build_policy
    from megatron.interop.convert import hf_to_megatron
    from megatron.mpu import ParallelState

    config = transformers.LlamaConfig(
        vocab_size=args.vocab_size, hidden_size=args.hidden_size, num_hidden_layers=args.num_layers,
        num_attention_heads=args.num_heads, num_key_value_heads=args.num_kv_heads,
        intermediate_size=args.ffn_size, max_position_embeddings=args.prompt_len + args.new_tokens + 8,
        bos_token_id=1, eos_token_id=2, pad_token_id=0)
    torch.manual_seed(args.seed)
    hf = transformers.LlamaForCausalLM(config).eval()
    hf.generation_config.eos_token_id = None  # exactly --new-tokens per row
    hf.generation_config.pad_token_id = 0
    hf.save_pretrained(os.path.join(workdir, "hf"))
    tag_dir = hf_to_megatron(os.path.join(workdir, "hf"), os.path.join(workdir, "ours"), tp=1)
    cfg = wio.read_config(tag_dir)
    ours = build_policy(cfg, ParallelState.single(), tag_dir).eval()
    return hf, cfg, ours


def run_ours(model, cfg, prompts, args, greedy: bool):
    """Token ids [B][new] of our generate()."""
    from megatron.generation import SamplingParams, generate
    from megatron.mpu import ParallelState

    params = SamplingParams(temperature=0.0 if greedy else 1.0, max_new_tokens=args.new_tokens, ignore_eos=True,
                            seed=args.seed)
    out = generate(model, cfg, ParallelState.single(), prompts, params, batch_size=len(prompts))
    return [r[0].token_ids for r in out]


def run_hf(model, prompts, args, greedy: bool):
    """Token ids [B][new] of transformers' generate() (equal-length prompts: no padding)."""
    import torch

    ids = torch.tensor(prompts)
    kwargs = dict(do_sample=False) if greedy else dict(do_sample=True, temperature=1.0, top_k=0, top_p=1.0)
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=args.new_tokens,
                         min_new_tokens=args.new_tokens, **kwargs)
    return out[:, ids.shape[1]:].tolist()


def bench(args) -> Dict:
    import torch

    torch.set_num_threads(args.threads)
    results: List[Dict] = []
    with tempfile.TemporaryDirectory(prefix="bench_generate_") as workdir:
        hf, cfg, ours = build_models(args, workdir)
        g = torch.Generator().manual_seed(args.seed + 1)
        for batch in args.batch_sizes:
            prompts = torch.randint(3, args.vocab_size, (batch, args.prompt_len), generator=g).tolist()
            for mode in ("greedy", "sampled"):
                greedy = mode == "greedy"
                times: Dict[str, List[float]] = {"ours": [], "transformers": []}
                cpu: Dict[str, List[float]] = {"ours": [], "transformers": []}
                outputs = {}
                with torch.inference_mode():
                    for rep in range(args.repeats + 1):  # rep 0: warm-up
                        for name, fn in (("ours", lambda: run_ours(ours, cfg, prompts, args, greedy)),
                                         ("transformers", lambda: run_hf(hf, prompts, args, greedy))):
                            t0, c0 = time.perf_counter(), time.process_time()
                            outputs[name] = fn()
                            if rep:
                                times[name].append(time.perf_counter() - t0)
                                cpu[name].append(time.process_time() - c0)
                assert all(len(r) == args.new_tokens for o in outputs.values() for r in o)
                tokens = batch * args.new_tokens
                row = {"batch": batch, "mode": mode, "new_tokens": args.new_tokens, "prompt_len": args.prompt_len}
                for name, ts in times.items():
                    row[f"{name}_s"] = round(statistics.median(ts), 4)
                    row[f"{name}_tokens_per_s"] = round(tokens / statistics.median(ts), 1)
                    row[f"{name}_cpu_s"] = round(statistics.median(cpu[name]), 4)
                row["speedup"] = round(row["ours_tokens_per_s"] / row["transformers_tokens_per_s"], 2)
                row["cpu_speedup"] = round(row["transformers_cpu_s"] / row["ours_cpu_s"], 2)
                if greedy:
                    same = sum(a == b for a, b in zip(outputs["ours"], outputs["transformers"]))
                    row["greedy_match"] = round(same / batch, 3)
                results.append(row)
                print(f"batch {batch:3d} {mode:7s}  ours {row['ours_tokens_per_s']:9.1f} tok/s   transformers "
                      f"{row['transformers_tokens_per_s']:9.1f} tok/s   x{row['speedup']:.2f} (cpu time "
                      f"x{row['cpu_speedup']:.2f})"
                      + (f"   greedy match {row['greedy_match']:.2f}" if greedy else ""), file=sys.stderr)
    import transformers
    return {"model": {"vocab_size": args.vocab_size, "hidden_size": args.hidden_size, "num_layers": args.num_layers,
                      "num_heads": args.num_heads, "num_kv_heads": args.num_kv_heads, "ffn_size": args.ffn_size},
            "threads": args.threads, "repeats": args.repeats, "torch": torch.__version__,
            "transformers": transformers.__version__, "results": results}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[16, 64])
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--vocab-size", type=int, default=32000)
    p.add_argument("--hidden-size", type=int, default=256)
    p.add_argument("--num-layers", type=int, default=4)
    p.add_argument("--num-heads", type=int, default=4)
    p.add_argument("--num-kv-heads", type=int, default=2)
    p.add_argument("--ffn-size", type=int, default=704)
    p.add_argument("--repeats", type=int, default=3, help="timed runs per configuration (median reported)")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads (both sides)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="also write the results here")
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    out = bench(args)
    text = json.dumps(out)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            fh.write(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
