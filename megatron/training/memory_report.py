"""Per-rank memory estimate of a configured run, computable without launching it.

    python -m megatron.training.memory_report configs/sft_7b.yml --world-size 64 [--set parallel.pipeline=4 ...]
        [--json out.json]

`memory_report(cfg)` -> dict (the layout, and per rank: parameters held, parameter/gradient/optimizer-state
bytes under its ZeRO stage, the frozen reference's bytes for reference.mode=live, and activation bytes of
its pipeline stage, per micro-batch and for the micro-batches in flight under DeepSpeed's 1F1B schedule);
the formulas are in megatron/training/memory_formulas.py. The trainer prints `format_report` once on rank 0
at start-up and writes `<logging.dir>/memory.json` (`write_memory_report`); at the end of the run
`report_measured_memory` adds every rank's measured peak (CPU: peak RSS; GPU: `torch.cuda.max_memory_allocated`)
beside its estimate to memory.json and prints both.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any, Dict, List, Optional, Tuple

from megatron.config import Config

from . import memory_formulas as mf


def _stage_params(cfg: Config, bps: List[int]) -> List[int]:
    """Parameters of one tensor rank on each pipeline stage (a tied embedding counts on both ends)."""
    from megatron.checkpoint.weights_io import canonical_shapes, stages_of_key

    tied = cfg.model.tie_embeddings and not cfg.model.value_head
    out = [0] * len(bps)
    for key, shape in canonical_shapes(cfg, cfg.parallel.tensor).items():
        n = 1
        for d in shape:
            n *= d
        for s in stages_of_key(key, bps, tied):
            out[s] += n
    return out


def _uses_reference(cfg: Config) -> bool:
    return cfg.derived.reference_mode == "live"


def _micro_batch_shape(cfg: Config):
    """(rows b, tokens per row s) bounding one micro-batch: every example (SFT sequence, pair, KTO target with
    its KL sequence) fits in max_seq_len tokens, so micro_batch_size rows of max_seq_len bound it."""
    return cfg.train.micro_batch_size, cfg.model.max_seq_len


def memory_report(cfg: Config) -> Dict[str, Any]:
    """The memory estimate of every rank of `cfg` (validated: cfg.derived filled)."""
    from megatron.mpu.layout import make_layout

    from megatron.engines.pipeline_partition import blocks_per_stage

    m, p, d = cfg.model, cfg.parallel, cfg.derived
    tp, pp, dp = p.tensor, p.pipeline, d.data_parallel
    bps = blocks_per_stage(cfg)
    param_bytes = 4 if cfg.train.precision == "fp32" else 2
    b, s = _micro_batch_shape(cfg)
    sp = p.sequence_parallel and tp > 1
    ckpt = p.checkpoint_num_layers if p.activation_checkpointing else 0
    scores = m.attention != "flash"
    stage_params = _stage_params(cfg, bps)
    stages = []
    for st in range(pp):
        states = mf.model_state_bytes(stage_params[st], param_bytes, p.zero_stage, dp)
        act = mf.stage_activation_bytes(bps[st], s, b, m.hidden_size, m.num_attention_heads, tp, sp, ckpt,
                                        scores, param_bytes)
        if st == pp - 1 and not m.value_head:
            act += mf.logits_bytes(s, b, d.padded_vocab_size, tp)
        # DeepSpeed's TrainSchedule keeps min(stages - stage, micro-batches) forward passes alive (1F1B).
        in_flight = min(pp - st, d.grad_accum) if pp > 1 else 1
        ref = stage_params[st] * param_bytes if _uses_reference(cfg) else 0
        if ref and pp == 1 and p.zero_stage == 3:
            ref = -(-ref // dp)  # the unpipelined engine partitions the frozen reference like the policy
        stage = {"stage": st, "blocks": bps[st], "parameters": stage_params[st], **states,
                 "reference_param_bytes": int(ref),
                 "activation_bytes_per_micro_batch": int(act), "micro_batches_in_flight": in_flight,
                 "activation_bytes": int(act * in_flight)}
        stage["total_bytes"] = (stage["param_bytes"] + stage["grad_bytes"] + stage["optimizer_bytes"]
                                + stage["reference_param_bytes"] + stage["activation_bytes"])
        stages.append(stage)
    layout = make_layout(d.world_size, tp, pp)
    ranks = []
    for r in range(d.world_size):
        pr, dr, tr = layout.coords(r)
        ranks.append({"rank": r, "stage": pr, "data_rank": dr, "tensor_rank": tr,
                      **{k: v for k, v in stages[pr].items() if k != "stage"}})
    return {
        "layout": {"world_size": d.world_size, "tensor": tp, "pipeline": pp, "data_parallel": dp,
                   "zero_stage": p.zero_stage, "precision": cfg.train.precision, "micro_batch_size": b,
                   "seq_len": s, "grad_accum": d.grad_accum, "sequence_parallel": sp,
                   "activation_checkpointing": bool(ckpt), "checkpoint_num_layers": ckpt,
                   "blocks_per_stage": bps, "reference_mode": d.reference_mode,
                   "attention_scores_stored": scores},
        "model": {"hidden_size": m.hidden_size, "num_layers": m.num_layers, "num_attention_heads":
                  m.num_attention_heads, "padded_vocab_size": d.padded_vocab_size,
                  "total_parameters": _total_params(cfg)},
        "stages": stages,
        "ranks": ranks,
        "formulas": "megatron/training/memory_formulas.py (ZeRO: Rajbhandari et al. 2020; activations: "
                    "Korthikanti et al. 2022, sbh(34 + 5as/h) per layer and its TP/SP/recompute variants)",
    }


def _total_params(cfg: Config) -> int:
    from megatron.checkpoint.weights_io import canonical_shapes

    total = 0
    for shape in canonical_shapes(cfg, 1).values():
        n = 1
        for d in shape:
            n *= d
        total += n
    return total


def _unit(report: Dict[str, Any]):
    """(name, bytes) of the display unit: GiB, or MiB when every stage totals under 1 GiB."""
    big = max(st["total_bytes"] for st in report["stages"])
    return ("GiB", 2**30) if big >= 2**30 else ("MiB", 2**20)


def format_report(report: Dict[str, Any]) -> str:
    """A table, one row per pipeline stage (all tensor/data ranks of a stage hold the same)."""
    lay = report["layout"]
    unit, scale = _unit(report)

    def fmt(x: float) -> str:
        return f"{x / scale:.3f}"

    head = (f"memory estimate per rank ({unit}): world {lay['world_size']} = tensor {lay['tensor']} x pipeline "
            f"{lay['pipeline']} x data {lay['data_parallel']}, ZeRO {lay['zero_stage']}, {lay['precision']}, "
            f"micro-batch {lay['micro_batch_size']} x {lay['seq_len']} tokens, SP {lay['sequence_parallel']}, "
            f"AC {lay['activation_checkpointing']}")
    cols = ("stage", "blocks", "params", "weights", "grads", "optim", "reference", "act/mb", "in flight",
            "activations", "total")
    rows = [" ".join(f"{c:>11}" for c in cols)]
    for st in report["stages"]:
        vals = (st["stage"], st["blocks"], f"{st['parameters'] / 1e6:.2f}M", fmt(st["param_bytes"]),
                fmt(st["grad_bytes"]), fmt(st["optimizer_bytes"]), fmt(st["reference_param_bytes"]),
                fmt(st["activation_bytes_per_micro_batch"]), st["micro_batches_in_flight"],
                fmt(st["activation_bytes"]), fmt(st["total_bytes"]))
        rows.append(" ".join(f"{v:>11}" for v in vals))
    return "\n".join([head] + rows)


def write_memory_report(cfg: Config, report: Optional[Dict[str, Any]] = None, path: Optional[str] = None,
                        echo: bool = True) -> Dict[str, Any]:
    """Write `report` (computed if None) as JSON (default `<logging.dir>/memory.json`); print the table."""
    report = report if report is not None else memory_report(cfg)
    path = path or os.path.join(cfg.logging.dir, "memory.json")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", encoding="utf-8") as fh:
        json.dump(report, fh, indent=1)
    if echo:
        print(format_report(report), flush=True)
    return report


# ------------------------------------------------------------------------------------------- measured
def rss_bytes() -> Tuple[int, int]:
    """(current, peak) resident memory of this process in bytes: VmRSS and VmHWM of /proc/self/status, or
    (0, ru_maxrss) where /proc is absent. The peak includes file pages the process has mapped."""
    try:
        with open("/proc/self/status", "r", encoding="ascii") as fh:
            fields = dict(line.split(":", 1) for line in fh if ":" in line)
        return int(fields["VmRSS"].split()[0]) * 1024, int(fields["VmHWM"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        import resource
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return 0, peak * (1 if sys.platform == "darwin" else 1024)


def reset_peak_rss() -> bool:
    """Restart the peak-RSS count (VmHWM) at the current RSS (Linux `clear_refs`); False where unsupported.
    Lets a test measure the peak of one phase (a save) rather than of the whole process."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def start_memory_measurement() -> Dict[str, int]:
    """This rank's memory before the model is built (RSS; on GPU also the allocator, whose peak is reset)."""
    import torch

    start = {"rss_bytes": rss_bytes()[0]}
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
        start["cuda_bytes"] = int(torch.cuda.memory_allocated())
    return start


def measure_peak_memory(start: Optional[Dict[str, int]] = None) -> Dict[str, Any]:
    """This rank's measured peak: `peak_bytes` is `torch.cuda.max_memory_allocated()` on GPU, else the peak RSS;
    `start_bytes` the same quantity at `start_memory_measurement`; `peak_rss_bytes` always the peak RSS."""
    import torch

    start = start or {}
    _, peak_rss = rss_bytes()
    if torch.cuda.is_available():
        return {"kind": "cuda_max_memory_allocated", "peak_bytes": int(torch.cuda.max_memory_allocated()),
                "start_bytes": int(start.get("cuda_bytes", 0)), "peak_rss_bytes": peak_rss}
    return {"kind": "cpu_peak_rss", "peak_bytes": peak_rss, "start_bytes": int(start.get("rss_bytes", 0)),
            "peak_rss_bytes": peak_rss}


def report_measured_memory(cfg: Config, report: Dict[str, Any], ps, start: Optional[Dict[str, int]] = None,
                           path: Optional[str] = None, echo: bool = True) -> Optional[Dict[str, Any]]:
    """At the end of a run: every rank's measured peak beside its estimate (collective: all ranks call it).

    Rank 0 adds `measured` = {kind, ranks: [{rank, stage, estimate_bytes, peak_bytes, start_bytes}]} to `report`,
    rewrites memory.json (`path`, default `<logging.dir>/memory.json`) and prints the table; it returns the
    report there, None elsewhere. On CPU the measured peak is the whole process's RSS, so it also holds
    Python, torch and DeepSpeed (about `start_bytes`) and the data; the estimate counts model states and
    activations only.
    """
    import torch.distributed as dist

    mine = {"rank": ps.rank, **measure_peak_memory(start)}
    rows = [mine]
    if dist.is_initialized() and dist.get_world_size() > 1:
        rows = [None] * dist.get_world_size()
        dist.all_gather_object(rows, mine)
    if ps.rank != 0:
        return None
    ranks = []
    for row in sorted(rows, key=lambda r: r["rank"]):
        est = report["ranks"][row["rank"]]
        ranks.append({"rank": row["rank"], "stage": est["stage"], "tensor_rank": est["tensor_rank"],
                      "data_rank": est["data_rank"], "estimate_bytes": est["total_bytes"],
                      "peak_bytes": row["peak_bytes"], "start_bytes": row["start_bytes"],
                      "peak_rss_bytes": row["peak_rss_bytes"]})
    report["measured"] = {"kind": rows[0]["kind"], "ranks": ranks}
    write_memory_report(cfg, report, path=path, echo=False)
    if echo:
        print(format_measured(report), flush=True)
    return report


def format_measured(report: Dict[str, Any]) -> str:
    """The measured table, one row per rank, in MiB."""
    meas = report["measured"]
    what = "peak RSS" if meas["kind"] == "cpu_peak_rss" else "torch.cuda.max_memory_allocated"
    mib = 2 ** 20
    cols = ("rank", "stage", "estimate", "measured", "at start", "meas-start")
    rows = [f"memory per rank (MiB): measured {what} beside the estimate (the estimate counts model states and "
            "activations; the measurement is the whole process)", " ".join(f"{c:>10}" for c in cols)]
    for r in meas["ranks"]:
        vals = (r["rank"], r["stage"], f"{r['estimate_bytes'] / mib:.1f}", f"{r['peak_bytes'] / mib:.1f}",
                f"{r['start_bytes'] / mib:.1f}", f"{(r['peak_bytes'] - r['start_bytes']) / mib:.1f}")
        rows.append(" ".join(f"{v:>10}" for v in vals))
    return "\n".join(rows)


def main(argv: Optional[List[str]] = None) -> int:
    """CLI: print the per-stage table for a config at a world size (and optionally write the JSON)."""
    from megatron.config import ConfigError, add_set_argument
    from megatron.engines.run_config import load_run_config

    ap = argparse.ArgumentParser(prog="python -m megatron.training.memory_report", description=__doc__.split("\n")[0])
    ap.add_argument("configs", nargs="+", help="YAML config files, merged in order")
    ap.add_argument("--world-size", type=int, required=True, help="number of ranks (GPUs)")
    add_set_argument(ap)
    ap.add_argument("--json", help="also write the full report here")
    args = ap.parse_args(argv)
    try:
        cfg = load_run_config(args.configs, args.overrides, world_size=args.world_size)
        report = memory_report(cfg)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(format_report(report))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump(report, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
