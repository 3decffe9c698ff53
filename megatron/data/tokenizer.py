"""One tokenizer interface over Hugging Face tokenizer directories and SentencePiece `.model` files.

Both wrappers expose: `encode(text) -> List[int]` (no special tokens added; special-token strings in
the text, e.g. from a chat template, become their ids), `decode`, `bos_id`/`eos_id`/`pad_id` (None when
absent), `bos_token`/`eos_token` strings, `add_bos` (whether the tokenizer itself would start a
sequence with BOS), `vocab_size`, `chat_template` (its own Jinja template or None),
`render_chat(template, messages, add_generation_prompt)` and `fingerprint` (a content hash used in
cache keys and checked when an indexed dataset is opened). Wrappers pickle by path, so worker
processes reload them instead of copying Rust/C++ objects.
"""
from __future__ import annotations

import hashlib
import os
import re
from typing import Dict, List, Optional, Sequence

from megatron.config import ConfigError

from .chat_template import compile_template, render_template


def _hash_path(path: str) -> str:
    """sha256 over the file (or every non-hidden file of the directory, names included)."""
    h = hashlib.sha256()
    if os.path.isdir(path):
        for root, dirs, files in os.walk(path):
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))
            for name in sorted(files):
                if name.startswith("."):
                    continue
                full = os.path.join(root, name)
                h.update(os.path.relpath(full, path).encode() + b"\0")
                with open(full, "rb") as fh:
                    for block in iter(lambda: fh.read(1 << 20), b""):
                        h.update(block)
    else:
        with open(path, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


class HFTokenizer:
    """A Hugging Face tokenizer directory (`AutoTokenizer.from_pretrained(path, local_files_only=True)`)."""

    def __init__(self, path: str):
        from transformers import AutoTokenizer  # heavy import, only when an HF tokenizer is used
        self.path = path
        self.hf = AutoTokenizer.from_pretrained(path, local_files_only=True)
        self.bos_id: Optional[int] = self.hf.bos_token_id
        self.eos_id: Optional[int] = self.hf.eos_token_id
        self.pad_id: Optional[int] = self.hf.pad_token_id
        self.bos_token: Optional[str] = self.hf.bos_token
        self.eos_token: Optional[str] = self.hf.eos_token
        self.vocab_size: int = len(self.hf)
        self.chat_template: Optional[str] = self.hf.chat_template if isinstance(self.hf.chat_template, str) else None
        # The tokenizer's own post-processor decides whether sequences start with BOS (Llama yes, GPT-2 no).
        probe = self.hf("a", add_special_tokens=True)["input_ids"]
        self.add_bos: bool = self.bos_id is not None and len(probe) > 0 and probe[0] == self.bos_id
        self.fingerprint: str = "hf:" + _hash_path(path)

    def __reduce__(self):
        return (HFTokenizer, (self.path,))

    def encode(self, text: str) -> List[int]:
        """Token ids of `text` without added special tokens. Returns a list of ints."""
        return list(self.hf(text, add_special_tokens=False)["input_ids"])

    def decode(self, ids: Sequence[int]) -> str:
        """Text of `ids` (special tokens kept)."""
        return self.hf.decode(list(ids), skip_special_tokens=False)

    def render_chat(self, template: str, messages: List[Dict], add_generation_prompt: bool) -> str:
        """Render `messages` with the Jinja `template` exactly as transformers' apply_chat_template does."""
        if not messages:  # an empty prompt (transformers refuses to render no messages): the same Jinja sandbox
            return render_template(template, [], add_generation_prompt, bos_token=self.bos_token or "",
                                   eos_token=self.eos_token or "")
        return self.hf.apply_chat_template(messages, chat_template=template, tokenize=False,
                                           add_generation_prompt=add_generation_prompt)


class SentencePieceTokenizer:
    """A SentencePiece `.model` file with the same interface as `HFTokenizer`.

    SentencePiece never parses control symbols (`<s>`, `</s>`, pad) from text, but chat templates write
    them as text (`{{ bos_token }}`); `encode` therefore splits the text on those strings and maps them
    to their ids (user-defined symbols are already parsed by SentencePiece itself).
    """

    def __init__(self, path: str):
        import sentencepiece as spm
        self.path = path
        self.sp = spm.SentencePieceProcessor(model_file=path)

        def _id(value: int) -> Optional[int]:
            return value if value >= 0 else None

        self.bos_id = _id(self.sp.bos_id())
        self.eos_id = _id(self.sp.eos_id())
        self.pad_id = _id(self.sp.pad_id())
        self.bos_token = self.sp.id_to_piece(self.bos_id) if self.bos_id is not None else None
        self.eos_token = self.sp.id_to_piece(self.eos_id) if self.eos_id is not None else None
        self.vocab_size = self.sp.get_piece_size()
        self.chat_template = None
        self.add_bos = self.bos_id is not None  # Llama-style SentencePiece models start with BOS
        self._control = {self.sp.id_to_piece(i): i for i in range(self.vocab_size) if self.sp.is_control(i)}
        pattern = "|".join(re.escape(p) for p in sorted(self._control, key=len, reverse=True))
        self._split = re.compile(f"({pattern})") if pattern else None
        self.fingerprint = "spm:" + _hash_path(path)
        self._compiled: Dict[str, object] = {}  # template source -> compiled Jinja template

    def __reduce__(self):
        return (SentencePieceTokenizer, (self.path,))

    def encode(self, text: str) -> List[int]:
        """Token ids of `text`; control-symbol strings become their ids. Returns a list of ints."""
        if self._split is None:
            return list(self.sp.encode(text, out_type=int))
        ids: List[int] = []
        for part in self._split.split(text):
            if part in self._control:
                ids.append(self._control[part])
            elif part:
                ids.extend(self.sp.encode(part, out_type=int))
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        """Text of `ids`."""
        return self.sp.decode([int(i) for i in ids])

    def render_chat(self, template: str, messages: List[Dict], add_generation_prompt: bool) -> str:
        """Render `messages` with the Jinja `template` (same environment as transformers uses)."""
        if template not in self._compiled:
            self._compiled[template] = compile_template(template)
        return render_template(self._compiled[template], messages, add_generation_prompt,
                               bos_token=self.bos_token or "", eos_token=self.eos_token or "")


def load_tokenizer(path: Optional[str], key: str = "data.tokenizer"):
    """Open the tokenizer at `path`: a `.model` file -> SentencePiece, a directory -> Hugging Face.

    Raises ConfigError naming `key` when the path is unset, missing, or the tokenizer has no EOS token.
    """
    if not path:
        raise ConfigError(f"key '{key}' is not set: give a Hugging Face tokenizer directory or a "
                          "SentencePiece .model file")
    if not os.path.exists(path):
        raise ConfigError(f"key '{key}': tokenizer path {path!r} does not exist")
    if os.path.isfile(path) and path.endswith(".model"):
        tok = SentencePieceTokenizer(path)
    elif os.path.isdir(path):
        try:
            tok = HFTokenizer(path)
        except (OSError, ValueError) as exc:
            raise ConfigError(f"key '{key}': cannot load a Hugging Face tokenizer from {path!r}: {exc}") from None
    else:
        raise ConfigError(f"key '{key}': {path!r} is neither a tokenizer directory nor a SentencePiece .model file")
    if tok.eos_id is None:
        raise ConfigError(f"key '{key}': tokenizer {path!r} has no EOS token; every response must end with one")
    return tok
