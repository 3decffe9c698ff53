"""`NormalRecord` -> token sequences with a prompt/response boundary computed on TOKENS.

For each (prompt, response): tokenise the prompt part (chat: rendered with the generation prompt),
tokenise the whole text (chat: the full conversation), check the prompt tokens are a prefix of the
whole, and call the rest the response. Then: prepend BOS when the tokenizer starts sequences with one
and the text does not already (a template writing `{{ bos_token }}` is not doubled); end the response
with EOS unless it already ends so; drop prompts over the limit; truncate responses to the budget
(flagged, so the caller counts it or, with on_bad_record=error, raises). Pre-tokenised records are used
as given except for the EOS rule (no BOS is added to them).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional, Tuple

from megatron.config import ConfigError

from .chat_template import resolve_chat_template
from .errors import BAD_VALUE, EMPTY_RESPONSE, PROMPT_TOO_LONG, TEMPLATE_MISMATCH, RecordProblem
from .records import CHAT, IDS, NormalRecord
from .settings import PreprocessSettings


@dataclass
class EncodedExample:
    """Token sequences of one example: `sequences` are (ids, prompt_len) in example order."""
    sequences: List[Tuple[List[int], int]]
    truncated: bool = False
    label: Optional[bool] = None
    margin: Optional[float] = None
    notes: List[str] = field(default_factory=list)  # why it was truncated (for the report)


class Encoder:
    """Tokenises `NormalRecord`s of one kind with one tokenizer and template; build once per process."""

    def __init__(self, tokenizer, settings: PreprocessSettings):
        self.tok = tokenizer
        self.settings = settings
        self.budget = settings.sequence_budget()
        self.prompt_limit = settings.prompt_limit()
        self.template = resolve_chat_template(settings.chat_template, tokenizer.chat_template)
        self.template_for_text = settings.chat_template is not None  # strings use the template only when asked

    def _render(self, messages, generation: bool) -> str:
        if self.template is None:
            raise ConfigError("key 'data.chat_template': the data has chat messages but the tokenizer "
                              f"{self.tok.path!r} has no chat template; set data.chat_template to one of "
                              "chatml, llama3, plain or a .jinja file")
        return self.tok.render_chat(self.template, messages, generation)

    def _prompt_ids(self, rec: NormalRecord) -> Tuple[List[int], Optional[str]]:
        """Token ids of the prompt part and the text they came from (None for pre-tokenised)."""
        if rec.mode == IDS:
            return self._check_ids(rec.prompt, "prompt"), None
        if rec.mode == CHAT:
            text = self._render(rec.prompt, True)
        elif self.template_for_text:
            text = self._render(self._to_messages(rec.prompt, None), True)
        else:
            text = rec.prompt
        return self.tok.encode(text), text

    @staticmethod
    def _to_messages(prompt: str, response: Optional[str]):
        msgs = [{"role": "user", "content": prompt}] if prompt else []
        if response is not None:
            msgs.append({"role": "assistant", "content": response})
        return msgs

    def _check_ids(self, ids: List[int], name: str) -> List[int]:
        bad = [i for i in ids if not 0 <= i < self.tok.vocab_size]
        if bad:
            raise RecordProblem(BAD_VALUE, f"{name} token id {bad[0]} is outside the tokenizer's vocabulary "
                                           f"[0, {self.tok.vocab_size})")
        return list(ids)

    def _response_ids(self, rec: NormalRecord, i: int, prompt_ids: List[int], prompt_text: Optional[str]) -> List[int]:
        response, name = rec.responses[i], rec.response_names[i]
        if rec.mode == IDS:
            ids = self._check_ids(response, name)
            if not ids:
                raise RecordProblem(EMPTY_RESPONSE, f"field '{name}' is empty")
            return ids
        if rec.mode == CHAT:
            if not any(m["content"].strip() for m in response):
                raise RecordProblem(EMPTY_RESPONSE, f"field '{name}' has no response text")
            full_text = self._render(rec.prompt + response, False)
        else:
            if not response.strip():
                raise RecordProblem(EMPTY_RESPONSE, f"field '{name}' is empty")
            full_text = (self._render(self._to_messages(rec.prompt, response), False) if self.template_for_text
                         else rec.prompt + response)
        full = self.tok.encode(full_text)
        n = len(prompt_ids)
        if full[:n] != prompt_ids:
            at = next(j for j in range(n) if j >= len(full) or full[j] != prompt_ids[j])
            raise RecordProblem(
                TEMPLATE_MISMATCH,
                f"the prompt's {n} tokens are not a prefix of the tokenised conversation (first difference at "
                f"token {at}: prompt text ends {prompt_text[-30:]!r}, conversation has {full_text[:len(prompt_text) + 10][-40:]!r}); "
                "the tokenizer merges across the prompt/response boundary or the template renders the prompt "
                "differently with add_generation_prompt")
        ids = full[n:]
        if not ids:
            raise RecordProblem(EMPTY_RESPONSE, f"field '{name}' gives no tokens")
        return ids

    def encode(self, rec: NormalRecord) -> EncodedExample:
        """Token sequences of one record; raises RecordProblem (reason code + message) if unusable."""
        prompt_ids, prompt_text = self._prompt_ids(rec)
        eos, bos = self.tok.eos_id, self.tok.bos_id
        out = EncodedExample([], label=rec.label, margin=rec.margin)
        for i in range(len(rec.responses)):
            resp = self._response_ids(rec, i, prompt_ids, prompt_text)
            prompt = list(prompt_ids)
            if rec.mode != IDS and self.tok.add_bos and (prompt + resp)[0] != bos:
                prompt = [bos] + prompt
            if resp[-1] != eos:
                resp = resp + [eos]
            if len(prompt) > self.prompt_limit:
                raise RecordProblem(PROMPT_TOO_LONG, f"prompt has {len(prompt)} tokens, more than the limit "
                                                     f"{self.prompt_limit} (data.max_prompt_len)")
            room = self.budget - len(prompt)
            if len(resp) > room:
                out.truncated = True
                out.notes.append(f"field '{rec.response_names[i]}' has {len(resp)} tokens, cut to {room} "
                                 f"(prompt {len(prompt)} + response must fit {self.budget} tokens)")
                resp = resp[:room]
            out.sequences.append((prompt + resp, len(prompt)))
        return out
