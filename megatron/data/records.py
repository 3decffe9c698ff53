"""Raw record dicts -> `NormalRecord`: the kind's prompt and responses, whatever the input layout.

Layouts (field names from `Fields`, i.e. the DataConfig `*_field` keys):
  sft       prompt/response strings | messages (last turn is the response) | prompt/completion
            (TRL prompt-completion; strings or message lists) | prompt_ids/response_ids |
            text (plain language modelling: no prompt, every token scored, never templated)
  pairwise  prompt/chosen/rejected strings | prompt (str or messages) + chosen/rejected message lists
            (completions only) | chosen/rejected full conversations (implicit prompt = their shared
            message prefix; a prompt field, as in UltraFeedback, is then ignored) | chosen/rejected
            strings without a prompt (implicit prompt = their longest common prefix, cut as TRL's
            `extract_prompt` does) | *_ids; optional margin, or score_chosen/score_rejected
            (margin = score_chosen - score_rejected when there is no margin field)
  unpaired  prompt/completion/label (bool; CSV strings true/false/1/0) | prompt_ids/completion_ids/label
Pre-tokenised `*_ids` fields take precedence over text; `prompt_ids` may be absent (empty prompt).
Message lists and id lists may also arrive as JSON strings (CSV cells).
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple

from .errors import BAD_VALUE, EMPTY_RESPONSE, MISSING_FIELD, RecordProblem
from .settings import Fields

TEXT, CHAT, IDS = "text", "chat", "ids"


@dataclass
class NormalRecord:
    """A record reduced to what tokenisation needs.

    mode: 'text' (prompt and responses are strings), 'chat' (lists of {role, content}) or 'ids' (lists
    of token ids). responses: 1 for sft/unpaired, 2 (chosen, rejected) for pairwise; response_names are
    the fields they came from (for messages). label: unpaired desirability; margin: optional pair margin;
    scores: optional (score_chosen, score_rejected); lm: a plain `text` record (empty prompt, never templated).
    """
    kind: str
    mode: str
    prompt: Any
    responses: List[Any]
    response_names: List[str]
    label: Optional[bool] = None
    margin: Optional[float] = None
    scores: Optional[Tuple[float, float]] = None
    lm: bool = False


def _present(rec: Dict, name: str) -> bool:
    return rec.get(name) is not None


def detect_kind(rec: Dict, f: Fields) -> Optional[str]:
    """The record kind implied by which fields `rec` has, or None when it fits none."""
    has = lambda n: _present(rec, n) or _present(rec, Fields.ids(n))  # noqa: E731
    if has(f.chosen) and has(f.rejected):
        return "pairwise"
    if has(f.completion) and _present(rec, f.label):
        return "unpaired"
    if _present(rec, f.messages) or has(f.response) or has(f.completion) or _present(rec, f.text):
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


def _number(rec: Dict, name: str) -> Optional[float]:
    """The optional finite number in field `name` (None when absent, empty or NaN)."""
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


def _margin_and_scores(rec: Dict, f: Fields) -> Tuple[Optional[float], Optional[Tuple[float, float]]]:
    """(margin, (score_chosen, score_rejected)) of a pair: the margin field wins; else the score difference."""
    margin = _number(rec, f.margin)
    sc, sr = _number(rec, f.score_chosen), _number(rec, f.score_rejected)
    if (sc is None) != (sr is None):
        have, lack = (f.score_chosen, f.score_rejected) if sr is None else (f.score_rejected, f.score_chosen)
        raise RecordProblem(MISSING_FIELD, f"'{lack}' is absent or null but '{have}' is set; give both scores "
                                           "or neither")
    scores = None if sc is None else (sc, sr)
    if margin is None and scores is not None:
        margin = sc - sr
    return margin, scores


def extract_text_prompt(chosen: str, rejected: str) -> Tuple[str, str, str]:
    """(prompt, chosen, rejected) from two strings with an implicit shared prompt, cut exactly as TRL's
    `extract_prompt`: at the first differing character, moved back one when the previous one is a space
    (so the responses keep their leading space); when one string is a prefix of the other, the last
    character of the shorter one stays in the responses. Raises RecordProblem for identical or empty strings.
    """
    n = min(len(chosen), len(rejected))
    if n == 0:
        raise RecordProblem(EMPTY_RESPONSE, "'chosen' or 'rejected' is empty")
    if chosen == rejected:
        raise RecordProblem(BAD_VALUE, "'chosen' and 'rejected' are identical, so there is no preference")
    idx = n - 1  # TRL's loop leaves idx at its last value when no character differs
    for i in range(n):
        if chosen[i] != rejected[i]:
            idx = i - 1 if i > 0 and chosen[i - 1] == " " else i
            break
    return chosen[:idx], chosen[idx:], rejected[idx:]


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
        if _present(rec, f.text) and not (_present(rec, resp_name) or _present(rec, Fields.ids(resp_name))
                                          or _present(rec, f.messages)):
            text = rec[f.text]
            if not isinstance(text, str):
                raise RecordProblem(BAD_VALUE, f"field '{f.text}' must be a string, got {text!r:.80}")
            return NormalRecord(kind, TEXT, "", [text], [f.text], lm=True)
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
        margin, scores = _margin_and_scores(rec, f)
        if _present(rec, Fields.ids(f.chosen)) or _present(rec, Fields.ids(f.rejected)):
            out = _ids_record(rec, kind, f, [f.chosen, f.rejected])
            out.margin, out.scores = margin, scores
            return out
        chosen = _text_or_messages(_get(rec, f.chosen), f.chosen)
        rejected = _text_or_messages(_get(rec, f.rejected), f.rejected)
        names = [f.chosen, f.rejected]
        if isinstance(chosen, list) and isinstance(rejected, list):
            k = _shared_prefix(chosen, rejected)
            if k > 0 or not _present(rec, f.prompt):  # full conversations: the shared prefix is the prompt
                return NormalRecord(kind, CHAT, chosen[:k], [chosen[k:], rejected[k:]], names, margin=margin,
                                    scores=scores)
        if not _present(rec, f.prompt):
            if isinstance(chosen, str) and isinstance(rejected, str):  # TRL's implicit prompt on strings
                prompt, chosen, rejected = extract_text_prompt(chosen, rejected)
                return NormalRecord(kind, TEXT, prompt, [chosen, rejected], names, margin=margin, scores=scores)
            raise RecordProblem(MISSING_FIELD, f"no '{f.prompt}' field and '{f.chosen}'/'{f.rejected}' mix a string "
                                               "and a message list: this implicit-prompt layout is unsupported; add "
                                               f"a '{f.prompt}' field, or give both as strings or both as full "
                                               "conversations (message lists)")
        prompt = _text_or_messages(_get(rec, f.prompt), f.prompt, is_prompt=True)
        return _as_chat(NormalRecord(kind, TEXT, prompt, [chosen, rejected], names, margin=margin, scores=scores))

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
