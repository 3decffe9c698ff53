"""Hugging Face <-> canonical conversion one tensor slice at a time, through the rule table of `hf_mapping`.

`HFSource(hf_dir, cfg, family)` serves canonical tensors (or one tensor rank's shard of them) read lazily
from the HF safetensors/.bin files, with the API of `megatron.checkpoint.sharded_read.CheckpointSource`
(`has`, `keys`, `read_shard`, `read_full`, `bytes_read`), so the importer writes each output shard file
tensor by tensor (`sharded_read.write_shards`) and only ever holds one slice. `write_hf_weights` is the
exporter's side: canonical tensors from any checkpoint layout -> HF tensors streamed into model.safetensors.
Both apply exactly the joins of `hf_mapping` (`copy`, `vocab`, `cat`, `neox_qkv`); tests compare them with
`hf_to_canonical` / `canonical_to_hf`.
"""
from __future__ import annotations

import os
from typing import Dict, List, Optional, Tuple

import torch

from megatron.checkpoint.tensor_files import SafetensorsWriter, TensorFile, TensorFileError
from megatron.checkpoint.tp_slices import rank_ranges, split_of
from megatron.checkpoint.weights_io import canonical_shapes
from megatron.config import Config

from .hf_config import ConversionError
from .hf_files import hf_weight_files
from .hf_mapping import (VALUE_BIAS_KEY, _IGNORABLE_SUFFIXES, Rule, _canonical_to_neox, _cat_sizes, _lookup,
                         rules_for)


def hf_shapes(rule: Rule, cfg: Config) -> List[Tuple[int, ...]]:
    """Shapes of the HF tensors of `rule` for the model of `cfg` (vocabulary tensors unpadded)."""
    full = tuple(canonical_shapes(cfg, 1)[rule.canonical])
    if rule.kind == "cat":
        return [(n,) + full[1:] for n in _cat_sizes(rule, cfg)]
    if rule.kind == "vocab":
        return [(cfg.model.vocab_size,) + full[1:]]
    return [full]


class HFSource:
    """Canonical tensors of the HF model in `hf_dir`, read slice by slice (see the module docstring)."""

    def __init__(self, hf_dir: str, cfg: Config, family: str):
        self.hf_dir, self.cfg, self.family = hf_dir, cfg, family
        self.where = hf_weight_files(hf_dir)
        self._files: Dict[str, TensorFile] = {}
        self._closed_bytes = 0
        self.rules = {r.canonical: r for r in rules_for(cfg, family)}
        self.names = {k: [_lookup(self.where, h, family) for h in r.hf] for k, r in self.rules.items()}
        m = cfg.model
        used = {n for names in self.names.values() for n in names}
        tied_copies = {"lm_head.weight", "embed_out.weight"} if (m.tie_embeddings or m.value_head) else set()
        leftover = [k for k in self.where if k not in used and k not in tied_copies and not k.endswith(_IGNORABLE_SUFFIXES)]
        if leftover:
            raise ConversionError(f"the Hugging Face checkpoint has tensors this conversion does not map: "
                                  f"{sorted(leftover)[:8]}{' ...' if len(leftover) > 8 else ''}")
        for key, rule in self.rules.items():
            for name, want in zip(self.names[key], hf_shapes(rule, cfg)):
                have = tuple(self._file(name).shape(name))
                if rule.kind == "vocab" and have[:1] != want[:1]:
                    raise ConversionError(f"tensor '{name}' has {have[0]} rows but config.json vocab_size is "
                                          f"{m.vocab_size}")
                if have != want:
                    raise ConversionError(f"tensor '{name}' has shape {have} but config.json implies {want}")

    def _file(self, name: str) -> TensorFile:
        path = self.where[name]
        if path not in self._files:
            try:
                self._files[path] = TensorFile(path)
            except TensorFileError as exc:
                raise ConversionError(str(exc)) from None
        return self._files[path]

    def _read(self, name: str, dim: Optional[int] = None, a: int = 0, b: Optional[int] = None) -> torch.Tensor:
        return self._file(name).read(name, dim, a, b).float()

    # ------------------------------------------------------------------------------ CheckpointSource API
    def keys(self) -> List[str]:
        """Canonical keys of the model, in model order."""
        return list(canonical_shapes(self.cfg, 1))

    def has(self, key: str) -> bool:
        """Whether the model has canonical `key` (the value head's bias is zero: HF's score has none)."""
        return key in self.rules or (key == VALUE_BIAS_KEY and self.cfg.model.value_head)

    def read_shard(self, key: str, cfg: Config, tp: int, rank: int) -> torch.Tensor:
        """Tensor rank `rank`'s fp32 shard of canonical `key` at tensor size `tp` (rows/columns read as needed)."""
        if key == VALUE_BIAS_KEY and key not in self.rules:
            return torch.zeros(1)
        if key not in self.rules:
            raise ConversionError(f"canonical tensor '{key}' has no Hugging Face counterpart")
        split = split_of(key, self.cfg, tp)
        if split.dim is None:
            full = canonical_shapes(self.cfg, 1)[key]
            return self._range(key, None, 0, full[0] if full else 1)
        parts = [self._range(key, split.dim, a, b) for a, b in rank_ranges(split, rank)]
        return parts[0] if len(parts) == 1 else torch.cat(parts, split.dim)

    def read_full(self, key: str) -> torch.Tensor:
        """The tensor=1 canonical tensor of `key` (vocabulary rows padded)."""
        return self.read_shard(key, self.cfg, 1, 0)

    def _range(self, key: str, dim: Optional[int], a: int, b: int) -> torch.Tensor:
        """Rows (dim 0) / columns (dim 1) [a, b) of the canonical tensor `key`, or all of it (dim None)."""
        rule, names = self.rules[key], self.names[key]
        if rule.kind == "copy":
            return self._read(names[0], dim, a, b) if dim is not None else self._read(names[0])
        if dim not in (None, 0):
            raise ConversionError(f"'{key}' ({rule.kind}) cannot be sliced along dim {dim}")
        if rule.kind == "vocab":
            v = self.cfg.model.vocab_size
            real = self._read(names[0], 0, min(a, v), min(b, v))
            pad = b - max(a, v)
            if pad <= 0:
                return real
            return torch.cat([real, real.new_zeros((pad,) + tuple(real.shape[1:]))], 0)
        pieces = []
        if rule.kind == "cat":
            off = 0
            for name in names:
                n = self._file(name).shape(name)[0]
                lo, hi = max(a, off), min(b, off + n)
                if lo < hi:
                    pieces.append(self._read(name, 0, lo - off, hi - off))
                off += n
        elif rule.kind == "neox_qkv":  # rows per head [q_h | k_h | v_h] -> [all q | all k | all v]
            heads = self.cfg.model.num_attention_heads
            hd = self.cfg.model.hidden_size // heads
            g = a
            while g < b:
                c, within = divmod(g, heads * hd)
                h, j = divmod(within, hd)
                n = min(b - g, hd - j)
                row = h * 3 * hd + c * hd + j
                pieces.append(self._read(names[0], 0, row, row + n))
                g += n
        else:
            raise ConversionError(f"unknown rule kind {rule.kind!r} for '{key}'")
        return pieces[0] if len(pieces) == 1 else torch.cat(pieces, 0)

    @property
    def bytes_read(self) -> int:
        """Bytes of tensor data read from the HF files so far."""
        return self._closed_bytes + sum(f.bytes_read for f in self._files.values())

    def close(self) -> None:
        """Close the HF files."""
        for f in self._files.values():
            self._closed_bytes += f.bytes_read
            f.close()
        self._files.clear()

    def __enter__(self) -> "HFSource":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def write_hf_weights(source, cfg: Config, family: str, out_dir: str, dtype: torch.dtype = torch.float32,
                     drop_value_bias: bool = False) -> str:
    """Stream the model of `source` (a CheckpointSource, any layout) into `out_dir/model.safetensors` as HF
    tensors in `dtype`, one canonical tensor at a time. Same rules and value-bias check as `canonical_to_hf`.
    Returns the file's path."""
    rules = rules_for(cfg, family)
    missing = [r.canonical for r in rules if not source.has(r.canonical)]
    if missing:
        raise ConversionError(f"canonical tensor '{missing[0]}' is missing from the checkpoint")
    if cfg.model.value_head and source.has(VALUE_BIAS_KEY):
        bias = source.read_full(VALUE_BIAS_KEY)
        if bool((bias != 0).any()) and not drop_value_bias:
            raise ConversionError(f"value_head.bias = {bias.tolist()} is non-zero but Hugging Face's score layer has "
                                  "no bias; pass --drop-value-bias to export without it (scores shift by that "
                                  "constant, which pairwise reward losses ignore)")
    specs = [(name, shape, dtype) for r in rules for name, shape in zip(r.hf, hf_shapes(r, cfg))]
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, "model.safetensors")
    heads = cfg.model.num_attention_heads
    with SafetensorsWriter(path, specs, metadata={"format": "pt"}) as writer:
        for rule in rules:
            t = source.read_full(rule.canonical)
            if rule.kind == "cat":
                parts = t.split(_cat_sizes(rule, cfg), 0)
            elif rule.kind == "neox_qkv":
                parts = [_canonical_to_neox(t, heads)]
            elif rule.kind == "vocab":
                parts = [t[:cfg.model.vocab_size]]
            else:
                parts = [t]
            for name, p in zip(rule.hf, parts):
                writer.write(name, p.to(dtype).contiguous())
            del t, parts
    return path
