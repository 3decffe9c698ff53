"""JSONL in, JSONL out for tools/generate.py: prompt records -> token ids, completions -> output records.

Input: one JSON object per line with `prompt` (text), `messages` (chat) or `prompt_ids` (megatron.generation.prompts).
Output: one line per input line, in input order: every input field, plus `completions: [{text, token_ids,
logprobs, finish_reason}]`; a prompt too long for the model keeps its line with `completions: []` and
`skipped: <why>` (and is counted), so output line i always answers input line i.
"""
from __future__ import annotations

import json
import os
from typing import Any, Dict, Iterable, List, Optional, Tuple

from megatron.config import ConfigError

from .generate import Completion
from .prompts import encode_prompt


def read_records(path: Optional[str], key: str = "generation.input") -> List[Dict[str, Any]]:
    """The JSON objects of the JSONL file `path` (blank lines ignored). ConfigError names the file and line."""
    if not path:
        raise ConfigError(f"key '{key}' is not set: give a JSONL file of prompt records "
                          "(`prompt`, `messages` or `prompt_ids` per line)")
    if not os.path.isfile(path):
        raise ConfigError(f"key '{key}': {path!r} does not exist")
    out = []
    with open(path, encoding="utf-8") as fh:
        for n, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ConfigError(f"{path} line {n}: not valid JSON ({exc.msg})") from None
            if not isinstance(rec, dict):
                raise ConfigError(f"{path} line {n}: expected a JSON object, got {type(rec).__name__}")
            out.append(rec)
    if not out:
        raise ConfigError(f"key '{key}': {path} holds no records")
    return out


def encode_records(records: List[Dict[str, Any]], indices: Iterable[int], tokenizer, template: Optional[str],
                   max_seq_len: int, path: str) -> Tuple[Dict[int, List[int]], Dict[int, str]]:
    """Token ids of records `indices`: ({index: ids} of usable prompts, {index: why skipped} of prompts that
    leave no room for a generated token within `max_seq_len`)."""
    ids, skipped = {}, {}
    for i in indices:
        p = encode_prompt(records[i], tokenizer, template, f"{path} record {i + 1}")
        if len(p) >= max_seq_len:
            skipped[i] = f"prompt has {len(p)} tokens; model.max_seq_len={max_seq_len} leaves no room to generate"
        else:
            ids[i] = p
    return ids, skipped


def completion_dict(c: Completion) -> Dict[str, Any]:
    """The output form of one completion."""
    return {"text": c.text, "token_ids": c.token_ids, "logprobs": [round(x, 6) for x in c.logprobs],
            "finish_reason": c.finish_reason}


def write_output(path: Optional[str], records: List[Dict[str, Any]], completions: Dict[int, List[Completion]],
                 skipped: Dict[int, str], key: str = "generation.output") -> None:
    """Write one line per input record (see the module docstring), atomically (temp file, then rename)."""
    if not path:
        raise ConfigError(f"key '{key}' is not set: give the JSONL file to write completions to")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as fh:
        for i, rec in enumerate(records):
            out = dict(rec)
            out["completions"] = [completion_dict(c) for c in completions.get(i, [])]
            if i in skipped:
                out["skipped"] = skipped[i]
            fh.write(json.dumps(out, ensure_ascii=False) + "\n")
    os.replace(tmp, path)
