"""Where metrics go: `<logging.dir>/metrics.jsonl` always, wandb and TensorBoard when configured, and a
progress bar with ETA. Only the rank that is given `enabled=True` (global rank 0) writes anything."""
from __future__ import annotations

import json
import os
import sys
from typing import Any, Dict

from megatron.config import Config, config_to_dict


class MetricsLogger:
    """Writes one JSON object per logged step; mirrors to wandb/TensorBoard; drives the progress bar."""

    def __init__(self, cfg: Config, enabled: bool, start_step: int = 0):
        self.enabled = enabled
        self._wandb = None
        self._tb = None
        self._bar = None
        if not enabled:
            return
        os.makedirs(cfg.logging.dir, exist_ok=True)
        self.path = os.path.join(cfg.logging.dir, "metrics.jsonl")
        self._fh = open(self.path, "a", encoding="utf-8")
        if cfg.logging.wandb_project:
            import wandb  # a listed dependency; offline unless a key is configured, never prompts
            mode = "online" if os.environ.get("WANDB_API_KEY") else "offline"
            self._wandb = wandb.init(project=cfg.logging.wandb_project, name=cfg.logging.wandb_run_name,
                                     dir=cfg.logging.dir, mode=mode, config=config_to_dict(cfg),
                                     settings=wandb.Settings(silent=True))
        if cfg.logging.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as exc:
                raise RuntimeError("logging.tensorboard=true needs the 'tensorboard' package: "
                                   "pip install tensorboard, or set logging.tensorboard=false") from exc
            self._tb = SummaryWriter(os.path.join(cfg.logging.dir, "tensorboard"))
        if cfg.train.progress_bar:
            from tqdm import tqdm
            self._bar = tqdm(total=cfg.train.iters, initial=start_step, desc="train", unit="step",
                             dynamic_ncols=True, file=sys.stderr, mininterval=1.0)

    def log(self, step: int, metrics: Dict[str, Any]) -> None:
        """Record `metrics` (floats) for optimizer step `step` (1-based count of completed steps)."""
        if not self.enabled:
            return
        row = {"step": step, **{k: float(v) for k, v in metrics.items()}}
        self._fh.write(json.dumps(row) + "\n")
        self._fh.flush()
        if self._wandb is not None:
            self._wandb.log(row, step=step)
        if self._tb is not None:
            for k, v in row.items():
                if k != "step":
                    self._tb.add_scalar(k, v, step)
        if self._bar is not None and "loss" in row:
            self._bar.set_postfix(loss=f"{row['loss']:.4f}", refresh=False)

    def advance(self, n: int = 1) -> None:
        """Move the progress bar by `n` steps."""
        if self._bar is not None:
            self._bar.update(n)

    def message(self, text: str) -> None:
        """Print a line on rank 0 without breaking the progress bar."""
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.write(text, file=sys.stderr)
        else:
            print(text, file=sys.stderr, flush=True)

    def close(self) -> None:
        """Flush and close every sink."""
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.close()
        self._fh.close()
        if self._wandb is not None:
            self._wandb.finish()
        if self._tb is not None:
            self._tb.close()
