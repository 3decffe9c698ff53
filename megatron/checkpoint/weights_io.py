"""Canonical weights on disk: tensor/pipeline split and merge, reading and writing checkpoint shards.

Pure tensor operations (no process groups). A "full" state dict is the canonical state dict of the
model at tensor=1, pipeline=1 (keys as in docs/ARCHITECTURE.md, vocabulary rows padded to
`pad_vocab(vocab_size, 1)`). A "shard" is the state dict of one (tensor rank, pipeline stage).

Per-rank row layouts (the contract with megatron/model):
  * `attention.qkv.{weight,bias}`: rows `[q heads | k heads | v heads]` of that rank;
  * `mlp.fc1.{weight,bias}` (swiglu): rows `[gate | up]` of that rank; gelu: a plain row split;
  * `embedding.word_embeddings.weight`, `lm_head.weight`: vocabulary rows split;
  * `attention.dense.weight`, `mlp.fc2.weight`: columns split;
  * everything else (norms, biases of row-parallel layers, value head) replicated.
"""
from __future__ import annotations

import json
import os
import re
import shutil
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from megatron.config import Config, ConfigError, dump_config, load_dumped_config
from megatron.config.derive import pad_vocab

FORMAT_VERSION = 1
VOCAB_KEYS = ("embedding.word_embeddings.weight", "lm_head.weight")
EMBEDDING_KEY = "embedding.word_embeddings.weight"

_BLOCK_RE = re.compile(r"^blocks\.(\d+)\.(.+)$")


def _blocks_in(sd: Dict[str, torch.Tensor]) -> List[int]:
    """Sorted global block indices present in a state dict."""
    return sorted({int(m.group(1)) for k in sd for m in [_BLOCK_RE.match(k)] if m})


class CheckpointError(RuntimeError):
    """A checkpoint on disk is missing, corrupt, or does not match its config."""


# ----------------------------------------------------------------------------------------------- shapes
def _kv_heads(cfg: Config) -> int:
    m = cfg.model
    return m.num_kv_heads or m.num_attention_heads


def _ffn(cfg: Config) -> int:
    from megatron.config.derive import default_ffn
    return cfg.model.ffn_hidden_size or default_ffn(cfg.model.hidden_size, cfg.model.activation)


def canonical_shapes(cfg: Config, tp: int = 1) -> Dict[str, Tuple[int, ...]]:
    """Per-tensor-rank shape of every canonical parameter of `cfg.model` at tensor size `tp`.

    Vocabulary rows are `pad_vocab(vocab_size, tp) / tp`. Returns {key: shape} in model order.
    """
    m = cfg.model
    h, nq, nkv, ffn = m.hidden_size, m.num_attention_heads, _kv_heads(cfg), _ffn(cfg)
    hd = h // nq
    for name, val in (("num_attention_heads", nq), ("num_kv_heads", nkv), ("ffn_hidden_size", ffn)):
        if val % tp:
            raise ConfigError(f"model.{name}={val} is not divisible by tensor size {tp}")
    vp = pad_vocab(m.vocab_size, tp) // tp
    ln = m.norm == "layernorm"
    out: Dict[str, Tuple[int, ...]] = {EMBEDDING_KEY: (vp, h)}

    def norm(prefix: str) -> None:
        out[f"{prefix}.weight"] = (h,)
        if ln:
            out[f"{prefix}.bias"] = (h,)

    fc1_rows = (2 * ffn if m.activation == "swiglu" else ffn) // tp
    for i in range(m.num_layers):
        b = f"blocks.{i}"
        norm(f"{b}.input_norm")
        out[f"{b}.attention.qkv.weight"] = ((nq + 2 * nkv) // tp * hd, h)
        if m.qkv_bias:
            out[f"{b}.attention.qkv.bias"] = ((nq + 2 * nkv) // tp * hd,)
        out[f"{b}.attention.dense.weight"] = (h, nq // tp * hd)
        if m.linear_bias:
            out[f"{b}.attention.dense.bias"] = (h,)
        norm(f"{b}.post_attention_norm")
        out[f"{b}.mlp.fc1.weight"] = (fc1_rows, h)
        if m.linear_bias:
            out[f"{b}.mlp.fc1.bias"] = (fc1_rows,)
        out[f"{b}.mlp.fc2.weight"] = (h, ffn // tp)
        if m.linear_bias:
            out[f"{b}.mlp.fc2.bias"] = (h,)
    norm("final_norm")
    if m.value_head:
        out["value_head.weight"] = (1, h)
        out["value_head.bias"] = (1,)
    elif not m.tie_embeddings:
        out["lm_head.weight"] = (vp, h)
    return out


def _split_kind(key: str, cfg: Config) -> str:
    """How `key` is laid out across tensor ranks: vocab | qkv | fc1 | rows | cols | replicated."""
    if key in VOCAB_KEYS:
        return "vocab"
    m = _BLOCK_RE.match(key)
    sub = m.group(2) if m else key
    if sub.startswith("attention.qkv."):
        return "qkv"
    if sub.startswith("mlp.fc1."):
        return "fc1" if cfg.model.activation == "swiglu" else "rows"
    if sub in ("attention.dense.weight", "mlp.fc2.weight"):
        return "cols"
    return "replicated"


def check_keys_and_shapes(sd: Dict[str, torch.Tensor], cfg: Config, tp: int, where: str,
                          keys: Optional[Sequence[str]] = None) -> None:
    """Raise CheckpointError if `sd` lacks/adds keys or a tensor's shape differs from the contract.

    `keys`: the keys this shard must hold (default: all canonical keys); `where` names the source.
    """
    expected = canonical_shapes(cfg, tp)
    wanted = list(keys) if keys is not None else list(expected)
    missing = [k for k in wanted if k not in sd]
    extra = [k for k in sd if k not in wanted]
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"missing keys {missing[:6]}{' ...' if len(missing) > 6 else ''}")
        if extra:
            parts.append(f"unexpected keys {extra[:6]}{' ...' if len(extra) > 6 else ''}")
        raise CheckpointError(f"{where}: {'; '.join(parts)} for the model in its config "
                              f"(tensor={tp}, num_layers={cfg.model.num_layers})")
    for k in wanted:
        if tuple(sd[k].shape) != tuple(expected[k]):
            raise CheckpointError(f"{where}: tensor '{k}' has shape {tuple(sd[k].shape)} but the config "
                                  f"expects {tuple(expected[k])} at tensor={tp}")


# --------------------------------------------------------------------------------------------- vocab pad
def repad_vocab(t: torch.Tensor, vocab_size: int, padded: int, key: str = "") -> torch.Tensor:
    """Rows of a vocab tensor `[V_any, H]` cut or zero-padded to `[padded, H]` (never cutting real rows)."""
    if padded < vocab_size:
        raise ValueError(f"padded vocab {padded} < vocab_size {vocab_size} for '{key}'")
    if t.shape[0] < vocab_size:
        raise CheckpointError(f"tensor '{key}' has {t.shape[0]} rows, fewer than vocab_size {vocab_size}")
    if t.shape[0] == padded:
        return t
    if t.shape[0] > padded:
        return t[:padded].clone()
    pad = torch.zeros((padded - t.shape[0],) + tuple(t.shape[1:]), dtype=t.dtype)
    return torch.cat([t, pad], dim=0)


# ------------------------------------------------------------------------------------------ tensor split
def _qkv_sizes(cfg: Config, tp: int) -> Tuple[int, int]:
    hd = cfg.model.hidden_size // cfg.model.num_attention_heads
    return cfg.model.num_attention_heads // tp * hd, _kv_heads(cfg) // tp * hd


def split_tp(full: Dict[str, torch.Tensor], cfg: Config, tp: int) -> List[Dict[str, torch.Tensor]]:
    """Split a full (tensor=1) state dict into `tp` per-rank state dicts.

    Vocabulary rows are re-padded to `pad_vocab(vocab_size, tp)` first, then split `[Vp/tp, H]`.
    qkv `[(nq+2nkv)*hd, H]` -> per rank `[(nq+2nkv)/tp*hd, H]` as `[q_r | k_r | v_r]`; swiglu fc1
    `[2F, H]` -> `[2F/tp, H]` as `[gate_r | up_r]`; dense/fc2 `[H, X]` -> `[H, X/tp]`.
    """
    if tp < 1:
        raise ValueError(f"tensor size must be >= 1, got {tp}")
    for name, val in (("num_attention_heads", cfg.model.num_attention_heads), ("num_kv_heads", _kv_heads(cfg)),
                      ("ffn_hidden_size", _ffn(cfg))):
        if val % tp:
            raise ConfigError(f"model.{name}={val} is not divisible by tensor size {tp}"
                              + (f"; with GQA every tensor rank needs whole key/value heads, so the tensor "
                                 f"size must divide num_kv_heads={val}" if name == "num_kv_heads" else ""))
    qs, ks = _qkv_sizes(cfg, 1)
    out: List[Dict[str, torch.Tensor]] = [dict() for _ in range(tp)]
    for key, t in full.items():
        kind = _split_kind(key, cfg)
        if kind == "vocab":
            parts = repad_vocab(t, cfg.model.vocab_size, pad_vocab(cfg.model.vocab_size, tp), key).chunk(tp, 0)
        elif kind == "qkv":
            q, k, v = t.split([qs, ks, ks], dim=0)
            parts = [torch.cat([a, b, c], 0) for a, b, c in zip(q.chunk(tp, 0), k.chunk(tp, 0), v.chunk(tp, 0))]
        elif kind == "fc1":
            g, u = t.chunk(2, dim=0)
            parts = [torch.cat([a, b], 0) for a, b in zip(g.chunk(tp, 0), u.chunk(tp, 0))]
        elif kind == "rows":
            parts = t.chunk(tp, 0)
        elif kind == "cols":
            parts = t.chunk(tp, 1)
        else:
            parts = [t] * tp
        for r in range(tp):
            out[r][key] = parts[r].clone() if tp > 1 else parts[r]
    return out


def merge_tp_shards(shards: List[Dict[str, torch.Tensor]], cfg: Config) -> Dict[str, torch.Tensor]:
    """Merge per-tensor-rank state dicts (same keys in each) into the full tensor=1 state dict.

    Inverse of `split_tp`; vocabulary rows come out padded to `pad_vocab(vocab_size, 1)`.
    Replicated tensors are taken from rank 0.
    """
    tp = len(shards)
    if tp == 0:
        raise ValueError("merge_tp_shards: no shards given")
    keys = list(shards[0].keys())
    for r, sd in enumerate(shards[1:], 1):
        if set(sd.keys()) != set(keys):
            diff = sorted(set(sd.keys()) ^ set(keys))
            raise CheckpointError(f"tensor rank {r} has different keys from rank 0: {diff[:6]}")
    qs, ks = _qkv_sizes(cfg, tp)
    full: Dict[str, torch.Tensor] = {}
    for key in keys:
        ts = [sd[key] for sd in shards]
        kind = _split_kind(key, cfg)
        if kind == "vocab":
            t = repad_vocab(torch.cat(ts, 0), cfg.model.vocab_size, pad_vocab(cfg.model.vocab_size, 1), key)
        elif kind == "qkv":
            parts = [x.split([qs, ks, ks], dim=0) for x in ts]
            t = torch.cat([torch.cat([p[i] for p in parts], 0) for i in range(3)], 0)
        elif kind == "fc1":
            parts = [x.chunk(2, dim=0) for x in ts]
            t = torch.cat([torch.cat([p[i] for p in parts], 0) for i in range(2)], 0)
        elif kind == "rows":
            t = torch.cat(ts, 0)
        elif kind == "cols":
            t = torch.cat(ts, 1)
        else:
            t = ts[0]
        full[key] = t
    return full


# -------------------------------------------------------------------------------------------- pipeline
def default_blocks_per_stage(num_layers: int, pp: int) -> List[int]:
    """Uniform split of `num_layers` blocks over `pp` stages, remainder to the first stages."""
    if pp < 1 or pp > num_layers:
        raise ValueError(f"pipeline size {pp} must be in [1, num_layers={num_layers}]")
    base, rem = divmod(num_layers, pp)
    return [base + (1 if s < rem else 0) for s in range(pp)]


def stage_of_key(key: str, blocks_per_stage: Sequence[int]) -> int:
    """Pipeline stage that owns `key`: embedding -> 0, `blocks.i` -> by the split, head/final norm -> last.

    (With tied embeddings the last stage also holds a copy of the embedding; see `stages_of_key`.)
    """
    m = _BLOCK_RE.match(key)
    if m:
        i = int(m.group(1))
        start = 0
        for s, n in enumerate(blocks_per_stage):
            if start <= i < start + n:
                return s
            start += n
        raise CheckpointError(f"tensor '{key}': block {i} is beyond the {sum(blocks_per_stage)} blocks of "
                              f"blocks_per_stage={list(blocks_per_stage)}")
    if key.startswith("embedding."):
        return 0
    return len(blocks_per_stage) - 1


def _tied(full_keys, tie_embeddings: Optional[bool]) -> bool:
    if tie_embeddings is not None:
        return tie_embeddings
    return "lm_head.weight" not in full_keys and "value_head.weight" not in full_keys


def stages_of_key(key: str, blocks_per_stage: Sequence[int], tie_embeddings: bool) -> List[int]:
    """All stages holding `key` (the embedding is on stage 0 and, when tied, on the last stage too)."""
    s = stage_of_key(key, blocks_per_stage)
    last = len(blocks_per_stage) - 1
    if key == EMBEDDING_KEY and tie_embeddings and last != s:
        return [s, last]
    return [s]


def split_pp(full: Dict[str, torch.Tensor], blocks_per_stage: Sequence[int],
             tie_embeddings: Optional[bool] = None) -> List[Dict[str, torch.Tensor]]:
    """Split a state dict (full or one tensor rank's) into per-stage dicts keeping global block indices.

    `tie_embeddings=None` infers tying from the keys (no lm_head and no value_head): the last stage then
    also holds `embedding.word_embeddings.weight` under the same key.
    """
    tied = _tied(full.keys(), tie_embeddings)
    out: List[Dict[str, torch.Tensor]] = [dict() for _ in blocks_per_stage]
    for key, t in full.items():
        for s in stages_of_key(key, blocks_per_stage, tied):
            out[s][key] = t
    return out


def merge_pp(stages: List[Dict[str, torch.Tensor]]) -> Dict[str, torch.Tensor]:
    """Union of per-stage dicts; a key on several stages (tied embedding) must hold equal tensors."""
    full: Dict[str, torch.Tensor] = {}
    for s, sd in enumerate(stages):
        for key, t in sd.items():
            if key in full:
                if full[key].shape != t.shape or not torch.equal(full[key], t):
                    raise CheckpointError(f"tensor '{key}' appears on several pipeline stages with different "
                                          f"values (stage {s} differs); tied copies must be identical")
                continue
            full[key] = t
    return full


def reshard(full: Dict[str, torch.Tensor], cfg: Config, tp: int, pp: int,
            blocks_per_stage: Optional[Sequence[int]] = None) -> Dict[Tuple[int, int], Dict[str, torch.Tensor]]:
    """Full state dict -> {(tp_rank, pp_stage): shard} for the layout tensor=`tp`, pipeline=`pp`."""
    bps = list(blocks_per_stage) if blocks_per_stage is not None else \
        default_blocks_per_stage(cfg.model.num_layers, pp)
    if len(bps) != pp or sum(bps) != cfg.model.num_layers:
        raise ValueError(f"blocks_per_stage={bps} must have {pp} entries summing to num_layers="
                         f"{cfg.model.num_layers}")
    tied = cfg.model.tie_embeddings and not cfg.model.value_head
    out: Dict[Tuple[int, int], Dict[str, torch.Tensor]] = {}
    for t, sd in enumerate(split_tp(full, cfg, tp)):
        for p, stage in enumerate(split_pp(sd, bps, tied)):
            out[(t, p)] = stage
    return out


# -------------------------------------------------------------------------------------------- disk I/O
SHARD_SUFFIXES = (".safetensors", ".pt")  # safetensors since issue 11; torch .pt files are still read


def shard_path(tag_dir: str, t: int, p: int, subdir: str = "weights") -> str:
    """The file of tensor rank `t`, pipeline stage `p` in `tag_dir/<subdir>/`: the `.safetensors` file, or a legacy
    `.pt` file when only that exists (the `.safetensors` path when neither does: where to write, or to name)."""
    stem = os.path.join(tag_dir, subdir, f"tp{t:02d}_pp{p:02d}")
    for suffix in SHARD_SUFFIXES:
        if os.path.isfile(stem + suffix):
            return stem + suffix
    return stem + SHARD_SUFFIXES[0]


def weights_file(tag_dir: str, t: int, p: int) -> str:
    """Path of the weight shard of tensor rank `t`, pipeline stage `p` in `tag_dir` (see `shard_path`)."""
    return shard_path(tag_dir, t, p)


def _fp32(sd: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    return {k: (v.detach().float() if v.is_floating_point() else v.detach()).contiguous() for k, v in sd.items()}


def write_shard(path: str, sd: Dict[str, torch.Tensor]) -> None:
    """Write one shard's state dict as a safetensors file, floating tensors in fp32."""
    from .tensor_files import save_tensors
    save_tensors(path, _fp32(sd))


def load_shard(path: str) -> Dict[str, torch.Tensor]:
    """Every tensor of one shard file (safetensors, or a legacy torch .pt state dict)."""
    return _load_shard(path)


def write_weights(tag_dir: str, shards: Dict[Tuple[int, int], Dict[str, torch.Tensor]], meta: dict) -> dict:
    """Write `tag_dir/weights/tp{t:02d}_pp{p:02d}.safetensors` (fp32) for every shard and `tag_dir/meta.json`.

    `shards` must cover the full grid tensor x pipeline. meta.json gets
    `{format, tensor, pipeline, blocks_per_stage, step, ...meta}`; returns the written meta.
    """
    if not shards:
        raise ValueError("write_weights: no shards")
    tp = max(t for t, _ in shards) + 1
    pp = max(p for _, p in shards) + 1
    missing = [(t, p) for t in range(tp) for p in range(pp) if (t, p) not in shards]
    if missing:
        raise ValueError(f"write_weights: shards missing for (tensor, pipeline) ranks {missing}")
    full_meta = write_meta(tag_dir, tp, pp, meta, [len(_blocks_in(shards[(0, p)])) for p in range(pp)])
    os.makedirs(os.path.join(tag_dir, "weights"), exist_ok=True)
    for (t, p), sd in shards.items():
        write_shard(os.path.join(tag_dir, "weights", f"tp{t:02d}_pp{p:02d}.safetensors"), sd)
    return full_meta


def write_meta(tag_dir: str, tp: int, pp: int, meta: dict, blocks_per_stage: Sequence[int]) -> dict:
    """Write `tag_dir/meta.json` = {format, tensor, pipeline, step, blocks_per_stage, ...meta}; returns it."""
    full_meta = {"format": FORMAT_VERSION, "tensor": tp, "pipeline": pp, "step": 0}
    full_meta.update(meta)
    full_meta["tensor"], full_meta["pipeline"], full_meta["format"] = tp, pp, FORMAT_VERSION
    full_meta.setdefault("blocks_per_stage", list(blocks_per_stage))
    os.makedirs(tag_dir, exist_ok=True)
    with open(os.path.join(tag_dir, "meta.json"), "w", encoding="utf-8") as fh:
        json.dump(full_meta, fh, indent=2)
    return full_meta


def begin_checkpoint(ckpt_dir: str, tag: str) -> str:
    """Create the empty temporary tag directory `ckpt_dir/<tag>.tmp` (a stale one is removed); returns it."""
    os.makedirs(ckpt_dir, exist_ok=True)
    tmp = os.path.join(ckpt_dir, tag) + ".tmp"
    if os.path.exists(tmp):
        shutil.rmtree(tmp)
    os.makedirs(tmp)
    return tmp


def commit_checkpoint(ckpt_dir: str, tag: str) -> str:
    """Rename `ckpt_dir/<tag>.tmp` to `ckpt_dir/<tag>` and point `ckpt_dir/latest` at it; returns the tag dir."""
    final = os.path.join(ckpt_dir, tag)
    if os.path.exists(final):
        shutil.rmtree(final)
    os.replace(final + ".tmp", final)
    latest_tmp = os.path.join(ckpt_dir, "latest.tmp")
    with open(latest_tmp, "w", encoding="utf-8") as fh:
        fh.write(tag + "\n")
    os.replace(latest_tmp, os.path.join(ckpt_dir, "latest"))
    return final


def write_checkpoint(ckpt_dir: str, tag: str, cfg: Config,
                     shards: Dict[Tuple[int, int], Dict[str, torch.Tensor]], meta: dict) -> str:
    """Write a weights-only checkpoint `ckpt_dir/<tag>/` (config.yaml, meta.json, weights/) atomically.

    The tag is written as `<tag>.tmp`, renamed when complete, then `ckpt_dir/latest` is set to `tag`.
    Returns the tag directory.
    """
    tmp = begin_checkpoint(ckpt_dir, tag)
    dump_config(cfg, os.path.join(tmp, "config.yaml"))
    write_weights(tmp, shards, meta)
    return commit_checkpoint(ckpt_dir, tag)


def list_tags(ckpt_dir: str) -> List[str]:
    """Tag directories (holding a meta.json) in `ckpt_dir`, sorted by name."""
    if not os.path.isdir(ckpt_dir):
        return []
    return sorted(d for d in os.listdir(ckpt_dir) if os.path.isfile(os.path.join(ckpt_dir, d, "meta.json")))


def resolve_tag_dir(path: str, tag: Optional[str] = None) -> str:
    """The tag directory for a checkpoint dir (following `latest`, or `tag` if given) or a tag dir itself."""
    if not os.path.exists(path):
        raise CheckpointError(f"checkpoint path does not exist: {path}")
    if tag is not None:
        tag_dir = os.path.join(path, tag)
        if not os.path.isdir(tag_dir):
            raise CheckpointError(f"tag '{tag}' not found: {tag_dir} does not exist; tags in {path}: "
                                  f"{list_tags(path) or 'none'}")
        return tag_dir
    if os.path.isfile(os.path.join(path, "meta.json")):
        return path
    latest = os.path.join(path, "latest")
    if not os.path.isfile(latest):
        raise CheckpointError(f"{path} is not a checkpoint: neither {latest} nor {os.path.join(path, 'meta.json')} "
                              f"exists (tags found: {list_tags(path) or 'none'})")
    with open(latest, "rb") as fh:
        raw = fh.read()
    try:
        text = raw.decode("utf-8").strip()
    except UnicodeDecodeError:
        text = ""
    if not text or "/" in text or "\n" in text or not os.path.isdir(os.path.join(path, text)):
        raise CheckpointError(f"{latest} is corrupt or points nowhere: it contains {raw[:80]!r}; tags in {path}: "
                              f"{list_tags(path) or 'none'} (write one of them into {latest}, or pass the tag)")
    return os.path.join(path, text)


def read_meta(tag_dir: str) -> dict:
    """Parse `tag_dir/meta.json` with clear errors."""
    path = os.path.join(tag_dir, "meta.json")
    if not os.path.isfile(path):
        raise CheckpointError(f"missing file: {path}")
    try:
        with open(path, "r", encoding="utf-8") as fh:
            meta = json.load(fh)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path} is not valid JSON: {exc}") from None
    for k in ("tensor", "pipeline"):
        if not isinstance(meta.get(k), int) or meta[k] < 1:
            raise CheckpointError(f"{path}: '{k}' must be a positive integer, got {meta.get(k)!r}")
    if meta.get("format", FORMAT_VERSION) != FORMAT_VERSION:
        raise CheckpointError(f"{path}: unsupported checkpoint format {meta.get('format')!r} "
                              f"(this code reads format {FORMAT_VERSION})")
    return meta


def read_config(tag_dir: str) -> Config:
    """The resolved config saved in `tag_dir/config.yaml`."""
    path = os.path.join(tag_dir, "config.yaml")
    if not os.path.isfile(path):
        raise CheckpointError(f"missing file: {path}")
    return load_dumped_config(path)


def _load_shard(path: str) -> Dict[str, torch.Tensor]:
    from .tensor_files import TensorFile, TensorFileError

    try:
        with TensorFile(path) as f:
            return f.read_all()
    except TensorFileError as exc:
        raise CheckpointError(str(exc)) from None


def read_shards(tag_dir: str, cfg: Config, meta: dict) -> Dict[Tuple[int, int], Dict[str, torch.Tensor]]:
    """Load and check every `weights/tp*_pp*.pt` of `tag_dir` against the model in `cfg`.

    The pipeline split is meta's `blocks_per_stage`; when meta lacks it, it is read off the block indices
    stored in each stage's tensor-rank-0 file.
    """
    tp, pp = meta["tensor"], meta["pipeline"]
    out = {(t, p): _load_shard(weights_file(tag_dir, t, p)) for t in range(tp) for p in range(pp)}
    bps = meta.get("blocks_per_stage")
    if not bps:
        per_stage = [_blocks_in(out[(0, p)]) for p in range(pp)]
        flat = [i for blocks in per_stage for i in blocks]
        if flat != list(range(cfg.model.num_layers)):
            raise CheckpointError(f"{tag_dir}: meta.json has no blocks_per_stage and the stage files do not hold "
                                  f"consecutive, disjoint blocks 0..{cfg.model.num_layers - 1} (blocks per stage file: "
                                  f"{per_stage}); each block must be stored on exactly one pipeline stage")
        bps = [len(blocks) for blocks in per_stage]
    bps = list(bps)
    if len(bps) != pp or sum(bps) != cfg.model.num_layers:
        raise CheckpointError(f"{os.path.join(tag_dir, 'meta.json')}: blocks_per_stage={bps} does not match "
                              f"pipeline={pp} and num_layers={cfg.model.num_layers}")
    keys = list(canonical_shapes(cfg, tp))
    tied = cfg.model.tie_embeddings and not cfg.model.value_head
    stage_keys = [[k for k in keys if p in stages_of_key(k, bps, tied)] for p in range(pp)]
    for (t, p), sd in out.items():
        check_keys_and_shapes(sd, cfg, tp, weights_file(tag_dir, t, p), stage_keys[p])
    return out


def merge_shards(shards: Dict[Tuple[int, int], Dict[str, torch.Tensor]], cfg: Config) -> Dict[str, torch.Tensor]:
    """{(t, p): shard} of any layout -> the full tensor=1 state dict."""
    tp = max(t for t, _ in shards) + 1
    pp = max(p for _, p in shards) + 1
    per_rank = [merge_pp([shards[(t, p)] for p in range(pp)]) for t in range(tp)]
    return merge_tp_shards(per_rank, cfg)


def read_weights(path: str, tag: Optional[str] = None) -> Tuple[Dict[str, torch.Tensor], dict, Config]:
    """Read a checkpoint dir (following `latest`, or `tag`) or a tag dir; merge any tensor x pipeline layout.

    Returns (full state dict at tensor=1 with vocab rows padded to pad_vocab(vocab, 1), meta, cfg).
    Raises CheckpointError naming the missing file, the bad `latest`, or the mismatching tensor.
    Holds the whole model: a rank that needs its own shard only reads it with `sharded_read.CheckpointSource`.
    """
    from .sharded_read import CheckpointSource

    tag_dir = resolve_tag_dir(path, tag)
    with CheckpointSource(tag_dir) as src:
        for t in range(src.tensor):  # every shard file must exist and match the saved config
            for p in range(src.pipeline):
                src.file(t, p)
        full = {k: src.read_full(k) for k in src.keys()}
    return full, src.meta, src.cfg
