"""Special-token ids for an exported model: from the tokenizer the model was trained with, and the base model's
generation_config carried through training, never transformers' per-class defaults (Llama's bos 1 / eos 2).

Training ends every response with the tokenizer's EOS, so generation must stop there; a reward model is scored
at that EOS, so its pad id must differ from EOS (transformers scores the last token that is not padding).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Set, Union

from megatron.config import Config
from megatron.checkpoint import weights_io as wio

TokenId = Optional[Union[int, List[int]]]


@dataclass
class TokenIds:
    """The ids of one tokenizer: `bos`, `eos`, `pad` (None when it has none) and every special-token id."""
    bos: Optional[int] = None
    eos: Optional[int] = None
    pad: Optional[int] = None
    special: List[int] = field(default_factory=list)
    tokens: Dict[int, str] = field(default_factory=dict)  # id -> token string, for the special ids


def tokenizer_ids(path: str) -> TokenIds:
    """Read the special-token ids of the tokenizer at `path` (an HF tokenizer dir or a SentencePiece .model).

    Read as transformers / SentencePiece define them, without the training-time checks (a tokenizer without
    EOS still exports, with `eos` None).
    """
    if os.path.isdir(path):
        from transformers import AutoTokenizer

        hf = AutoTokenizer.from_pretrained(path, local_files_only=True)
        return TokenIds(bos=hf.bos_token_id, eos=hf.eos_token_id, pad=hf.pad_token_id,
                        special=[int(i) for i in hf.all_special_ids],
                        tokens={int(i): t for i, t in zip(hf.all_special_ids, hf.all_special_tokens)})
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=path)
    found = {name: (i if i >= 0 else None) for name, i in
             (("unk", sp.unk_id()), ("bos", sp.bos_id()), ("eos", sp.eos_id()), ("pad", sp.pad_id()))}
    special = [i for i in found.values() if i is not None]
    return TokenIds(bos=found["bos"], eos=found["eos"], pad=found["pad"], special=special,
                    tokens={i: sp.id_to_piece(i) for i in special})


def _tag_dir(path: Optional[str]) -> Optional[str]:
    if not path:
        return None
    try:
        return wio.resolve_tag_dir(path)
    except wio.CheckpointError:
        return None


def _root(tag_dir: str) -> str:
    """The checkpoint directory holding a tag directory."""
    return os.path.dirname(os.path.abspath(tag_dir))


def find_base_hf_dir(tag_dir: str, cfg: Config) -> Optional[str]:
    """The `hf/` directory (original config.json / generation_config.json) of the converted model this checkpoint
    descends from, or None.

    Looked for next to the checkpoint itself (a converted model dir), then along its chain of starting points:
    `meta.json`'s `init_from` (the weights the run started from; a resumed run records them too) and the config's
    `checkpoint.load`, recursively, and finally next to the tokenizer (a converted `O/tokenizer` beside `O/hf`).
    """
    seen: Set[str] = set()
    todo: List[Optional[str]] = [tag_dir]
    while todo:
        current = _tag_dir(todo.pop(0))
        if current is None or os.path.abspath(current) in seen:
            continue
        seen.add(os.path.abspath(current))
        hf = os.path.join(_root(current), "hf")
        if os.path.isdir(hf):
            return hf
        try:
            meta = wio.read_meta(current)
            saved = wio.read_config(current)
        except wio.CheckpointError:
            continue
        todo += [meta.get("init_from"), saved.checkpoint.load]
    tok = cfg.data.tokenizer
    if tok and os.path.isdir(tok):
        hf = os.path.join(os.path.dirname(os.path.abspath(tok)), "hf")
        if os.path.isdir(hf):
            return hf
    return None


def read_json(path: str) -> Optional[Dict[str, Any]]:
    """The JSON object in `path`, or None when the file does not exist."""
    if not os.path.isfile(path):
        return None
    with open(path, "r", encoding="utf-8") as fh:
        return json.load(fh)


def _as_list(value: TokenId) -> List[int]:
    if value is None:
        return []
    return [int(v) for v in value] if isinstance(value, (list, tuple)) else [int(value)]


def _one_or_list(values: List[int]) -> TokenId:
    return None if not values else (values[0] if len(values) == 1 else values)


def reward_pad_id(tok: TokenIds) -> Optional[int]:
    """A pad id for batched reward-model scoring in transformers: the tokenizer's pad when it differs from EOS,
    else another special token that is not EOS (BOS, then the others in the tokenizer's order), else None.

    transformers scores the last token that is not `pad_token_id`; ours is the EOS every sequence ends with,
    so padding with EOS would score the token before it.
    """
    for cand in [tok.pad, tok.bos] + list(tok.special):
        if cand is not None and cand != tok.eos:
            return int(cand)
    return None


def export_token_ids(tok: Optional[TokenIds], base_config: Optional[Dict[str, Any]],
                     base_generation: Optional[Dict[str, Any]], value_head: bool) -> Dict[str, TokenId]:
    """{'bos_token_id', 'eos_token_id', 'pad_token_id'} for the exported config.json.

    The tokenizer's ids win (training used them); without a tokenizer, the base model's config.json, then its
    generation_config.json. A reward model's pad never equals EOS (`reward_pad_id`).
    """
    out: Dict[str, TokenId] = {}
    for key, attr in (("bos_token_id", "bos"), ("eos_token_id", "eos"), ("pad_token_id", "pad")):
        value = getattr(tok, attr) if tok is not None else None
        for base in (base_config, base_generation):
            if value is None and base:
                value = base.get(key)
        out[key] = value
    if value_head and tok is not None:
        out["pad_token_id"] = reward_pad_id(tok)
    return out


def export_generation_ids(ids: Dict[str, TokenId], tok: Optional[TokenIds],
                          base_generation: Optional[Dict[str, Any]]) -> Dict[str, TokenId]:
    """Token ids for the exported generation_config.json: generation stops at the base model's EOS ids and at the
    tokenizer's EOS (the one training appended to every response); pad falls back to the first EOS."""
    eos = _as_list((base_generation or {}).get("eos_token_id"))
    for extra in _as_list(ids.get("eos_token_id")) + ([tok.eos] if tok is not None and tok.eos is not None else []):
        if extra not in eos:
            eos.append(extra)
    pad = ids.get("pad_token_id")
    if pad is None:
        pad = (base_generation or {}).get("pad_token_id")
    if pad is None and eos:
        pad = eos[0]
    bos = ids.get("bos_token_id")
    if bos is None:
        bos = (base_generation or {}).get("bos_token_id")
    return {"bos_token_id": bos, "eos_token_id": _one_or_list(eos), "pad_token_id": pad}
