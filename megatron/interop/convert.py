"""Checkpoint conversions: Hugging Face -> ours, ours -> Hugging Face, ours -> ours with another layout.

Written checkpoints follow docs/ARCHITECTURE.md (`O/latest`, `O/<tag>/{config.yaml, meta.json, weights/}`).
A converted HF model also gets `O/model.yaml` (model + parallel sections, to combine with
`checkpoint.load: O`), `O/tokenizer/` (tokenizer files found in the HF dir) and `O/hf/` (the original
config.json / generation_config.json, reused on export for token ids and other non-architectural fields).
"""
from __future__ import annotations

import copy
import dataclasses
import json
import os
import shutil
import sys
from typing import Callable, Optional, Sequence

import torch
import yaml

from megatron.config import Config, ConfigError, config_from_dict
from megatron.config.derive import derive_and_validate
from megatron.checkpoint import weights_io as wio
from megatron.checkpoint.sharded_read import CheckpointSource, write_shards

from .hf_config import ConversionError, architecture_of, family_for_export, hf_to_model_fields, model_to_hf_config
from .hf_files import copy_tokenizer
from .hf_stream import HFSource, write_hf_weights
from . import token_ids

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
_HF_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}
RELEASE_TAG = "release"


def _ckpt_root(path: str) -> str:
    """The checkpoint dir for a checkpoint dir or a tag dir (the parent of a dir holding meta.json)."""
    if os.path.isfile(os.path.join(path, "meta.json")):
        return os.path.dirname(os.path.abspath(path))
    return path


def _resolve(cfg: Config, tp: int, pp: int) -> Config:
    """Set the parallel layout and re-derive (world = tp * pp, one data-parallel rank)."""
    cfg.parallel.tensor, cfg.parallel.pipeline = tp, pp
    cfg.launcher.num_gpus, cfg.launcher.num_nodes = tp * pp, 1
    try:
        return derive_and_validate(cfg, world_size=tp * pp)
    except ConfigError as exc:
        raise ConversionError(f"the target layout tensor={tp}, pipeline={pp} is not possible: {exc}") from None


def _check_tp(cfg: Config, tp: int) -> None:
    m = cfg.model
    nkv = m.num_kv_heads or m.num_attention_heads
    if nkv % tp:
        raise ConversionError(
            f"cannot split num_kv_heads={nkv} key/value heads over tensor={tp} ranks: every tensor rank needs whole "
            f"key/value heads (GQA), so --tp must divide {nkv}" + (f" (num_kv_heads {nkv} < tensor {tp})"
                                                                   if nkv < tp else ""))


def write_model_yaml(cfg: Config, path: str) -> None:
    """Write the model + parallel sections of `cfg` (what a training YAML needs to start from it)."""
    data = {"model": dataclasses.asdict(cfg.model),
            "parallel": {"tensor": cfg.parallel.tensor, "pipeline": cfg.parallel.pipeline}}
    with open(path, "w", encoding="utf-8") as fh:
        fh.write("# Model and layout of the converted checkpoint; use with `checkpoint.load: "
                 f"{os.path.dirname(os.path.abspath(path))}`\n")
        yaml.safe_dump(data, fh, sort_keys=False)


def hf_to_megatron(hf_dir: str, out: str, tp: int = 1, pp: int = 1, dtype: str = "fp32",
                   blocks_per_stage: Optional[Sequence[int]] = None) -> str:
    """Convert the transformers model in `hf_dir` into checkpoint dir `out` (tag `release`). Returns the tag dir.

    `dtype` is recorded as `train.precision`; weights are stored fp32 (an exact copy of bf16/fp16 sources).
    """
    from transformers import AutoConfig

    if dtype not in DTYPES:
        raise ConversionError(f"--dtype {dtype!r}: choose one of {', '.join(DTYPES)}")
    cfg_path = os.path.join(hf_dir, "config.json")
    if not os.path.isfile(cfg_path):
        raise ConversionError(f"missing file: {cfg_path} (is {hf_dir} a Hugging Face model directory?)")
    with open(cfg_path, "r", encoding="utf-8") as fh:
        raw = json.load(fh)
    family, value_head = architecture_of(raw)
    hf_cfg = AutoConfig.from_pretrained(hf_dir)
    cfg = config_from_dict({"model": hf_to_model_fields(hf_cfg, family, value_head)}, cfg_path)
    cfg.train.precision = dtype
    if cfg.model.value_head:
        cfg.objective.name = "rm"  # the objective that trains a value head (config validation requires it)
    _check_tp(cfg, tp)
    _resolve(cfg, tp, pp)
    bps = _blocks_per_stage(cfg, pp, blocks_per_stage)
    source = HFSource(hf_dir, cfg, family)  # checks names and shapes before anything is written
    os.makedirs(out, exist_ok=True)
    if copy_tokenizer(hf_dir, os.path.join(out, "tokenizer")):
        cfg.data.tokenizer = os.path.abspath(os.path.join(out, "tokenizer"))
    os.makedirs(os.path.join(out, "hf"), exist_ok=True)
    for name in ("config.json", "generation_config.json"):
        if os.path.isfile(os.path.join(hf_dir, name)):
            shutil.copyfile(os.path.join(hf_dir, name), os.path.join(out, "hf", name))
    meta = {"step": 0, "consumed_samples": 0, "blocks_per_stage": bps, "source": os.path.abspath(hf_dir),
            "hf_architecture": (raw.get("architectures") or [family])[0]}
    tag_dir = _write_streamed(out, RELEASE_TAG, cfg, source, tp, pp, bps, meta)
    write_model_yaml(cfg, os.path.join(out, "model.yaml"))
    return tag_dir


def _blocks_per_stage(cfg: Config, pp: int, blocks_per_stage: Optional[Sequence[int]]) -> list:
    """The pipeline split to write: `blocks_per_stage` (checked) or the uniform default."""
    bps = list(blocks_per_stage) if blocks_per_stage else wio.default_blocks_per_stage(cfg.model.num_layers, pp)
    if len(bps) != pp or sum(bps) != cfg.model.num_layers:
        raise ValueError(f"blocks_per_stage={bps} must have {pp} entries summing to num_layers="
                         f"{cfg.model.num_layers}")
    return bps


def _write_streamed(out: str, tag: str, cfg: Config, source, tp: int, pp: int, bps: Sequence[int],
                    meta: dict) -> str:
    """Write checkpoint `out/<tag>` (config.yaml, meta.json, weights/) from `source` one tensor slice at a time,
    atomically (`<tag>.tmp` renamed when complete, then `latest`). Returns the tag dir."""
    from megatron.config import dump_config

    tmp = wio.begin_checkpoint(out, tag)
    try:
        dump_config(cfg, os.path.join(tmp, "config.yaml"))
        write_shards(source, tmp, cfg, tp, pp, bps)
    finally:
        source.close()
    wio.write_meta(tmp, tp, pp, meta, bps)
    return wio.commit_checkpoint(out, tag)


def _find_tokenizer(ckpt: str, cfg: Config) -> Optional[str]:
    root = _ckpt_root(ckpt)
    if os.path.isdir(os.path.join(root, "tokenizer")):
        return os.path.join(root, "tokenizer")
    tok = cfg.data.tokenizer
    return tok if tok and os.path.exists(tok) else None


def _write_generation_config(hf_cfg, out: str, base_generation: Optional[dict], ids: dict) -> None:
    """generation_config.json: the base model's (sampling defaults and all) or one derived from `hf_cfg`, with
    the token ids of `ids` (`token_ids.export_generation_ids`)."""
    from transformers import GenerationConfig

    gen = GenerationConfig.from_dict(dict(base_generation)) if base_generation else \
        GenerationConfig.from_model_config(hf_cfg)
    for key, value in ids.items():
        setattr(gen, key, value)
    gen.save_pretrained(out)


def _set_tokenizer_pad(out: str, token: str) -> None:
    """Make the exported tokenizer pad with `token` (tokenizer_config.json's pad_token)."""
    path = os.path.join(out, "tokenizer_config.json")
    data = token_ids.read_json(path) or {}
    data["pad_token"] = token
    with open(path, "w", encoding="utf-8") as fh:
        json.dump(data, fh, indent=2, ensure_ascii=False)


def megatron_to_hf(ckpt: str, out: str, tag: Optional[str] = None, architecture: Optional[str] = None,
                   dtype: str = "fp32", drop_value_bias: bool = False, tokenizer: Optional[str] = None) -> str:
    """Export checkpoint `ckpt` (any tensor x pipeline layout, `latest` or `tag`) as a transformers model dir.

    A value-head model becomes `*ForSequenceClassification` (num_labels=1, score.weight = value_head.weight);
    a non-zero value-head bias is an error unless `drop_value_bias`. Token ids (bos/eos/pad) come from the
    tokenizer (`tokenizer`, else the checkpoint's own or `data.tokenizer`), which is copied alongside; the base
    model's config.json / generation_config.json are found along the checkpoint's starting points
    (`token_ids.find_base_hf_dir`). Returns `out`.
    """
    if dtype not in DTYPES:
        raise ConversionError(f"--dtype {dtype!r}: choose one of {', '.join(DTYPES)}")
    source = CheckpointSource(wio.resolve_tag_dir(ckpt, tag))  # read one tensor at a time while writing
    meta, cfg = source.meta, source.cfg
    family = family_for_export(cfg, architecture)
    hf_dir = token_ids.find_base_hf_dir(wio.resolve_tag_dir(ckpt, tag), cfg)
    base = token_ids.read_json(os.path.join(hf_dir, "config.json")) if hf_dir else None
    base_gen = token_ids.read_json(os.path.join(hf_dir, "generation_config.json")) if hf_dir else None
    if tokenizer and not os.path.exists(tokenizer):
        raise ConversionError(f"--tokenizer {tokenizer}: no such file or directory")
    tok = tokenizer or _find_tokenizer(ckpt, cfg)
    tok_ids = token_ids.tokenizer_ids(tok) if tok else None
    if tok_ids is None:
        print(f"warning: no tokenizer found for {ckpt} (data.tokenizer={cfg.data.tokenizer!r}); bos/eos/pad ids "
              "come from the base model's config or transformers' defaults: pass --tokenizer DIR", file=sys.stderr)
    torch_dtype = DTYPES[dtype]
    hf_cfg = model_to_hf_config(cfg, family, cfg.model.value_head, _HF_DTYPE_NAMES[torch_dtype], base)
    ids = token_ids.export_token_ids(tok_ids, base, base_gen, cfg.model.value_head)
    for key, value in ids.items():
        setattr(hf_cfg, key, value)
    os.makedirs(out, exist_ok=True)
    with source:
        write_hf_weights(source, cfg, family, out, torch_dtype, drop_value_bias)
    hf_cfg.save_pretrained(out)
    if not cfg.model.value_head:
        _write_generation_config(hf_cfg, out, base_gen, token_ids.export_generation_ids(ids, tok_ids, base_gen))
    if tok:
        copy_tokenizer(tok, out)
    pad = ids["pad_token_id"]
    if cfg.model.value_head and tok_ids is not None:
        if pad is None:
            print("warning: the tokenizer has no special token other than EOS to pad with; batched scoring in "
                  "transformers needs a pad_token_id that is not EOS (see README: reward models)", file=sys.stderr)
        elif pad != tok_ids.pad and pad in tok_ids.tokens and os.path.isfile(os.path.join(out, "tokenizer_config.json")):
            # Padding with EOS would move transformers' score off the EOS it is read at (see token_ids).
            _set_tokenizer_pad(out, tok_ids.tokens[pad])
            print(f"note: the exported tokenizer pads with {tok_ids.tokens[pad]!r} (id {pad}), not EOS, so batched "
                  "scoring reads each score at its EOS", file=sys.stderr)
    return out


def reshard_checkpoint(ckpt: str, out: str, tp: int, pp: int, tag: Optional[str] = None,
                       blocks_per_stage: Optional[Sequence[int]] = None) -> str:
    """Rewrite the weights of `ckpt` for tensor=`tp`, pipeline=`pp` into `out` (same tag, config updated).

    Optimizer/engine state is not carried over. Returns the new tag dir.
    """
    tag_dir = wio.resolve_tag_dir(ckpt, tag)
    source = CheckpointSource(tag_dir)
    meta, cfg = source.meta, copy.deepcopy(source.cfg)
    _check_tp(cfg, tp)
    _resolve(cfg, tp, pp)
    bps = _blocks_per_stage(cfg, pp, blocks_per_stage)
    root = _ckpt_root(tag_dir)
    os.makedirs(out, exist_ok=True)
    for sub in ("tokenizer", "hf"):
        src = os.path.join(root, sub)
        if os.path.isdir(src) and os.path.abspath(src) != os.path.abspath(os.path.join(out, sub)):
            shutil.copytree(src, os.path.join(out, sub), dirs_exist_ok=True)
            if sub == "tokenizer" and cfg.data.tokenizer and os.path.abspath(cfg.data.tokenizer) == os.path.abspath(src):
                cfg.data.tokenizer = os.path.abspath(os.path.join(out, sub))
    new_meta = {k: v for k, v in meta.items() if k not in ("tensor", "pipeline", "blocks_per_stage", "format")}
    new_meta["blocks_per_stage"] = bps
    new_meta["resharded_from"] = {"tensor": meta["tensor"], "pipeline": meta["pipeline"]}
    new_dir = _write_streamed(out, os.path.basename(os.path.normpath(tag_dir)), cfg, source, tp, pp, bps, new_meta)
    if os.path.isfile(os.path.join(root, "model.yaml")) or os.path.isdir(os.path.join(root, "hf")):
        write_model_yaml(cfg, os.path.join(out, "model.yaml"))
    return new_dir


def run_cli(action: Callable[[], str]) -> int:
    """Run one conversion for a `tools/ckpts` script: print its summary line and return exit code 0, or
    print a bad input (ConversionError, ConfigError: both ValueErrors; CheckpointError) as one line, exit 1."""
    try:
        summary = action()
    except (ValueError, wio.CheckpointError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(summary)
    return 0

