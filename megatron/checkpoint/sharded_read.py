"""Read one rank's shard of a checkpoint saved at any tensor x pipeline layout, slice by slice.

`CheckpointSource(tag_dir)` opens the saved shard files lazily (headers only) and `read_shard(key, cfg, tp,
rank)` returns rank `rank`'s shard at tensor size `tp` by reading only the rows/columns that shard needs
(`tp_slices.shard_pieces`) from the file of the pipeline stage that holds `key`. The full model is never
assembled: a rank of tensor 2 x pipeline 2 reads a quarter of the bytes. `bytes_read` and `tensors_read`
count what was read (tests assert them).

The same class reads the canonical optimizer state (`subdir="optimizer/exp_avg"`, ...), which is laid out
exactly like the weights.
"""
from __future__ import annotations

import os
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from megatron.config import Config

from .tensor_files import TensorFile, TensorFileError
from .tp_slices import shard_pieces
from .weights_io import (CheckpointError, _BLOCK_RE, canonical_shapes, read_config, read_meta, resolve_tag_dir,
                         shard_path, stages_of_key, stage_of_key)


class CheckpointSource:
    """Lazy reader of the canonical tensors in `tag_dir/<subdir>/tp{t}_pp{p}.*` (any layout).

    Attributes: `meta`, `cfg` (the saved config), `tensor`, `pipeline`, `blocks_per_stage`, `bytes_read`,
    `tensors_read`. Use as a context manager (closes the files) or call `close()`.
    """

    def __init__(self, tag_dir: str, subdir: str = "weights", meta: Optional[dict] = None,
                 cfg: Optional[Config] = None):
        self.tag_dir = resolve_tag_dir(tag_dir)
        self.subdir = subdir
        self.meta = meta if meta is not None else read_meta(self.tag_dir)
        self.cfg = cfg if cfg is not None else read_config(self.tag_dir)
        self.tensor, self.pipeline = int(self.meta["tensor"]), int(self.meta["pipeline"])
        self._files: Dict[Tuple[int, int], TensorFile] = {}
        self._closed_bytes = 0
        self._closed_tensors = 0
        self._shapes = canonical_shapes(self.cfg, self.tensor)
        self.tied = self.cfg.model.tie_embeddings and not self.cfg.model.value_head
        self.blocks_per_stage = self._blocks_per_stage()

    # --------------------------------------------------------------------------------------------- files
    def path(self, t: int, p: int) -> str:
        """The shard file of saved tensor rank `t`, stage `p`."""
        return shard_path(self.tag_dir, t, p, self.subdir)

    def file(self, t: int, p: int) -> TensorFile:
        """Saved shard (t, p), opened on first use; its header is checked against the saved config."""
        if (t, p) not in self._files:
            path = self.path(t, p)
            try:
                f = TensorFile(path)
            except TensorFileError as exc:
                raise CheckpointError(str(exc)) from None
            self._files[(t, p)] = f
            if hasattr(self, "blocks_per_stage"):
                self._check_header(f, p)
        return self._files[(t, p)]

    def _check_header(self, f: TensorFile, p: int) -> None:
        want = [k for k in self._shapes if p in stages_of_key(k, self.blocks_per_stage, self.tied)]
        have = f.names()
        missing = [k for k in want if k not in have]
        extra = [k for k in have if k not in want]
        if missing or extra:
            parts = ([f"missing keys {missing[:6]}{' ...' if len(missing) > 6 else ''}"] if missing else []) + \
                    ([f"unexpected keys {extra[:6]}{' ...' if len(extra) > 6 else ''}"] if extra else [])
            raise CheckpointError(f"{f.path}: {'; '.join(parts)} for the model in its config (tensor={self.tensor}, "
                                  f"num_layers={self.cfg.model.num_layers})")
        for k in want:
            if tuple(f.shape(k)) != tuple(self._shapes[k]):
                raise CheckpointError(f"{f.path}: tensor '{k}' has shape {tuple(f.shape(k))} but the config expects "
                                      f"{tuple(self._shapes[k])} at tensor={self.tensor}")

    def _blocks_per_stage(self) -> List[int]:
        n = self.cfg.model.num_layers
        bps = self.meta.get("blocks_per_stage")
        if not bps:  # read off the block indices stored in each stage's tensor-rank-0 file (headers only)
            per_stage = [sorted({int(m.group(1)) for k in self.file(0, p).names() for m in [_BLOCK_RE.match(k)] if m})
                         for p in range(self.pipeline)]
            flat = [i for blocks in per_stage for i in blocks]
            if flat != list(range(n)):
                raise CheckpointError(f"{self.tag_dir}: meta.json has no blocks_per_stage and the stage files do not "
                                      f"hold consecutive, disjoint blocks 0..{n - 1} (blocks per stage file: "
                                      f"{per_stage}); each block must be stored on exactly one pipeline stage")
            bps = [len(b) for b in per_stage]
        bps = [int(b) for b in bps]
        self.blocks_per_stage = bps
        if len(bps) != self.pipeline or sum(bps) != n:
            raise CheckpointError(f"{os.path.join(self.tag_dir, 'meta.json')}: blocks_per_stage={bps} does not match "
                                  f"pipeline={self.pipeline} and num_layers={n}")
        for (t, p), f in self._files.items():  # files opened while inferring: check them now
            self._check_header(f, p)
        return bps

    # --------------------------------------------------------------------------------------------- reads
    def has(self, key: str) -> bool:
        """Whether the saved model has canonical tensor `key`."""
        return key in self._shapes

    def keys(self) -> List[str]:
        """Canonical keys of the saved model, in model order."""
        return list(self._shapes)

    def full_shape(self, key: str) -> Tuple[int, ...]:
        """Shape of `key` at tensor=1 with vocabulary rows padded to pad_vocab(vocab, 1)."""
        return tuple(canonical_shapes(self.cfg, 1)[key])

    def read_shard(self, key: str, cfg: Config, tp: int, rank: int) -> torch.Tensor:
        """Tensor rank `rank`'s shard of `key` for the model of `cfg` at tensor size `tp` (stored dtype).

        Reads only the rows/columns that shard needs, from the stage file that holds `key`.
        """
        if not self.has(key):
            raise CheckpointError(f"{self.tag_dir} has no tensor '{key}'")
        stage = stage_of_key(key, self.blocks_per_stage)
        dim, pieces = shard_pieces(key, cfg, tp, rank, self.cfg, self.tensor)
        if dim is None:
            return self.file(0, stage).read(key)
        parts = []
        for saved_rank, a, b in pieces:
            if saved_rank is None:  # vocabulary padding rows this checkpoint does not hold
                f = self.file(0, stage)
                parts.append(torch.zeros((b - a,) + tuple(f.shape(key)[1:]), dtype=f.dtype(key)))
            else:
                parts.append(self.file(saved_rank, stage).read(key, dim, a, b))
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim)

    def read_shard_into(self, key: str, cfg: Config, tp: int, rank: int, out: torch.Tensor) -> None:
        """`read_shard` straight into `out` (this rank's shard shape, the stored dtype, CPU): each piece is read
        into its place, so loading a parameter needs no memory beside the parameter itself."""
        if not self.has(key):
            raise CheckpointError(f"{self.tag_dir} has no tensor '{key}'")
        stage = stage_of_key(key, self.blocks_per_stage)
        dim, pieces = shard_pieces(key, cfg, tp, rank, self.cfg, self.tensor)
        if dim is None:
            f = self.file(0, stage)
            shape = tuple(f.shape(key))
            if tuple(out.shape) != shape:
                raise CheckpointError(f"{f.path}: tensor '{key}' has shape {shape}, the destination {tuple(out.shape)}")
            if shape and f.dtype(key) == out.dtype:
                f.read_into(key, 0, 0, shape[0], out)
            else:
                with torch.no_grad():
                    out.copy_(f.read(key))
            return
        at = 0
        for saved_rank, a, b in pieces:
            dst = out.narrow(dim, at, b - a)
            f = None if saved_rank is None else self.file(saved_rank, stage)
            with torch.no_grad():
                if f is None:
                    dst.zero_()
                elif f.dtype(key) != out.dtype:  # not stored in the destination's dtype: read, then convert
                    dst.copy_(f.read(key, dim, a, b))
                else:
                    f.read_into(key, dim, a, b, dst)
            at += b - a
        if at != out.shape[dim]:
            raise CheckpointError(f"{self.tag_dir}: tensor '{key}' re-sharded to tensor={tp} has {at} rows/columns along "
                                  f"dim {dim}, the destination {out.shape[dim]}")

    def read_full(self, key: str, cfg: Optional[Config] = None) -> torch.Tensor:
        """The tensor=1 tensor of `key` (vocabulary rows padded to pad_vocab(vocab, 1))."""
        return self.read_shard(key, cfg or self.cfg, 1, 0)

    @property
    def bytes_read(self) -> int:
        """Tensor bytes read so far (all files, including closed ones)."""
        return self._closed_bytes + sum(f.bytes_read for f in self._files.values())

    @property
    def tensors_read(self) -> int:
        """Slices read so far."""
        return self._closed_tensors + sum(f.tensors_read for f in self._files.values())

    def files_opened(self) -> List[Tuple[int, int]]:
        """(tensor rank, stage) of every saved file opened so far."""
        return sorted(self._files)

    def close(self) -> None:
        """Close every opened file (counters keep their values)."""
        for f in self._files.values():
            self._closed_bytes += f.bytes_read
            self._closed_tensors += f.tensors_read
            f.close()
        self._files.clear()

    def __enter__(self) -> "CheckpointSource":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def read_rank_state(tag_dir: str, cfg: Config, tp: int, rank: int, keys: Sequence[str],
                    subdir: str = "weights") -> Dict[str, torch.Tensor]:
    """{key: rank `rank`'s shard at tensor size `tp`} for `keys`, read slice by slice (tests and small tools)."""
    with CheckpointSource(tag_dir, subdir) as src:
        return {k: src.read_shard(k, cfg, tp, rank) for k in keys}


def write_shards(source, tag_dir: str, cfg: Config, tp: int, pp: int, blocks_per_stage: Sequence[int]) -> None:
    """Write `tag_dir/weights/tp{t:02d}_pp{p:02d}.safetensors` (fp32) for the layout tensor `tp` x pipeline `pp`
    from `source` (a CheckpointSource or interop's HFSource), one tensor slice at a time: a converter or
    re-sharder never holds more than one slice of the model."""
    from .tensor_files import SafetensorsWriter

    shapes = canonical_shapes(cfg, tp)
    tied = cfg.model.tie_embeddings and not cfg.model.value_head
    os.makedirs(os.path.join(tag_dir, "weights"), exist_ok=True)
    for t in range(tp):
        for p in range(pp):
            keys = [k for k in shapes if p in stages_of_key(k, blocks_per_stage, tied)]
            path = os.path.join(tag_dir, "weights", f"tp{t:02d}_pp{p:02d}.safetensors")
            with SafetensorsWriter(path, [(k, shapes[k], torch.float32) for k in keys]) as writer:
                for k in keys:
                    writer.write(k, source.read_shard(k, cfg, tp, t).float())
