"""The end-of-run summary rank 0 prints: final and best evaluation metrics, where the checkpoint and metrics
are, and the commands that plot and export them. Read from `metrics.jsonl`, so a resumed run summarises its
whole history, not only the steps of the last launch."""
from __future__ import annotations

import os
import sys
from typing import Dict, List, Optional, Tuple

from megatron.config import Config

from .metrics import metrics_path, read_metrics

_LATEST = "latest"  # the checkpoint directory's pointer file (megatron.checkpoint.checkpointing.LATEST)


def _fmt(value: float) -> str:
    return f"{value:.4g}"


def best_eval(rows: List[Dict[str, float]]) -> Dict[str, Tuple[float, int]]:
    """{key: (best value, step)} over eval rows: the lowest of each `eval/*loss*`, the highest of each
    `eval/*accuracy*` (earliest step on ties). Other metrics have no agreed direction and are left out."""
    best: Dict[str, Tuple[float, int]] = {}
    for row in rows:
        for key, value in row.items():
            if not key.startswith("eval/"):
                continue
            lower = "loss" in key
            if not lower and "accuracy" not in key:
                continue
            old = best.get(key)
            if old is None or (value < old[0] if lower else value > old[0]):
                best[key] = (value, int(row["step"]))
    return best


def newest_checkpoint(save_dir: Optional[str]) -> Optional[str]:
    """`save_dir/<tag>` named by `save_dir/latest`, or None when there is no complete checkpoint."""
    if not save_dir:
        return None
    pointer = os.path.join(save_dir, _LATEST)
    if not os.path.isfile(pointer):
        return None
    with open(pointer, "r", encoding="utf-8") as fh:
        return os.path.join(save_dir, fh.read().strip())


def run_summary(cfg: Config, step: int, stopped_by_signal: bool = False) -> str:
    """A few lines for the end of a run (which step it reached of `train.iters`, eval results, paths, commands)."""
    path = metrics_path(cfg)
    rows = read_metrics(path) if os.path.exists(path) else []
    evals = [r for r in rows if any(k.startswith("eval/") for k in r)]
    train = [r for r in rows if "loss" in r]
    state = " (stopped by SIGTERM; relaunch the same command to continue)" if stopped_by_signal else ""
    lines = [f"run summary: step {step} of {cfg.train.iters}{state}"]
    if train:
        lines.append(f"  final train (step {train[-1]['step']}): loss {_fmt(train[-1]['loss'])}")
    if evals:
        last = evals[-1]
        shown = ", ".join(f"{k} {_fmt(v)}" for k, v in last.items() if k.startswith("eval/"))
        lines.append(f"  final eval (step {last['step']}): {shown}")
        best = best_eval(evals)
        if best:
            lines.append("  best eval: " + ", ".join(f"{k} {_fmt(v)} at step {s}" for k, (v, s) in best.items()))
    else:
        lines.append("  eval: none (set data.valid_path and train.eval_interval to evaluate)")
    lines.append(f"  metrics: {path}  (plot: python tools/plot_metrics.py {cfg.logging.dir} -o "
                 f"{os.path.join(cfg.logging.dir, 'metrics.png')})")
    ckpt = newest_checkpoint(cfg.checkpoint.save)
    if ckpt is None:
        lines.append("  checkpoint: none (set checkpoint.save to keep the trained weights)")
    else:
        lines.append(f"  checkpoint: {ckpt}")
        out = os.path.join(cfg.logging.dir, "hf")
        # HF's score layer has no bias: a reward model exports without it (scores shift by a constant).
        flag = " --drop-value-bias" if cfg.model.value_head else ""
        lines.append(f"  export: python tools/ckpts/convert_megatron_to_hf.py --ckpt {cfg.checkpoint.save} "
                     f"--out {out}{flag}")
    return "\n".join(lines)


def print_run_summary(cfg: Config, step: int, stopped_by_signal: bool = False) -> None:
    """Print `run_summary` to stderr (call on global rank 0 only)."""
    print(run_summary(cfg, step, stopped_by_signal), file=sys.stderr, flush=True)
