"""Tensor files read slice by slice and written tensor by tensor, so no process ever holds a whole file.

safetensors (the format of https://github.com/huggingface/safetensors: an 8-byte little-endian header size N,
N bytes of JSON `{name: {dtype, shape, data_offsets: [begin, end]}, "__metadata__": {...}}`, then the data,
row-major, little-endian) is read with positional reads (`os.preadv`) of exactly the bytes of the rows or
columns asked for. Nothing is memory-mapped, so the reading process's resident memory grows by the slice only,
and `TensorFile.bytes_read` counts what was read (tests assert it). Legacy torch `.pt` shards (a pickled state
dict) are opened with `torch.load(mmap=True)`: a slice copies only its own part, and `bytes_read` counts the
slices copied.

`SafetensorsWriter` writes a file whose tensor names, shapes and dtypes are known up front (the header goes
first) one tensor at a time with `os.pwrite`, so a converter or a ZeRO-3 save holds one tensor at a time.
"""
from __future__ import annotations

import json
import os
import struct
import sys
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import torch

DTYPES: Dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
DTYPE_NAMES: Dict[torch.dtype, str] = {v: k for k, v in DTYPES.items()}
_MAX_IO = 1 << 30  # bytes per system call (Linux caps one read/write at ~2 GiB)


class TensorFileError(RuntimeError):
    """A tensor file is missing, truncated or malformed (the message names the file and the tensor)."""


def _numel(shape: Sequence[int]) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n


def _pread_into(fd: int, view: memoryview, offset: int, path: str) -> None:
    """Fill `view` (bytes) from file offset `offset`, looping over short reads."""
    done = 0
    while done < len(view):
        n = os.preadv(fd, [view[done:done + _MAX_IO]], offset + done)
        if n <= 0:
            raise TensorFileError(f"{path} is truncated: wanted {len(view)} bytes at offset {offset}")
        done += n


def _as_bytes(t: torch.Tensor) -> memoryview:
    """The raw little-endian bytes of `t` (CPU, contiguous), without a copy."""
    return memoryview(t.detach().reshape(-1).view(torch.uint8).numpy()).cast("B")


class TensorFile:
    """One tensor file opened for slice reads: `.names()`, `.shape(name)`, `.dtype(name)`, `.read(...)`.

    `read(name, dim=None, start=0, stop=None)` -> a new CPU tensor in the stored dtype: the whole tensor
    (dim None), rows `[start, stop)` of any tensor (dim 0), or columns `[start, stop)` of a 2-D tensor (dim 1).
    """

    def __init__(self, path: str):
        if sys.byteorder != "little":
            raise TensorFileError("tensor files are little-endian; this machine is not")
        if not os.path.isfile(path):
            raise TensorFileError(f"missing file: {path}")
        self.path = path
        self.bytes_read = 0
        self.tensors_read = 0
        self._fd: Optional[int] = None
        self._sd: Optional[Dict[str, torch.Tensor]] = None
        if path.endswith(".safetensors"):
            self._open_safetensors()
        else:
            self._open_torch()

    # ------------------------------------------------------------------------------------------- opening
    def _open_safetensors(self) -> None:
        self._fd = os.open(self.path, os.O_RDONLY)
        size = os.fstat(self._fd).st_size
        try:
            if size < 8:
                raise TensorFileError(f"{self.path} is not a safetensors file ({size} bytes)")
            (n,) = struct.unpack("<Q", os.pread(self._fd, 8, 0))
            if n > min(size - 8, 100 << 20):
                raise TensorFileError(f"{self.path} is not a safetensors file (header size {n})")
            header = json.loads(os.pread(self._fd, n, 8).decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError, struct.error) as exc:
            self.close()
            raise TensorFileError(f"{self.path} has a corrupt safetensors header: {exc}") from None
        except TensorFileError:
            self.close()
            raise
        self.metadata = header.pop("__metadata__", {}) or {}
        self._info: Dict[str, Tuple[torch.dtype, Tuple[int, ...], int, int]] = {}
        base = 8 + n
        for name, info in header.items():
            dtype = DTYPES.get(info.get("dtype"))
            if dtype is None:
                self.close()
                raise TensorFileError(f"{self.path}: tensor '{name}' has unsupported dtype {info.get('dtype')!r}")
            shape = tuple(int(d) for d in info["shape"])
            begin, end = (int(x) for x in info["data_offsets"])
            if end - begin != _numel(shape) * dtype.itemsize or base + end > size:
                self.close()
                raise TensorFileError(f"{self.path}: tensor '{name}' {shape} {info['dtype']} does not fit its "
                                      f"data offsets [{begin}, {end}) (file has {size} bytes; truncated?)")
            self._info[name] = (dtype, shape, base + begin, base + end)

    def _open_torch(self) -> None:
        try:
            sd = torch.load(self.path, map_location="cpu", weights_only=True, mmap=True)
        except Exception as exc:  # truncated / not a torch file
            raise TensorFileError(f"cannot read {self.path}: {type(exc).__name__}: {exc}") from None
        if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
            raise TensorFileError(f"{self.path} does not hold a state dict of tensors")
        self._sd = sd
        self.metadata = {}
        self._info = {k: (v.dtype, tuple(v.shape), 0, 0) for k, v in sd.items()}

    # ------------------------------------------------------------------------------------------- queries
    def names(self) -> List[str]:
        """Tensor names in the file (header order)."""
        return list(self._info)

    def __contains__(self, name: str) -> bool:
        return name in self._info

    def shape(self, name: str) -> Tuple[int, ...]:
        """Stored shape of `name`."""
        return self._entry(name)[1]

    def dtype(self, name: str) -> torch.dtype:
        """Stored dtype of `name`."""
        return self._entry(name)[0]

    def _entry(self, name: str):
        if name not in self._info:
            raise TensorFileError(f"{self.path} has no tensor '{name}'")
        return self._info[name]

    # ---------------------------------------------------------------------------------------------- read
    def read(self, name: str, dim: Optional[int] = None, start: int = 0, stop: Optional[int] = None) -> torch.Tensor:
        """The whole tensor `name` (dim None) or its rows (dim 0) / columns of a 2-D tensor (dim 1) [start, stop)."""
        dtype, shape, begin, _end = self._entry(name)
        if dim is None or not shape:
            return self._read_rows(name, dtype, shape, begin, 0, shape[0] if shape else 1, whole=True)
        if dim not in (0, 1) or (dim == 1 and len(shape) != 2):
            raise TensorFileError(f"{self.path}: cannot slice '{name}' {shape} along dim {dim}")
        stop = shape[dim] if stop is None else stop
        if not 0 <= start <= stop <= shape[dim]:
            raise TensorFileError(f"{self.path}: slice [{start}, {stop}) of '{name}' {shape} along dim {dim} "
                                  "is out of range")
        if dim == 0:
            return self._read_rows(name, dtype, shape, begin, start, stop)
        return self._read_cols(name, dtype, shape, begin, start, stop)

    def _read_rows(self, name, dtype, shape, begin, start, stop, whole=False) -> torch.Tensor:
        out_shape = tuple(shape) if whole else (stop - start,) + tuple(shape[1:])
        if self._sd is not None:
            t = self._sd[name]
            out = t.clone() if whole else t.narrow(0, start, stop - start).clone()
        else:
            row = _numel(shape[1:]) * dtype.itemsize
            raw = torch.empty(_numel(out_shape) * dtype.itemsize, dtype=torch.uint8)
            if raw.numel():
                _pread_into(self._fd, memoryview(raw.numpy()), begin + start * row, self.path)
            out = raw.view(dtype).reshape(out_shape)
        self.bytes_read += out.numel() * dtype.itemsize
        self.tensors_read += 1
        return out

    def _read_cols(self, name, dtype, shape, begin, start, stop) -> torch.Tensor:
        rows, cols = shape
        if start == 0 and stop == cols:
            return self._read_rows(name, dtype, shape, begin, 0, rows)
        if self._sd is not None:
            out = self._sd[name][:, start:stop].clone()
        else:
            width, item = stop - start, dtype.itemsize
            raw = torch.empty(rows * width * item, dtype=torch.uint8)
            buf = memoryview(raw.numpy())
            for r in range(rows):  # one exact read per row: only the wanted columns leave the disk
                _pread_into(self._fd, buf[r * width * item:(r + 1) * width * item],
                            begin + (r * cols + start) * item, self.path)
            out = raw.view(dtype).reshape(rows, width)
        self.bytes_read += out.numel() * dtype.itemsize
        self.tensors_read += 1
        return out

    def read_into(self, name: str, dim: int, start: int, stop: int, out: torch.Tensor) -> None:
        """Read rows (dim 0) or columns (dim 1, 2-D) [start, stop) of `name` straight into `out` (a CPU tensor of
        the slice's shape and the stored dtype; rows of `out` may be strided, elements within a row not): no
        intermediate copy, so loading a model needs no memory beyond the model."""
        dtype, shape, begin, _end = self._entry(name)
        want = (stop - start,) + tuple(shape[1:]) if dim == 0 else (shape[0], stop - start)
        if out.dtype != dtype or tuple(out.shape) != want or out.device.type != "cpu" or not 0 <= start <= stop <= shape[dim]:
            raise TensorFileError(f"{self.path}: cannot read '{name}' [{start}, {stop}) along dim {dim} into a "
                                  f"{tuple(out.shape)} {out.dtype} {out.device} tensor")
        if self._sd is not None:
            with torch.no_grad():
                out.copy_(self._sd[name].narrow(dim, start, stop - start))
        elif out.numel():
            item, row_elems = dtype.itemsize, _numel(shape[1:])
            if dim == 0 and out.is_contiguous():
                _pread_into(self._fd, _as_bytes(out), begin + start * row_elems * item, self.path)
            else:  # one contiguous run per row of `out` (columns, or rows into a column block of a larger tensor)
                if out.dim() != 2 or out.stride(1) != 1:
                    raise TensorFileError(f"{self.path}: '{name}' destination rows must be contiguous")
                raw = out.view(torch.uint8).numpy()
                for r in range(out.shape[0]):
                    first = r * shape[1] + start if dim == 1 else (start + r) * row_elems
                    _pread_into(self._fd, memoryview(raw[r]), begin + first * item, self.path)
        self.bytes_read += out.numel() * dtype.itemsize
        self.tensors_read += 1

    def read_all(self) -> Dict[str, torch.Tensor]:
        """Every tensor of the file (for small files and tests)."""
        return {k: self.read(k) for k in self.names()}

    def close(self) -> None:
        """Release the file descriptor (or the memory map of a .pt file)."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        self._sd = None

    def __enter__(self) -> "TensorFile":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class SafetensorsWriter:
    """A safetensors file written tensor by tensor: `specs` = [(name, shape, dtype)] fixes the header first.

    `write(name, tensor)` in any order (shape and dtype must match the spec); `close()` checks that every
    tensor was written and fsyncs. Used as a context manager, an exception leaves an incomplete file that
    `close` does not validate (callers write into a temporary directory that is renamed only when complete).
    """

    def __init__(self, path: str, specs: Iterable[Tuple[str, Sequence[int], torch.dtype]],
                 metadata: Optional[Dict[str, str]] = None):
        self.path = path
        header: Dict[str, dict] = {}
        if metadata:
            header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
        self._slots: Dict[str, Tuple[Tuple[int, ...], torch.dtype, int, int]] = {}
        offset = 0
        for name, shape, dtype in specs:
            if name in self._slots:
                raise ValueError(f"{path}: tensor '{name}' listed twice")
            if dtype not in DTYPE_NAMES:
                raise ValueError(f"{path}: tensor '{name}' has dtype {dtype}, which safetensors cannot store")
            shape = tuple(int(d) for d in shape)
            nbytes = _numel(shape) * dtype.itemsize
            header[name] = {"dtype": DTYPE_NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
            self._slots[name] = (shape, dtype, offset, nbytes)
            offset += nbytes
        raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
        raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned, as the reference writer does
        self._base = 8 + len(raw)
        self._size = self._base + offset
        self._written: set = set()
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.pwrite(self._fd, struct.pack("<Q", len(raw)) + raw, 0)
        os.ftruncate(self._fd, self._size)
        self.bytes_written = 0

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Store `tensor` (CPU or not; made contiguous) in the slot of `name`."""
        if name not in self._slots:
            raise ValueError(f"{self.path}: tensor '{name}' is not in the header")
        shape, dtype, offset, nbytes = self._slots[name]
        if tuple(tensor.shape) != shape or tensor.dtype != dtype:
            raise ValueError(f"{self.path}: tensor '{name}' is {tuple(tensor.shape)} {tensor.dtype}, the header "
                             f"says {shape} {dtype}")
        data = _as_bytes(tensor.detach().cpu().contiguous())
        done = 0
        while done < nbytes:
            done += os.pwrite(self._fd, data[done:done + _MAX_IO], self._base + offset + done)
        self._written.add(name)
        self.bytes_written += nbytes

    def close(self) -> None:
        """Check completeness, flush to disk and close."""
        if self._fd is None:
            return
        missing = [n for n in self._slots if n not in self._written]
        os.fsync(self._fd)
        os.close(self._fd)
        self._fd = None
        if missing:
            raise TensorFileError(f"{self.path}: tensors never written: {missing[:6]}")

    def abort(self) -> None:
        """Close without the completeness check (the caller discards the file)."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> "SafetensorsWriter":
        return self

    def __exit__(self, exc_type, *exc) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def save_tensors(path: str, tensors: Dict[str, torch.Tensor], metadata: Optional[Dict[str, str]] = None) -> None:
    """Write a dict of tensors as one safetensors file (in dict order)."""
    specs = [(k, tuple(v.shape), v.dtype) for k, v in tensors.items()]
    with SafetensorsWriter(path, specs, metadata) as w:
        for k, v in tensors.items():
            w.write(k, v)


def load_tensors(path: str) -> Dict[str, torch.Tensor]:
    """Every tensor of a safetensors or torch .pt file."""
    with TensorFile(path) as f:
        return f.read_all()
