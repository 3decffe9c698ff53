"""Errors raised by the data pipeline and the names of the reasons a record can be rejected.

A `RecordProblem` describes what is wrong with ONE record (raised inside record parsing and
tokenisation, turned into a count or an error by the preprocessor). A `BadRecordError` is what the
user sees with `data.on_bad_record=error`: it names the file, the line (or record number) and the
reason. Configuration mistakes are `megatron.config.ConfigError`, not these.
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
RESPONSE_TRUNCATED = "response_truncated"

REASON_NAMES = {
    MALFORMED_JSON: "malformed JSON",
    NOT_AN_OBJECT: "record is not an object",
    MISSING_FIELD: "missing field",
    BAD_VALUE: "bad field value",
    EMPTY_RESPONSE: "empty response",
    PROMPT_TOO_LONG: "prompt longer than the limit",
    TEMPLATE_MISMATCH: "prompt tokens not a prefix of the conversation",
    RESPONSE_TRUNCATED: "response truncated",
}


class RecordProblem(Exception):
    """One record cannot be used as it is: `reason` is a code above, `message` says why."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason
        self.message = message


class BadRecordError(ValueError):
    """A bad record with `data.on_bad_record=error`; the message is `<where>: <reason>: <detail>`."""

    def __init__(self, where: str, reason: str, message: str, skippable: bool = True):
        hint = ""
        if skippable:
            action = "truncate such responses" if reason == RESPONSE_TRUNCATED else "drop such records"
            hint = f" (set data.on_bad_record=skip to {action})"
        super().__init__(f"{where}: {REASON_NAMES.get(reason, reason)}: {message}{hint}")
        self.where = where
        self.reason = reason
        self.detail = message
