"""The prompts of online RL: `rollout.prompts_path` read once, and a resumable, data-parallel prompt sampler.

A prompt record holds the prompt under `rollout.prompt_field` (text, or chat messages rendered with the chat
template and the generation prompt) - or `prompt_ids` (token ids) - and any other fields, which reward functions
receive as columns (TRL's convention: `answer`, ...).

Sampling (the offline sampler's stream, `megatron.data.sampler`, with prompts as the examples): the prompt stream
is the concatenation of epoch permutations seeded `train.seed + epoch`; step s takes the next
`rollout.prompts_per_step` stream positions, data-parallel rank r the r-th contiguous slice of them, so all
`rollout.num_generations` samples of a prompt are drawn, scored and normalised on one rank. A step is a pure
function of the number of prompts consumed before it (the checkpoint's `consumed_samples`), so a resumed run
draws exactly the prompts an uninterrupted one draws. The stream POSITION (not the record index) keys the
sampling noise, so a prompt met again in a later epoch gets fresh samples.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence

from megatron.config import ConfigError
from megatron.data.sampler import MicroBatchSampler
from megatron.data.sources import detect_format, iter_raw_records
from megatron.generation.prompts import encode_prompt


@dataclass
class PromptRecord:
    """One prompt: its record index in the file, the prompt as reward functions see it (text or messages), its
    token ids (what generation continues) and the record's other fields (reward columns)."""
    index: int
    prompt: Any
    ids: List[int]
    columns: Dict[str, Any] = field(default_factory=dict)


@dataclass
class StepPrompt:
    """A prompt drawn for one step: its stream position (the sampling key) and the record."""
    position: int
    record: PromptRecord


def _payload(raw) -> Dict[str, Any]:
    """A RawRecord's record as a dict (JSONL lines stay strings until here)."""
    if isinstance(raw.payload, str):
        try:
            rec = json.loads(raw.payload)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{raw.where}: not valid JSON ({exc.msg})") from None
    else:
        rec = dict(raw.payload)
    if not isinstance(rec, dict):
        raise ConfigError(f"{raw.where}: expected a JSON object, got {type(rec).__name__}")
    return rec


def load_prompts(cfg, tokenizer, template: Optional[str]) -> List[PromptRecord]:
    """Every record of `rollout.prompts_path`, its prompt encoded as generation will see it.

    cfg: the Config (rollout.prompts_path, rollout.prompt_field, model.max_seq_len, generation.max_new_tokens);
    template: the chat template's source for chat prompts (None: chat prompts are an error).
    Raises ConfigError naming the file and record for a record without the prompt field, a prompt with no room
    for one generated token in model.max_seq_len, or an empty file.
    """
    ro = cfg.rollout
    path = ro.prompts_path
    if not path:
        raise ConfigError("key 'rollout.prompts_path' is not set: give a file of prompt records")
    fmt = detect_format(path, "auto", key="rollout.prompts_path")
    out: List[PromptRecord] = []
    for i, raw in enumerate(iter_raw_records(path, fmt)):
        rec = _payload(raw)
        if "prompt_ids" in rec and ro.prompt_field not in rec:
            prompt, source = rec["prompt_ids"], {"prompt_ids": rec["prompt_ids"]}
            columns = {k: v for k, v in rec.items() if k != "prompt_ids"}
        elif ro.prompt_field in rec:
            prompt = rec[ro.prompt_field]
            source = {"messages" if isinstance(prompt, list) else "prompt": prompt}
            columns = {k: v for k, v in rec.items() if k != ro.prompt_field}
        else:
            raise ConfigError(f"{raw.where}: the record has no prompt field '{ro.prompt_field}' "
                              f"(rollout.prompt_field; fields: {', '.join(sorted(rec)) or 'none'})")
        ids = encode_prompt(source, tokenizer, template, raw.where)
        if len(ids) >= cfg.model.max_seq_len:
            raise ConfigError(f"{raw.where}: the prompt has {len(ids)} tokens, leaving no room to generate within "
                              f"model.max_seq_len={cfg.model.max_seq_len}; shorten it or raise model.max_seq_len")
        out.append(PromptRecord(index=i, prompt=prompt, ids=ids, columns=columns))
    if not out:
        raise ConfigError(f"key 'rollout.prompts_path': {path} holds no records")
    names = {tuple(sorted(r.columns)) for r in out}
    if len(names) > 1:  # reward functions get one list per column: every record needs the same fields
        a, b = sorted(names)[:2]
        raise ConfigError(f"{path}: prompt records have different fields ({', '.join(a) or 'none'} vs "
                          f"{', '.join(b) or 'none'}); reward columns need the same fields in every record")
    return out


class PromptSampler:
    """This rank's prompts of each step, from the global prompt stream (module docstring)."""

    def __init__(self, prompts: Sequence[PromptRecord], prompts_per_step: int, dp_rank: int, dp_size: int,
                 seed: int, shuffle: bool = True):
        """prompts: every record (the same list on every rank); prompts_per_step: over all ranks, a multiple of
        dp_size; seed: train.seed."""
        if prompts_per_step % dp_size:
            raise ConfigError(f"key 'rollout.prompts_per_step': {prompts_per_step} prompts cannot be split over "
                              f"{dp_size} data-parallel ranks; use a multiple of {dp_size}")
        self.prompts = list(prompts)
        self.prompts_per_step = prompts_per_step
        self.local = prompts_per_step // dp_size
        self.dp_rank = dp_rank
        self._stream = MicroBatchSampler(len(self.prompts), prompts_per_step, self.local, dp_rank, dp_size, seed,
                                         shuffle=shuffle)

    def step(self, consumed: int) -> List[StepPrompt]:
        """This rank's prompts of the step that starts after `consumed` prompts (a global count)."""
        start = consumed + self.dp_rank * self.local
        return [StepPrompt(position=start + k, record=self.prompts[i])
                for k, i in enumerate(self._stream.samples(start, self.local))]
