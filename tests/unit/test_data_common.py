"""Shared helpers for the data tests (no tests here): tiny tokenizer, configs, reading datasets back."""
from __future__ import annotations

import json
import os
from typing import Dict, List, Sequence, Tuple

from megatron.config import load_config
from megatron.data import IndexedDataset, PreprocessSettings, preprocess, preprocess_settings

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY = os.path.join(ROOT, "data", "tiny")
TOKENIZER = os.path.join(TINY, "tokenizer")
OBJECTIVE_OF_KIND = {"sft": "sft", "pairwise": "dpo", "unpaired": "kto"}


def make_cfg(tmp_path, *overrides: str, kind: str = "sft", max_seq_len: int = 128):
    """An unvalidated Config with the tiny tokenizer, a tmp cache dir and `overrides` (a.b=c)."""
    base = [f"data.tokenizer={TOKENIZER}", f"data.cache_dir={tmp_path}/cache", f"model.max_seq_len={max_seq_len}",
            f"objective.name={OBJECTIVE_OF_KIND[kind]}"]
    return load_config(overrides=base + list(overrides), validate=False)


def write_jsonl(path, records: Sequence, raw_lines: Dict[int, str] = None) -> str:
    """Write records as JSON lines; raw_lines {index: text} replaces record `index` by that text."""
    raw_lines = raw_lines or {}
    with open(path, "w", encoding="utf-8") as fh:
        for i, r in enumerate(records):
            fh.write((raw_lines[i] if i in raw_lines else json.dumps(r)) + "\n")
    return str(path)


def run_preprocess(path, prefix, tokenizer, settings: PreprocessSettings = None, **kw):
    """Preprocess quietly; returns (report, IndexedDataset)."""
    settings = settings or PreprocessSettings()
    report = preprocess(str(path), str(prefix), tokenizer, settings, progress=False, log=None, **kw)
    return report, IndexedDataset(str(prefix))


def sequences(ds: IndexedDataset) -> List[Tuple[List[int], int]]:
    """All (ids, prompt_len) of an indexed dataset."""
    out = []
    for i in range(ds.num_sequences):
        ids, plen = ds.sequence(i)
        out.append((ids.tolist(), plen))
    return out


def settings_for(tmp_path, *overrides: str, kind: str = "sft", max_seq_len: int = 128) -> PreprocessSettings:
    """PreprocessSettings of make_cfg(...)."""
    return preprocess_settings(make_cfg(tmp_path, *overrides, kind=kind, max_seq_len=max_seq_len))
