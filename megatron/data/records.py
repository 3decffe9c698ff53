"""Raw record dicts -> `NormalRecord`: the kind's prompt and responses, whatever the input layout.

Layouts (field names from `Fields`, i.e. the DataConfig `*_field` keys):
  sft       prompt/response strings | messages (last turn is the response) | prompt/completion
            (TRL prompt-completion; strings or message lists) | prompt_ids/response_ids
  pairwise  prompt/chosen/rejected strings | prompt (str or messages) + chosen/rejected message lists
            (completions only) | chosen/rejected full conversations (implicit prompt = their shared
            message prefix; a prompt field, as in UltraFeedback, is then ignored) | *_ids
  unpaired  prompt/completion/label (bool; CSV strings true/false/1/0) | prompt_ids/completion_ids/label
Pre-tokenised `*_ids` fields take precedence over text; `prompt_ids` may be absent (empty prompt).
Message lists and id lists may also arrive as JSON strings (CSV cells).
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any, Dict, List, Optional

from .errors import BAD_VALUE, EMPTY_RESPONSE, MISSING_FIELD, RecordProblem
from .settings import Fields

TEXT, CHAT, IDS = "text", "chat", "ids"


@dataclass
class NormalRecord:
    """A record reduced to what tokenisation needs.

    mode: 'text' (prompt and responses are strings), 'chat' (lists of {role, content}) or 'ids' (lists
    of token ids). responses: 1 for sft/unpaired, 2 (chosen, rejected) for pairwise; response_names are
    the fields they came from (for messages). label: unpaired desirability; margin: optional pair margin.
    """
    kind: str
    mode: str
    prompt: Any
    responses: List[Any]
    response_names: List[str]
    label: Optional[bool] = None
    margin: Optional[float] = None


def _present(rec: Dict, name: str) -> bool:
    return rec.get(name) is not None


def detect_kind(rec: Dict, f: Fields) -> Optional[str]:
    """The record kind implied by which fields `rec` has, or None when it fits none."""
    has = lambda n: _present(rec, n) or _present(rec, Fields.ids(n))  # noqa: E731
    if has(f.chosen) and has(f.rejected):
        return "pairwise"
    if has(f.completion) and _present(rec, f.label):
        return "unpaired"
    if _present(rec, f.messages) or has(f.response) or has(f.completion):
        return "sft"
    return None


def _maybe_json(value: Any) -> Any:
    """Decode JSON lists stored as strings (CSV cells); other values unchanged."""
    if isinstance(value, str) and value.lstrip().startswith("["):
        try:
            return json.loads(value)
        except json.JSONDecodeError:
            return value
    return value


def _get(rec: Dict, name: str, required: bool = True) -> Any:
    value = rec.get(name)
    if value is None:
        if required:
            raise RecordProblem(MISSING_FIELD, f"'{name}' is absent or null")
        return None
    return _maybe_json(value)


def _check_messages(value: List, name: str) -> List[Dict[str, str]]:
    out = []
    for i, m in enumerate(value):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise RecordProblem(BAD_VALUE, f"field '{name}' message {i} must be {{role: str, content: str}}, got {m!r:.80}")
        out.append({"role": m["role"], "content": m["content"]})
    return out


def _text_or_messages(value: Any, name: str, is_prompt: bool = False) -> Any:
    if isinstance(value, str):
        return value
    if isinstance(value, list) and not value:
        if is_prompt:
            return []
        raise RecordProblem(EMPTY_RESPONSE, f"field '{name}' is an empty list of messages")
    if isinstance(value, list) and all(isinstance(m, dict) for m in value):
        return _check_messages(value, name)
    raise RecordProblem(BAD_VALUE, f"field '{name}' must be a string or a list of messages, got {value!r:.80}")


def _ids(value: Any, name: str) -> List[int]:
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        raise RecordProblem(BAD_VALUE, f"field '{name}' must be a list of ints, got {value!r:.80}")
    return [int(v) for v in value]


def _label(value: Any, name: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in ("true", "false", "1", "0"):
        return value.strip().lower() in ("true", "1")
    raise RecordProblem(BAD_VALUE, f"field '{name}' must be a bool (true/false), got {value!r:.80}")


def _margin(rec: Dict, name: str) -> Optional[float]:
    value = rec.get(name)
    if value is None or value == "":
        return None
    try:
        out = float(value)
    except (TypeError, ValueError):
        raise RecordProblem(BAD_VALUE, f"field '{name}' must be a number, got {value!r:.80}") from None
    if math.isnan(out):  # a missing value in a pandas-written column
        return None
    if math.isinf(out):
        raise RecordProblem(BAD_VALUE, f"field '{name}' must be finite, got {value!r:.80}")
    return out


def _as_chat(rec: "NormalRecord") -> "NormalRecord":
    """Turn string parts into messages when any part is a message list (prompt -> user, response -> assistant)."""
    parts = [rec.prompt] + rec.responses
    if all(isinstance(p, str) for p in parts):
        return rec
    rec.mode = CHAT
    if isinstance(rec.prompt, str):
        rec.prompt = [{"role": "user", "content": rec.prompt}] if rec.prompt else []
    rec.responses = [[{"role": "assistant", "content": r}] if isinstance(r, str) else r for r in rec.responses]
    return rec


def _shared_prefix(a: List[Dict], b: List[Dict]) -> int:
    """Number of leading messages `a` and `b` share, leaving at least one message in each."""
    k = 0
    while k < min(len(a), len(b)) - 1 and a[k] == b[k]:
        k += 1
    return k


def _ids_record(rec: Dict, kind: str, f: Fields, names: List[str]) -> NormalRecord:
    prompt = _ids(_get(rec, Fields.ids(f.prompt), required=False) or [], Fields.ids(f.prompt))
    responses = [_ids(_get(rec, Fields.ids(n)), Fields.ids(n)) for n in names]
    return NormalRecord(kind, IDS, prompt, responses, [Fields.ids(n) for n in names])


def normalise(rec: Any, kind: str, f: Fields) -> NormalRecord:
    """Reduce a raw record dict to a `NormalRecord` of `kind`; raises RecordProblem naming the bad field."""
    if not isinstance(rec, dict):
        raise RecordProblem(BAD_VALUE, f"record must be a JSON object, got {type(rec).__name__}")
    if kind == "sft":
        # TRL's prompt-completion layout is SFT too: the response may come from the completion field.
        resp_name = next((n for n in (f.response, f.completion)
                          if _present(rec, n) or _present(rec, Fields.ids(n))), f.response)
        if _present(rec, Fields.ids(resp_name)):
            return _ids_record(rec, kind, f, [resp_name])
        if _present(rec, f.messages) and not _present(rec, resp_name):
            msgs = _get(rec, f.messages)
            if not isinstance(msgs, list) or not msgs:
                raise RecordProblem(BAD_VALUE, f"field '{f.messages}' must be a non-empty list of messages")
            msgs = _check_messages(msgs, f.messages)
            if msgs[-1]["role"] != "assistant":
                raise RecordProblem(BAD_VALUE, f"field '{f.messages}': the last message must be the assistant's "
                                               f"response, got role {msgs[-1]['role']!r}")
            return NormalRecord(kind, CHAT, msgs[:-1], [msgs[-1:]], [f.messages])
        prompt = _text_or_messages(_get(rec, f.prompt), f.prompt, is_prompt=True)
        response = _text_or_messages(_get(rec, resp_name), resp_name)
        return _as_chat(NormalRecord(kind, TEXT, prompt, [response], [resp_name]))

    if kind == "pairwise":
        margin = _margin(rec, f.margin)
        if _present(rec, Fields.ids(f.chosen)) or _present(rec, Fields.ids(f.rejected)):
            out = _ids_record(rec, kind, f, [f.chosen, f.rejected])
            out.margin = margin
            return out
        chosen = _text_or_messages(_get(rec, f.chosen), f.chosen)
        rejected = _text_or_messages(_get(rec, f.rejected), f.rejected)
        if isinstance(chosen, list) and isinstance(rejected, list):
            k = _shared_prefix(chosen, rejected)
            if k > 0:  # full conversations: the shared prefix is the prompt (implicit prompt)
                return NormalRecord(kind, CHAT, chosen[:k], [chosen[k:], rejected[k:]], [f.chosen, f.rejected],
                                    margin=margin)
        prompt = _text_or_messages(_get(rec, f.prompt), f.prompt, is_prompt=True)
        return _as_chat(NormalRecord(kind, TEXT, prompt, [chosen, rejected], [f.chosen, f.rejected], margin=margin))

    if kind == "unpaired":
        label = _label(_get(rec, f.label), f.label)
        if _present(rec, Fields.ids(f.completion)):
            out = _ids_record(rec, kind, f, [f.completion])
        else:
            prompt = _text_or_messages(_get(rec, f.prompt), f.prompt, is_prompt=True)
            completion = _text_or_messages(_get(rec, f.completion), f.completion)
            out = _as_chat(NormalRecord(kind, TEXT, prompt, [completion], [f.completion]))
        out.label = label
        return out
    raise ValueError(f"unknown record kind {kind!r}")
