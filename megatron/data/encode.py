"""`NormalRecord` -> token sequences with the prompt/response boundary computed on TOKENS.

A record's text is a list of SEGMENTS, alternately unscored (prompt, template glue) and scored (the
response; with `assistant_turns: all`, every assistant turn of an SFT conversation). Segment boundaries
come from rendering: the prompt part is the prompt rendered with the generation prompt (chat) or the
prompt string, and it must be a TEXT prefix of the whole conversation (else the template renders the
prompt differently with add_generation_prompt: an error, whatever the settings).

Tokenisation: the whole text is tokenised once, and each boundary's text prefix must tokenise to a
TOKEN prefix of it. When it does not (a BPE merge across the boundary: a response without a leading
space, a prompt ending mid-word), `prompt_boundary: fallback` (default, TRL's behaviour) tokenises
every segment separately and concatenates the ids - exactly the prompt tokens generation will use,
followed by the response tokens - and the record is counted in the report; `prompt_boundary: error`
rejects the record. Then:
  - BOS is prepended when the tokenizer starts sequences with one and the text does not already (a
    template writing `{{ bos_token }}` is not doubled);
  - a scored segment whose tokens end in EOS followed only by whitespace (ChatML / Qwen turns end
    "<|im_end|>\\n" with <|im_end|> the EOS) ends at that EOS: the trailing whitespace is unscored in the
    middle of a conversation and dropped at its end, so a sequence ends with exactly one EOS, as a
    generated response does; otherwise the last response gets EOS appended;
  - prompts (everything before the first scored token) over the limit are dropped; sequences over the
    budget are truncated (flagged, so the caller counts it or, with on_bad_record=error, raises).
Pre-tokenised records are used as given except for the EOS rule (no BOS is added to them). Plain `text`
records (`lm`) are one scored segment: every token after BOS is scored.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

from megatron.config import ConfigError

from .chat_template import resolve_chat_template
from .errors import BAD_VALUE, EMPTY_RESPONSE, PROMPT_BOUNDARY, PROMPT_TOO_LONG, TEMPLATE_MISMATCH, RecordProblem
from .records import CHAT, IDS, NormalRecord
from .settings import PreprocessSettings

Span = Tuple[int, int]  # [start, end) token positions of a scored part of a sequence


@dataclass
class EncodedSequence:
    """One sequence: ids, prompt_len (position of the first scored token) and, when the scored tokens are
    not simply positions >= prompt_len (several assistant turns), `spans` [start, end) of scored tokens."""
    ids: List[int]
    prompt_len: int
    spans: Optional[List[Span]] = None


@dataclass
class EncodedExample:
    """Token sequences of one example in example order (sft 1, pairwise chosen + rejected, unpaired 1)."""
    sequences: List[EncodedSequence]
    truncated: bool = False
    label: Optional[bool] = None
    margin: Optional[float] = None
    scores: Optional[Tuple[float, float]] = None
    notes: List[str] = field(default_factory=list)  # why it was truncated (for the report)
    fallback_notes: List[str] = field(default_factory=list)  # sequences tokenised segment by segment, and why


class Encoder:
    """Tokenises `NormalRecord`s of one kind with one tokenizer and template; build once per process."""

    def __init__(self, tokenizer, settings: PreprocessSettings):
        self.tok = tokenizer
        self.settings = settings
        self.budget = settings.sequence_budget()
        self.prompt_limit = settings.prompt_limit()
        self.template = resolve_chat_template(settings.chat_template, tokenizer.chat_template)
        self.template_for_text = settings.chat_template is not None  # strings use the template only when asked
        self.all_turns = settings.assistant_turns == "all" and settings.kind == "sft"
        self._blank: Dict[int, bool] = {}  # token id -> decodes to whitespace only

    # ------------------------------------------------------------------ text segments
    def _render(self, messages, generation: bool) -> str:
        if self.template is None:
            raise ConfigError("key 'data.chat_template': the data has chat messages but the tokenizer "
                              f"{self.tok.path!r} has no chat template; set data.chat_template to one of "
                              "chatml, llama3, plain or a .jinja file")
        return self.tok.render_chat(self.template, messages, generation)

    @staticmethod
    def _to_messages(prompt: str, response: Optional[str]):
        msgs = [{"role": "user", "content": prompt}] if prompt else []
        if response is not None:
            msgs.append({"role": "assistant", "content": response})
        return msgs

    def _prefix(self, full: str, part: str, what: str) -> int:
        """len(part) after checking `part` is a text prefix of `full` (else TEMPLATE_MISMATCH)."""
        if not full.startswith(part):
            at = next((j for j in range(len(part)) if j >= len(full) or full[j] != part[j]), len(part))
            raise RecordProblem(
                TEMPLATE_MISMATCH,
                f"{what} rendered alone is not a prefix of the rendered conversation (first difference at "
                f"character {at}: {part[max(0, at - 20):at + 10]!r} vs {full[max(0, at - 20):at + 10]!r}); the chat "
                "template renders the prompt differently with add_generation_prompt: fix the template")
        return len(part)

    def segments(self, rec: NormalRecord, i: int) -> Tuple[str, List[int], str]:
        """(full text, character boundaries [0, b1, ..., len], response field name) of response `i`:
        segments [b_j, b_j+1) alternate unscored / scored, starting unscored (possibly empty)."""
        response, name = rec.responses[i], rec.response_names[i]
        if rec.lm:
            if not response.strip():
                raise RecordProblem(EMPTY_RESPONSE, f"field '{name}' is empty")
            return response, [0, 0, len(response)], name
        if rec.mode == CHAT:
            if not any(m["content"].strip() for m in response):
                raise RecordProblem(EMPTY_RESPONSE, f"field '{name}' has no response text")
            msgs = rec.prompt + response
            full = self._render(msgs, False)
            bounds = [0]
            if self.all_turns:  # every earlier assistant turn is scored too
                for j, m in enumerate(rec.prompt):
                    if m["role"] == "assistant":
                        start = self._prefix(full, self._render(msgs[:j], True), f"the conversation before turn {j}")
                        end = self._prefix(full, self._render(msgs[:j + 1], False), f"the conversation up to turn {j}")
                        bounds += [start, end]
            bounds += [self._prefix(full, self._render(rec.prompt, True), "the prompt"), len(full)]
            if bounds != sorted(bounds):
                raise RecordProblem(TEMPLATE_MISMATCH, "the chat template renders the turns of this conversation "
                                                       "out of order; use data.assistant_turns=last")
            return full, bounds, name
        if not response.strip():
            raise RecordProblem(EMPTY_RESPONSE, f"field '{name}' is empty")
        if self.template_for_text:
            full = self._render(self._to_messages(rec.prompt, response), False)
            prompt_end = self._prefix(full, self._render(self._to_messages(rec.prompt, None), True), "the prompt")
        else:
            full, prompt_end = rec.prompt + response, len(rec.prompt)
        return full, [0, prompt_end, len(full)], name

    # ------------------------------------------------------------------ tokens
    def _encode(self, text: str, memo: Dict[str, List[int]]) -> List[int]:
        if text not in memo:
            memo[text] = self.tok.encode(text)
        return memo[text]

    def tokenize(self, full: str, bounds: Sequence[int],
                 memo: Dict[str, List[int]]) -> Tuple[List[int], List[int], Optional[str]]:
        """(ids, token boundaries matching `bounds`, None or why the segments were tokenised separately).

        Joint: ids of `full`, each boundary where its text prefix's ids end (they must be a token prefix).
        Otherwise fallback (each segment on its own, concatenated) or RecordProblem(PROMPT_BOUNDARY).
        """
        ids = self._encode(full, memo)
        token_bounds = [0]
        problem = None
        for b in bounds[1:-1]:
            prefix = self._encode(full[:b], memo) if b else []
            if ids[:len(prefix)] != prefix or len(prefix) < token_bounds[-1]:
                at = next((j for j in range(len(prefix)) if j >= len(ids) or ids[j] != prefix[j]), len(prefix))
                problem = (f"the {len(prefix)} tokens of the text before character {b} are not a prefix of the "
                           f"tokenised conversation (first difference at token {at}; text {full[max(0, b - 20):b]!r} | "
                           f"{full[b:b + 20]!r}): the tokenizer merges across the prompt/response boundary")
                break
            token_bounds.append(len(prefix))
        if problem is None:
            return list(ids), token_bounds + [len(ids)], None
        if self.settings.prompt_boundary == "error":
            raise RecordProblem(PROMPT_BOUNDARY, problem)
        ids, token_bounds = [], [0]
        for a, b in zip(bounds[:-1], bounds[1:]):
            ids += self._encode(full[a:b], memo) if b > a else []
            token_bounds.append(len(ids))
        return ids, token_bounds, problem

    def _is_blank(self, token: int) -> bool:
        if token not in self._blank:
            self._blank[token] = not self.tok.decode([token]).strip()
        return self._blank[token]

    def _eos_end(self, ids: List[int], start: int, end: int) -> Optional[int]:
        """Position after an EOS in ids[start:end] followed only by whitespace tokens, else None."""
        j = end
        while j > start and ids[j - 1] != self.tok.eos_id and self._is_blank(ids[j - 1]):
            j -= 1
        return j if j > start and ids[j - 1] == self.tok.eos_id else None

    def _check_ids(self, ids: List[int], name: str) -> List[int]:
        bad = [i for i in ids if not 0 <= i < self.tok.vocab_size]
        if bad:
            raise RecordProblem(BAD_VALUE, f"{name} token id {bad[0]} is outside the tokenizer's vocabulary "
                                           f"[0, {self.tok.vocab_size})")
        return list(ids)

    def _sequence(self, rec: NormalRecord, i: int,
                  memo: Dict[str, List[int]]) -> Tuple[List[int], List[Span], Optional[str]]:
        """(ids, scored spans, fallback reason) of response `i` before length limits."""
        eos, bos = self.tok.eos_id, self.tok.bos_id
        if rec.mode == IDS:
            prompt = self._check_ids(rec.prompt, "prompt")
            resp = self._check_ids(rec.responses[i], rec.response_names[i])
            if not resp:
                raise RecordProblem(EMPTY_RESPONSE, f"field '{rec.response_names[i]}' is empty")
            if resp[-1] != eos:
                resp = resp + [eos]
            return prompt + resp, [(len(prompt), len(prompt) + len(resp))], None
        full, bounds, name = self.segments(rec, i)
        ids, tb, fallback = self.tokenize(full, bounds, memo)
        spans = [(tb[j], tb[j + 1]) for j in range(1, len(tb) - 1, 2)]
        if spans[-1][1] <= spans[-1][0]:
            raise RecordProblem(EMPTY_RESPONSE, f"field '{name}' gives no tokens")
        out: List[Span] = []
        for k, (a, b) in enumerate(spans):
            cut = self._eos_end(ids, a, b)
            if k == len(spans) - 1:
                if cut is not None:  # the template ended the turn with EOS (+ whitespace): stop at that EOS
                    ids, b = ids[:cut], cut
                else:
                    ids, b = ids[:b] + [eos] + ids[b:], b + 1
            elif cut is not None:
                b = cut
            out.append((a, b))
        if self.tok.add_bos and ids[0] != bos:
            ids = [bos] + ids
            out = [(a + 1, b + 1) for a, b in out]
        return ids, out, fallback

    def encode(self, rec: NormalRecord) -> EncodedExample:
        """Token sequences of one record; raises RecordProblem (reason code + message) if unusable."""
        out = EncodedExample([], label=rec.label, margin=rec.margin, scores=rec.scores)
        memo: Dict[str, List[int]] = {}  # the prompt is tokenised once for both responses of a pair
        for i in range(len(rec.responses)):
            ids, spans, fallback = self._sequence(rec, i, memo)
            if fallback is not None:
                out.fallback_notes.append(f"field '{rec.response_names[i]}': {fallback}")
            prompt_len = spans[0][0]
            if prompt_len > self.prompt_limit:
                raise RecordProblem(PROMPT_TOO_LONG, f"prompt has {prompt_len} tokens, more than the limit "
                                                     f"{self.prompt_limit} (data.max_prompt_len)")
            if len(ids) > self.budget:
                out.truncated = True
                out.notes.append(f"field '{rec.response_names[i]}' has {len(ids) - prompt_len} tokens, cut to "
                                 f"{self.budget - prompt_len} (prompt {prompt_len} + response must fit {self.budget} "
                                 "tokens)")
                ids = ids[:self.budget]
                spans = [(a, min(b, self.budget)) for a, b in spans if a < self.budget]
            simple = len(spans) == 1 and spans[0][1] == len(ids)
            out.sequences.append(EncodedSequence(ids, prompt_len, None if simple else spans))
        return out
