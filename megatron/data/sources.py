"""Raw input files -> `RawRecord`s (where it came from + the record), one format reader each.

JSONL is read line by line by plain Python so a malformed line is reported as `file:line` and can be
skipped on its own; JSON, parquet, CSV and `save_to_disk` directories are read with the `datasets`
library (records are located as `file:record N`, 1-based). JSONL payloads stay unparsed strings so
that JSON decoding happens in the worker processes. A `save_to_disk` DatasetDict gives one split,
chosen by `pick_split` for the role (train or valid) and announced on one printed line.
"""
from __future__ import annotations

import csv
import hashlib
import json
import os
import tempfile
from dataclasses import dataclass
from typing import Any, Callable, Iterator, List, Optional

from megatron.config import ConfigError

from .errors import MALFORMED_JSON, BadRecordError

INDEXED_SUFFIXES = (".bin", ".idx", ".meta.json")


@dataclass
class RawRecord:
    """One input record: `where` is `file:line` (JSONL) or `file:record N`; `payload` a str line or a dict."""
    where: str
    payload: Any


def indexed_prefix(path: str) -> str:
    """`path` without an indexed-dataset suffix (`x.bin` -> `x`)."""
    for suffix in INDEXED_SUFFIXES:
        if path.endswith(suffix):
            return path[: -len(suffix)]
    return path


def detect_format(path: str, fmt: str = "auto", key: str = "data.train_path") -> str:
    """The input format of `path` (`data.format`; 'auto' decides from the extension / directory contents).

    Raises ConfigError naming `key` when the path does not exist or the format cannot be told.
    """
    if fmt == "indexed" or (fmt == "auto" and os.path.exists(indexed_prefix(path) + ".meta.json")):
        if not os.path.exists(indexed_prefix(path) + ".meta.json"):
            raise ConfigError(f"key '{key}': indexed dataset {indexed_prefix(path)!r} not found "
                              f"(expected {indexed_prefix(path)}.meta.json)")
        return "indexed"
    if not os.path.exists(path):
        raise ConfigError(f"key '{key}': data file {path!r} does not exist")
    if fmt != "auto":
        return fmt
    if os.path.isdir(path):
        if any(os.path.exists(os.path.join(path, f)) for f in ("dataset_info.json", "state.json", "dataset_dict.json")):
            return "hf_disk"
        raise ConfigError(f"key '{key}': directory {path!r} is not a `datasets` save_to_disk directory")
    lower = path.lower()
    for ext, name in ((".jsonl", "jsonl"), (".ndjson", "jsonl"), (".parquet", "parquet"), (".csv", "csv")):
        if lower.endswith(ext):
            return name
    if lower.endswith(".json"):
        # A .json file may be JSON Lines or one document (array of records, or an object of columns):
        # it is JSON Lines when its first non-blank line is a complete JSON object on its own.
        with open(path, "r", encoding="utf-8") as fh:
            first = next((line for line in fh if line.strip()), "")
        try:
            return "jsonl" if isinstance(json.loads(first), dict) else "json"
        except json.JSONDecodeError:
            return "json"
    raise ConfigError(f"key '{key}': cannot tell the format of {path!r} from its name; set data.format "
                      "to jsonl, json, parquet, csv or hf_disk")


def content_hash(path: str) -> str:
    """sha256 of a file, or of every file (with relative names) under a directory."""
    h = hashlib.sha256()
    paths = [path]
    if os.path.isdir(path):
        paths = sorted(os.path.join(r, f) for r, _, fs in os.walk(path) for f in fs)
    for p in paths:
        h.update(os.path.relpath(p, path).encode() + b"\0")
        with open(p, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


def _iter_jsonl(path: str) -> Iterator[RawRecord]:
    with open(path, "r", encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if line.strip():  # blank lines are not records
                yield RawRecord(f"{path}:{lineno}", line)


def _iter_dataset(ds, path: str) -> Iterator[RawRecord]:
    for i, row in enumerate(ds):
        yield RawRecord(f"{path}:record {i + 1}", row)


def _load_with_datasets(path: str, fmt: str):
    import datasets
    with tempfile.TemporaryDirectory() as cache:  # keep `datasets` from filling ~/.cache
        if fmt == "csv":
            # Read every column as text: CSV type inference would turn "7" into an int and "" into None.
            with open(path, "r", encoding="utf-8", newline="") as fh:
                header = next(csv.reader(fh), [])
            features = datasets.Features({h: datasets.Value("string") for h in header})
            return datasets.load_dataset("csv", data_files=path, split="train", cache_dir=cache,
                                         keep_in_memory=True, features=features, keep_default_na=False)
        return datasets.load_dataset(fmt, data_files=path, split="train", cache_dir=cache, keep_in_memory=True)


def _json_error(path: str) -> None:
    """Raise BadRecordError with file:line if `path` is not valid JSON (datasets' errors lack the line)."""
    with open(path, "r", encoding="utf-8") as fh:
        try:
            json.load(fh)
        except json.JSONDecodeError as exc:
            raise BadRecordError(f"{path}:{exc.lineno}", MALFORMED_JSON,
                                 f"{exc.msg} (column {exc.colno}); the whole file is unreadable",
                                 skippable=False) from None


SPLIT_PREFERENCE = {"train": ("train",), "valid": ("validation", "valid", "test")}


def pick_split(splits: List[str], role: str, path: str) -> str:
    """The split of a DatasetDict with `splits` to read for `role` ('train': train; 'valid': validation,
    valid, then test); a dict of one split gives that split. ConfigError naming the key otherwise."""
    for name in SPLIT_PREFERENCE[role]:
        if name in splits:
            return name
    if len(splits) == 1:
        return splits[0]
    key = "data.train_path" if role == "train" else "data.valid_path"
    raise ConfigError(f"key '{key}': {path!r} is a DatasetDict with splits {splits} and none of "
                      f"{', '.join(SPLIT_PREFERENCE[role])}; save the split to use on its own "
                      "(dataset_dict[name].save_to_disk(dir)) and point the key at it")


def iter_raw_records(path: str, fmt: str, role: str = "train",
                     log: Optional[Callable[[str], None]] = None) -> Iterator[RawRecord]:
    """An iterator over every record of `path` in file order; `fmt` as returned by `detect_format`.

    role: 'train' or 'valid', which split of a DatasetDict to read (see `pick_split`); the choice is
    announced through `log` when this is called. Records of a split are located as `path[split]:record N`.
    """
    if fmt == "jsonl":
        return _iter_jsonl(path)
    if fmt == "hf_disk":
        import datasets
        ds = datasets.load_from_disk(path)
        where = path
        if isinstance(ds, datasets.DatasetDict):
            split = pick_split(list(ds), role, path)
            if log is not None:
                log(f"data: {path} is a DatasetDict with splits {list(ds)}: using split '{split}' for "
                    f"{'training' if role == 'train' else 'validation'}")
            ds, where = ds[split], f"{path}[{split}]"
        return _iter_dataset(ds, where)
    if fmt not in ("json", "parquet", "csv"):
        raise ConfigError(f"key 'data.format': cannot read format {fmt!r} as raw records")
    try:
        ds = _load_with_datasets(path, fmt)
    except Exception:
        if fmt == "json":
            _json_error(path)
        raise
    return _iter_dataset(ds, path)
