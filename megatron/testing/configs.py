"""Tiny configs for tests: the shipped tiny data and tokenizer, a 2-layer model, fp32, few steps."""
from __future__ import annotations

import os
from typing import Sequence

from megatron.config import Config
from megatron.engines.run_config import load_run_config

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY = os.path.join(REPO, "configs", "tiny")
DATA = os.path.join(REPO, "data", "tiny")

_DATA_FILE = {"sft": "sft.jsonl", "rm": "pairwise.jsonl", "dpo": "pairwise.jsonl", "simpo": "pairwise.jsonl",
              "orpo": "pairwise.jsonl", "kto": "unpaired.jsonl"}


def tiny_test_config(workdir: str, objective: str = "sft", world_size: int = 1,
                     overrides: Sequence[str] = (), iters: int = 3) -> Config:
    """A validated Config for a quick run in `workdir` (logs and checkpoints go there).

    Deterministic: fp32, dropout 0, no shuffling differences across ranks (the sampler is seeded).
    """
    base = [os.path.join(TINY, "sft.yml")]
    sets = [
        f"objective.name={objective}",
        f"data.train_path={os.path.join(DATA, _DATA_FILE[objective])}",
        "data.valid_path=null",
        f"data.cache_dir={os.path.join(workdir, 'data_cache')}",
        f"logging.dir={os.path.join(workdir, 'logs')}",
        "checkpoint.save=null",
        "checkpoint.interval=0",
        f"train.iters={iters}",
        "train.micro_batch_size=2",
        "train.global_batch_size=4",
        "train.log_interval=1",
        "train.eval_interval=0",
        "train.progress_bar=false",
        "model.max_seq_len=64",
        "optimizer.warmup_iters=0",
        "optimizer.schedule=constant",
        "optimizer.lr=1.0e-3",
        f"launcher.num_gpus={world_size}",
    ] + list(overrides)
    return load_run_config(base, sets, world_size=world_size)
