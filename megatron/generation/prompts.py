"""Prompt records -> token ids, by the rules the training data uses (megatron.data.encode).

A record holds exactly one of `prompt` (text), `messages` (chat turns, rendered with the chat template and
the generation prompt) or `prompt_ids` (token ids, used as given). Text and chat prompts get BOS prepended
when the tokenizer starts sequences with one and the text does not already (a template writing
`{{ bos_token }}` is not doubled), exactly as a training prompt would be.
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional

from megatron.config import ConfigError

PROMPT_FIELDS = ("prompt", "messages", "prompt_ids")


def encode_prompt(record: Dict[str, Any], tokenizer, template: Optional[str], where: str) -> List[int]:
    """Token ids of the record's prompt. `template`: the chat template's Jinja source (None: chat records are an
    error); `where`: names the record in errors (e.g. 'prompts.jsonl line 3'). Raises ConfigError."""
    present = [k for k in PROMPT_FIELDS if k in record]
    if len(present) != 1:
        raise ConfigError(f"{where}: a record needs exactly one of {', '.join(PROMPT_FIELDS)}, "
                          f"found {present or 'none'} (fields: {', '.join(sorted(record)) or 'none'})")
    key = present[0]
    value = record[key]
    if key == "prompt_ids":
        if not isinstance(value, list) or not value or not all(isinstance(i, int) for i in value):
            raise ConfigError(f"{where}: 'prompt_ids' must be a non-empty list of token ids")
        bad = [i for i in value if not 0 <= i < tokenizer.vocab_size]
        if bad:
            raise ConfigError(f"{where}: prompt token id {bad[0]} is outside the tokenizer's vocabulary "
                              f"[0, {tokenizer.vocab_size})")
        return list(value)
    if key == "messages":
        if not isinstance(value, list) or not all(isinstance(m, dict) and "role" in m and "content" in m
                                                  for m in value):
            raise ConfigError(f"{where}: 'messages' must be a list of {{role, content}} turns")
        if template is None:
            raise ConfigError(f"{where}: chat messages need a chat template, but the tokenizer "
                              f"{getattr(tokenizer, 'path', '')!r} has none; set data.chat_template to one of "
                              "chatml, llama3, plain or a .jinja file")
        text = tokenizer.render_chat(template, value, True)
    else:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: 'prompt' must be a string (use 'prompt_ids' for token ids)")
        text = value
    ids = tokenizer.encode(text)
    if tokenizer.add_bos and (not ids or ids[0] != tokenizer.bos_id):
        ids = [tokenizer.bos_id] + ids
    if not ids:
        raise ConfigError(f"{where}: the prompt gives no tokens")
    return ids
