"""Where metrics go: `<logging.dir>/metrics.jsonl` always, wandb and TensorBoard when configured, and a
progress bar with ETA. Only the rank that is given `enabled=True` (global rank 0) writes anything."""
from __future__ import annotations

import json
import netrc
import os
import sys
from typing import Any, Dict, Mapping, Optional
from urllib.parse import urlsplit

from megatron.config import Config, config_to_dict

METRICS_FILE = "metrics.jsonl"
_WANDB_HOST = "https://api.wandb.ai"


def metrics_path(cfg: Config) -> str:
    """Where the run's metrics rows go: `<logging.dir>/metrics.jsonl`."""
    return os.path.join(cfg.logging.dir, METRICS_FILE)


def read_metrics(path: str) -> list:
    """The rows of a metrics.jsonl file (dicts with 'step'), skipping a torn last line of a killed run."""
    rows = []
    with open(path, "r", encoding="utf-8") as fh:
        for line in fh:
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return rows


def truncate_metrics(path: str, start_step: int) -> int:
    """Drop the rows a resumed run will log again: those after `start_step` (logged by the interrupted run
    after its last checkpoint), or every row when the run starts at step 0. Returns how many were dropped.

    Rows of step `start_step` itself stay: they were logged before that checkpoint was taken. A torn last
    line (a killed process) goes too, so that the next row starts on a line of its own.
    """
    if not os.path.exists(path):
        return 0
    with open(path, "r", encoding="utf-8") as fh:
        lines = [line for line in fh if line.strip()]
    rows = read_metrics(path)
    keep = [r for r in rows if start_step > 0 and r.get("step", 0) <= start_step]
    if len(keep) != len(lines):
        tmp = path + ".writing"
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.writelines(json.dumps(r) + "\n" for r in keep)
        os.replace(tmp, path)
    return len(lines) - len(keep)


def wandb_mode(environ: Optional[Mapping[str, str]] = None) -> str:
    """'online' when wandb has credentials, else 'offline' (never a login prompt).

    An explicit WANDB_MODE wins. Credentials are what `wandb.init` itself looks for: WANDB_API_KEY or
    WANDB_IDENTITY_TOKEN_FILE, else an entry for the W&B host (WANDB_BASE_URL, default api.wandb.ai) in the
    netrc file (NETRC, else ~/.netrc or ~/_netrc) that `wandb login` writes.
    """
    env = os.environ if environ is None else environ
    if env.get("WANDB_MODE"):
        return env["WANDB_MODE"]
    if env.get("WANDB_API_KEY") or env.get("WANDB_IDENTITY_TOKEN_FILE"):
        return "online"
    host = urlsplit(env.get("WANDB_BASE_URL") or _WANDB_HOST).netloc
    home = env.get("HOME") or os.path.expanduser("~")
    candidates = [env["NETRC"]] if env.get("NETRC") else [os.path.join(home, ".netrc"), os.path.join(home, "_netrc")]
    for path in candidates:
        path = os.path.expanduser(path)
        if not os.path.isfile(path):
            continue
        try:
            creds = netrc.netrc(path).authenticators(host)
        except (netrc.NetrcParseError, OSError):
            return "offline"
        return "online" if creds and creds[2] else "offline"
    return "offline"


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
        self.path = metrics_path(cfg)
        # A resumed run logs again the steps after its checkpoint: one row per step in the file.
        self.dropped_rows = truncate_metrics(self.path, start_step)
        self._fh = open(self.path, "a", encoding="utf-8")
        if cfg.logging.wandb_project:
            import wandb  # a listed dependency; online with `wandb login` or a key, else offline; never prompts
            self._wandb = wandb.init(project=cfg.logging.wandb_project, name=cfg.logging.wandb_run_name,
                                     dir=cfg.logging.dir, mode=wandb_mode(), config=config_to_dict(cfg),
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
        if self.dropped_rows:
            why = (f"logged after step {start_step}, the checkpoint this run resumes" if start_step
                   else "of an earlier run in logging.dir")
            self.message(f"{self.path}: dropped {self.dropped_rows} rows {why}")

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
