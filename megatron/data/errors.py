"""Errors raised by the data pipeline and the names of the reasons a record can be rejected.

A `RecordProblem` describes what is wrong with ONE record (raised inside record parsing and
tokenisation, turned into a count or an error by the preprocessor). A `BadRecordError` is what the
user sees with `data.on_bad_record=error`: it names the file, the line (or record number) and the
reason. Every error about the data itself derives from `DataError`, so an entry point (train.py) prints
it as one line and exits non-zero instead of showing a traceback. Configuration mistakes are
`megatron.config.ConfigError`, not these.
"""
from __future__ import annotations

# Reason codes (keys of the preprocess report's `dropped` table) and their printed names.
MALFORMED_JSON = "malformed_json"
NOT_AN_OBJECT = "not_an_object"
MISSING_FIELD = "missing_field"
BAD_VALUE = "bad_value"
EMPTY_RESPONSE = "empty_response"
PROMPT_TOO_LONG = "prompt_too_long"
TEMPLATE_MISMATCH = "template_mismatch"
PROMPT_BOUNDARY = "prompt_boundary"
RESPONSE_TRUNCATED = "response_truncated"

REASON_NAMES = {
    MALFORMED_JSON: "malformed JSON",
    NOT_AN_OBJECT: "record is not an object",
    MISSING_FIELD: "missing field",
    BAD_VALUE: "bad field value",
    EMPTY_RESPONSE: "empty response",
    PROMPT_TOO_LONG: "prompt longer than the limit",
    TEMPLATE_MISMATCH: "prompt text not a prefix of the conversation",
    PROMPT_BOUNDARY: "prompt tokens not a prefix of the conversation",
    RESPONSE_TRUNCATED: "response truncated",
}


class RecordProblem(Exception):
    """One record cannot be used as it is: `reason` is a code above, `message` says why."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason
        self.message = message


class DataError(ValueError):
    """The data cannot be used as configured (a bad record, nothing usable, a failed build on another rank).
    The message is complete on one line (or a line plus the preprocess report): print it, no traceback."""


class BadRecordError(DataError):
    """A bad record with `data.on_bad_record=error`; the message is `<where>: <reason>: <detail>`."""

    def __init__(self, where: str, reason: str, message: str, skippable: bool = True):
        hint = ""
        if skippable:
            action = "truncate such responses" if reason == RESPONSE_TRUNCATED else "drop such records"
            if reason == PROMPT_BOUNDARY:
                action += ", or data.prompt_boundary=fallback to tokenise prompt and response separately"
            hint = f" (set data.on_bad_record=skip to {action})"
        super().__init__(f"{where}: {REASON_NAMES.get(reason, reason)}: {message}{hint}")
        self.where = where
        self.reason = reason
        self.detail = message
