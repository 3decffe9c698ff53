"""The part of the config that decides what preprocessing produces, checked once.

`PreprocessSettings` is a small frozen (picklable, hashable) object sent to worker processes and
hashed into the cache key. It is built from a `Config` by `preprocess_settings(cfg)`; every check
raises `ConfigError` naming the key to change.

Length budget: an example must fit one row of `model.max_seq_len` tokens when packed, so each of its
sequences gets `max_seq_len // sequences_per_example(kind)` tokens (SFT 1 sequence; pairwise chosen +
rejected; unpaired completion + its KL sequence). Prompts longer than `max_prompt_len` are dropped;
responses are truncated to fit the rest of the budget.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Optional

from megatron.config import ConfigError

KINDS = ("sft", "pairwise", "unpaired")
FORMATS = ("auto", "jsonl", "json", "parquet", "csv", "hf_disk", "indexed")
PROMPT_BOUNDARIES = ("fallback", "error")
ASSISTANT_TURNS = ("last", "all")


def sequences_per_example(kind: str) -> int:
    """Sequences one example occupies in a row: sft 1, pairwise 2 (chosen, rejected), unpaired 2 (completion, KL)."""
    return 1 if kind == "sft" else 2


def stored_sequences_per_example(kind: str) -> int:
    """Sequences stored per example in the indexed dataset: pairwise 2, else 1 (KL sequences are built on open)."""
    return 2 if kind == "pairwise" else 1


@dataclass(frozen=True)
class Fields:
    """Record field names (DataConfig `*_field`); pre-tokenised variants are `<name>_ids`."""
    prompt: str = "prompt"
    response: str = "response"
    messages: str = "messages"
    chosen: str = "chosen"
    rejected: str = "rejected"
    completion: str = "completion"
    label: str = "label"
    margin: str = "margin"
    text: str = "text"
    score_chosen: str = "score_chosen"
    score_rejected: str = "score_rejected"

    @staticmethod
    def ids(name: str) -> str:
        """Name of the pre-tokenised variant of field `name` (`prompt` -> `prompt_ids`)."""
        return f"{name}_ids"


@dataclass(frozen=True)
class PreprocessSettings:
    """Everything that decides the tokens written for a raw file (and nothing else)."""
    fields: Fields = Fields()
    kind: str = "auto"
    format: str = "auto"
    chat_template: Optional[str] = None
    max_seq_len: int = 256
    max_prompt_len: Optional[int] = None  # None = sequence budget // 2
    on_bad_record: str = "error"
    # prompt tokens not a prefix of the joint tokenisation: 'fallback' tokenises prompt and response
    # separately and concatenates them (TRL's behaviour, counted in the report); 'error' rejects the record
    prompt_boundary: str = "fallback"
    assistant_turns: str = "last"  # SFT chat: score the last assistant turn only, or 'all' of them

    def with_kind(self, kind: str) -> "PreprocessSettings":
        """A copy with the detected `kind` filled in (after `data.kind: auto`)."""
        return replace(self, kind=kind)

    def sequence_budget(self, kind: Optional[str] = None) -> int:
        """Most tokens one sequence may have: max_seq_len // sequences_per_example(kind)."""
        return self.max_seq_len // sequences_per_example(kind or self.kind)

    def prompt_limit(self, kind: Optional[str] = None) -> int:
        """Most prompt tokens (BOS included) a sequence may have; longer prompts are dropped."""
        budget = self.sequence_budget(kind)
        limit = self.max_prompt_len if self.max_prompt_len is not None else budget // 2
        if not 0 <= limit < budget:
            raise ConfigError(
                f"key 'data.max_prompt_len': {limit} leaves no room for the response: each "
                f"{kind or self.kind} sequence has {budget} tokens (model.max_seq_len={self.max_seq_len} // "
                f"{sequences_per_example(kind or self.kind)} sequences per example); use a value below {budget}")
        return limit


def preprocess_settings(cfg) -> PreprocessSettings:
    """Build and check the `PreprocessSettings` of a `Config` (data section + model.max_seq_len)."""
    d = cfg.data
    if d.kind not in KINDS + ("auto",):
        raise ConfigError(f"key 'data.kind': {d.kind!r} is not one of auto, {', '.join(KINDS)}")
    if d.format not in FORMATS:
        raise ConfigError(f"key 'data.format': {d.format!r} is not one of {', '.join(FORMATS)}")
    if d.on_bad_record not in ("error", "skip"):
        raise ConfigError(f"key 'data.on_bad_record': {d.on_bad_record!r} is not one of error, skip")
    if cfg.model.max_seq_len < 2:
        raise ConfigError(f"key 'model.max_seq_len': must be >= 2, got {cfg.model.max_seq_len}")
    if d.max_prompt_len is not None and d.max_prompt_len < 0:
        raise ConfigError(f"key 'data.max_prompt_len': must be >= 0, got {d.max_prompt_len}")
    if d.prompt_boundary not in PROMPT_BOUNDARIES:
        raise ConfigError(f"key 'data.prompt_boundary': {d.prompt_boundary!r} is not one of "
                          f"{', '.join(PROMPT_BOUNDARIES)}")
    if d.assistant_turns not in ASSISTANT_TURNS:
        raise ConfigError(f"key 'data.assistant_turns': {d.assistant_turns!r} is not one of "
                          f"{', '.join(ASSISTANT_TURNS)}")
    if d.num_workers < 1:
        raise ConfigError(f"key 'data.num_workers': must be >= 1, got {d.num_workers}")
    fields = Fields(prompt=d.prompt_field, response=d.response_field, messages=d.messages_field,
                    chosen=d.chosen_field, rejected=d.rejected_field, completion=d.completion_field,
                    label=d.label_field, margin=d.margin_field, text=d.text_field,
                    score_chosen=d.score_chosen_field, score_rejected=d.score_rejected_field)
    settings = PreprocessSettings(fields=fields, kind=d.kind, format=d.format, chat_template=d.chat_template,
                                  max_seq_len=cfg.model.max_seq_len, max_prompt_len=d.max_prompt_len,
                                  on_bad_record=d.on_bad_record, prompt_boundary=d.prompt_boundary,
                                  assistant_turns=d.assistant_turns)
    if d.kind != "auto":
        settings.prompt_limit()  # validate early when the kind is known
    return settings
