"""Files of a Hugging Face model directory: weights (safetensors / pytorch .bin, sharded or not), tokenizer.

Tensors are read directly; no model is instantiated. `hf_weight_files` lists where each tensor is without
reading any data (the streaming converters in `hf_stream.py` then read slice by slice);
`load_hf_state_dict` reads everything (small models, tests).
"""
from __future__ import annotations

import json
import os
import shutil
from typing import Dict, List

import torch

from .hf_config import ConversionError

WEIGHT_FILES = ("model.safetensors.index.json", "model.safetensors", "pytorch_model.bin.index.json",
                "pytorch_model.bin")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja", "chat_template.json",
                   "vocab.txt", "spiece.model")


def _load_one(path: str) -> Dict[str, torch.Tensor]:
    if not os.path.isfile(path):
        raise ConversionError(f"missing weights file: {path}")
    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file
            return load_file(path, device="cpu")
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ConversionError(f"cannot read {path}: {type(exc).__name__}: {exc}") from None
    if not isinstance(sd, dict):
        raise ConversionError(f"{path} does not hold a state dict")
    return sd


def load_hf_state_dict(hf_dir: str) -> Dict[str, torch.Tensor]:
    """All tensors of the HF model in `hf_dir` as {name: tensor} (original dtypes, CPU).

    Looks for, in order: model.safetensors.index.json, model.safetensors, pytorch_model.bin.index.json,
    pytorch_model.bin. Shards named by an index must all exist.
    """
    for name in WEIGHT_FILES:
        path = os.path.join(hf_dir, name)
        if not os.path.isfile(path):
            continue
        if not name.endswith(".index.json"):
            return _load_one(path)
        try:
            with open(path, "r", encoding="utf-8") as fh:
                weight_map = json.load(fh)["weight_map"]
        except (json.JSONDecodeError, KeyError) as exc:
            raise ConversionError(f"{path} is not a valid weight index (need a 'weight_map'): {exc}") from None
        sd: Dict[str, torch.Tensor] = {}
        for shard in sorted(set(weight_map.values())):
            sd.update(_load_one(os.path.join(hf_dir, shard)))
        missing = [k for k in weight_map if k not in sd]
        if missing:
            raise ConversionError(f"{path} lists tensors absent from its shards: {missing[:5]}")
        return sd
    present = sorted(os.listdir(hf_dir)) if os.path.isdir(hf_dir) else []
    raise ConversionError(f"no weights in {hf_dir}: expected one of {', '.join(WEIGHT_FILES)}; found {present}")


def hf_weight_files(hf_dir: str) -> Dict[str, str]:
    """{tensor name: file path} of the HF model in `hf_dir`, from the index or the single file's header, without
    reading any tensor data. Same search order and errors as `load_hf_state_dict`."""
    from megatron.checkpoint.tensor_files import TensorFile, TensorFileError

    def names(path: str) -> List[str]:
        if not os.path.isfile(path):
            raise ConversionError(f"missing weights file: {path}")
        try:
            with TensorFile(path) as f:
                return f.names()
        except TensorFileError as exc:
            raise ConversionError(str(exc)) from None

    for name in WEIGHT_FILES:
        path = os.path.join(hf_dir, name)
        if not os.path.isfile(path):
            continue
        if not name.endswith(".index.json"):
            return {k: path for k in names(path)}
        try:
            with open(path, "r", encoding="utf-8") as fh:
                weight_map = json.load(fh)["weight_map"]
        except (json.JSONDecodeError, KeyError) as exc:
            raise ConversionError(f"{path} is not a valid weight index (need a 'weight_map'): {exc}") from None
        out: Dict[str, str] = {}
        for shard in sorted(set(weight_map.values())):
            shard_path = os.path.join(hf_dir, shard)
            out.update({k: shard_path for k in names(shard_path)})
        missing = [k for k in weight_map if k not in out]
        if missing:
            raise ConversionError(f"{path} lists tensors absent from its shards: {missing[:5]}")
        return out
    present = sorted(os.listdir(hf_dir)) if os.path.isdir(hf_dir) else []
    raise ConversionError(f"no weights in {hf_dir}: expected one of {', '.join(WEIGHT_FILES)}; found {present}")


def save_hf_state_dict(sd: Dict[str, torch.Tensor], out_dir: str) -> str:
    """Write `sd` to `out_dir/model.safetensors` (metadata format=pt, as transformers writes). Returns the path."""
    from safetensors.torch import save_file
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, "model.safetensors")
    save_file({k: v.contiguous() for k, v in sd.items()}, path, metadata={"format": "pt"})
    return path


def copy_tokenizer(src: str, dst_dir: str) -> List[str]:
    """Copy tokenizer files from directory `src` (or a single tokenizer file `src`) into `dst_dir`.

    Returns the copied file names (empty when none were found; `dst_dir` is then not created).
    """
    if os.path.isfile(src):
        names, root = [os.path.basename(src)], os.path.dirname(src)
    elif os.path.isdir(src):
        names, root = [n for n in TOKENIZER_FILES if os.path.isfile(os.path.join(src, n))], src
    else:
        return []
    if names:
        os.makedirs(dst_dir, exist_ok=True)
        for n in names:
            shutil.copyfile(os.path.join(root, n), os.path.join(dst_dir, n))
    return names
