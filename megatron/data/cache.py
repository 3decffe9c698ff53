"""Raw files are preprocessed once into a cache directory keyed by what decides their tokens.

Key = sha256 of (indexed format version, file content, input format, tokenizer fingerprint, the
preprocess settings, the resolved chat template, and for a `datasets` directory the role - train or
valid - that picks its split). The entry `<cache_dir>/<file name>-<key>/data.*` is
built in a temporary directory and renamed into place, so a reader never sees half a dataset. With
several ranks, the caller passes `is_builder` (e.g. rank 0, or local rank 0 without a shared file
system) and a `barrier` callable: the builder builds, everyone meets at the barrier, then everyone opens.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import uuid
from typing import Callable, Optional

from .chat_template import resolve_chat_template
from .errors import DataError
from .indexed import FORMAT_VERSION, read_meta
from .preprocess import preprocess
from .settings import PreprocessSettings
from .sources import content_hash, detect_format


def cache_key(path: str, tokenizer, settings: PreprocessSettings, role: str = "train") -> str:
    """Hex key (20 chars) of the cached indexed dataset for raw file `path` read as `role` (train | valid)."""
    template = resolve_chat_template(settings.chat_template, tokenizer.chat_template)
    fmt = detect_format(path, settings.format)
    parts = {
        "format_version": FORMAT_VERSION,
        "content": content_hash(path),
        "format": fmt,
        "role": role if fmt == "hf_disk" else None,  # a DatasetDict gives a different split per role
        "tokenizer": tokenizer.fingerprint,
        "settings": dataclasses.asdict(settings),
        "template": hashlib.sha256(template.encode()).hexdigest() if template else None,
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:20]


def default_cache_dir(path: str) -> str:
    """`<directory of path>/.cache`."""
    return os.path.join(os.path.dirname(os.path.abspath(path)), ".cache")


def _complete(entry: str) -> bool:
    return os.path.exists(os.path.join(entry, "data.meta.json"))


def cached_indexed_dataset(path: str, tokenizer, settings: PreprocessSettings, cache_dir: Optional[str] = None,
                           is_builder: bool = True, barrier: Callable[[], None] = lambda: None,
                           workers: int = 1, progress: bool = True,
                           log: Optional[Callable[[str], None]] = print, role: str = "train") -> str:
    """Prefix of the indexed dataset for raw file `path`, preprocessing it first if not cached.

    role: 'train' or 'valid' (which split of a DatasetDict directory is read; see sources.pick_split).

    Every rank must call this (it calls `barrier()` exactly once). Only `is_builder` ranks build; an
    error while building is raised on the builder after the barrier, and the other ranks raise a
    RuntimeError pointing at it.
    """
    cache_dir = cache_dir or default_cache_dir(path)
    name = f"{os.path.basename(os.path.normpath(path))}-{cache_key(path, tokenizer, settings, role)}"
    entry = os.path.join(cache_dir, name)
    error: Optional[BaseException] = None
    if is_builder:
        if _complete(entry):
            if log is not None:
                split = read_meta(os.path.join(entry, "data")).get("split")
                log((f"{split}\n" if split else "") + f"data: reusing preprocessed {path} from {entry}")
        else:
            tmp = os.path.join(cache_dir, f".tmp-{name}-{os.getpid()}-{uuid.uuid4().hex[:8]}")
            try:
                os.makedirs(tmp)
                preprocess(path, os.path.join(tmp, "data"), tokenizer, settings, workers=workers,
                           progress=progress, log=log, role=role)
                try:
                    os.rename(tmp, entry)
                except OSError:
                    if not _complete(entry):  # another builder won the race with a complete entry: keep it
                        raise
            except BaseException as exc:
                error = exc
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
    barrier()
    if error is not None:
        raise error
    if not _complete(entry):
        raise DataError(f"the preprocessed data {entry} is missing: the builder rank failed to build it "
                        "(its error is printed by that rank)")
    return os.path.join(entry, "data")
