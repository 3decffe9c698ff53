"""Where a tensor rank's shard lies in the full canonical tensor, and where a saved shard holds it.

Coordinates are those of the full (tensor=1) canonical tensor along its split dimension. Every canonical key
has a `Split` (docs/ARCHITECTURE.md, `weights_io` module docstring):

    vocab       rows, one block of pad_vocab(vocab, tp) rows (rows past the real vocabulary are padding)
    qkv         rows, blocks [nq*hd | nkv*hd | nkv*hd]   (rank r holds [q_r | k_r | v_r])
    fc1         rows, blocks [F | F] (swiglu gate | up), or one block [F] (gelu)
    cols        columns of attention.dense / mlp.fc2, one block
    replicated  every rank holds the whole tensor

Each block is split evenly over the tensor ranks and a rank's shard is the concatenation of its piece of
every block. `rank_ranges` gives the full-coordinate ranges of one rank's shard (in shard order); `locate`
maps a full-coordinate range onto the shards of another tensor size: [(saved rank, local start, local stop)],
with `None` for padding rows that the saved layout does not hold (they read as zeros). These two functions
are all a rank needs to read its shard out of a checkpoint saved at any tensor size, slice by slice.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

from megatron.config import Config
from megatron.config.derive import pad_vocab

from .weights_io import VOCAB_KEYS, _BLOCK_RE, _ffn, _kv_heads

Range = Tuple[int, int]
Piece = Tuple[Optional[int], int, int]  # (saved tensor rank or None for zero rows, local start, local stop)


@dataclass(frozen=True)
class Split:
    """How a canonical tensor is laid out over `tp` ranks: `dim` (None: replicated) and the full `blocks`.

    `valid`: for vocabulary tensors, how many leading rows hold data in a checkpoint of this layout (rows past it
    are padding, read as zeros); None otherwise.
    """
    dim: Optional[int]
    blocks: Tuple[int, ...] = ()
    tp: int = 1
    valid: Optional[int] = None


def split_of(key: str, cfg: Config, tp: int) -> Split:
    """The Split of canonical `key` for the model of `cfg` at tensor size `tp`."""
    m = cfg.model
    if key in VOCAB_KEYS:
        padded = pad_vocab(m.vocab_size, tp)
        # What a tensor=1 merge keeps (weights_io.merge_tp_shards cuts to pad_vocab(vocab, 1)).
        return Split(0, (padded,), tp, valid=min(padded, pad_vocab(m.vocab_size, 1)))
    match = _BLOCK_RE.match(key)
    sub = match.group(2) if match else key
    hd = m.hidden_size // m.num_attention_heads
    if sub.startswith("attention.qkv."):
        return Split(0, (m.num_attention_heads * hd, _kv_heads(cfg) * hd, _kv_heads(cfg) * hd), tp)
    if sub.startswith("mlp.fc1."):
        ffn = _ffn(cfg)
        return Split(0, (ffn, ffn) if m.activation == "swiglu" else (ffn,), tp)
    if sub == "attention.dense.weight":
        return Split(1, (m.num_attention_heads * hd,), tp)
    if sub == "mlp.fc2.weight":
        return Split(1, (_ffn(cfg),), tp)
    return Split(None)


def _per_rank(block: int, tp: int) -> int:
    if block % tp:
        raise ValueError(f"a block of {block} rows/columns cannot be split over tensor size {tp}")
    return block // tp


def rank_ranges(split: Split, rank: int) -> List[Range]:
    """Full-coordinate ranges of tensor rank `rank`'s shard along `split.dim`, in the shard's own order."""
    if split.dim is None:
        raise ValueError("rank_ranges: a replicated tensor has no split")
    out, off = [], 0
    for block in split.blocks:
        per = _per_rank(block, split.tp)
        out.append((off + rank * per, off + (rank + 1) * per))
        off += block
    return out


def locate(split: Split, start: int, stop: int) -> List[Piece]:
    """Pieces of the saved shards (layout `split`) covering full-coordinate rows/columns [start, stop).

    Returns [(saved rank, local start, local stop)] in order; (None, 0, n) stands for n padding rows the saved
    layout does not hold. Ranges may cross saved-rank boundaries but not block boundaries of `split`, except
    past the end of the last block (vocabulary padding).
    """
    pieces: List[Piece] = []
    g = start
    if split.valid is not None and stop > split.valid:  # vocabulary padding rows this checkpoint lacks
        tail = stop - max(start, split.valid)
        stop = max(start, split.valid)
    else:
        tail = 0
    off, local_base = 0, 0
    for block in split.blocks:
        per = _per_rank(block, split.tp)
        end_block = off + block
        while g < stop and g < end_block:  # g >= off: blocks are visited in order from 0
            s = (g - off) // per
            end = min(stop, off + (s + 1) * per)
            local = local_base + (g - off - s * per)
            pieces.append((s, local, local + end - g))
            g = end
        off, local_base = end_block, local_base + per
    if g < stop:
        raise ValueError(f"locate: range [{start}, {stop}) runs past the {off} rows of the saved layout")
    if tail:
        pieces.append((None, 0, tail))
    return pieces


def shard_pieces(key: str, target_cfg: Config, tp: int, rank: int, saved_cfg: Config,
                 saved_tp: int) -> Tuple[Optional[int], List[Piece]]:
    """(dim, pieces) that assemble rank `rank`'s shard of `key` at tensor size `tp` from shards saved at
    `saved_tp`; dim None means the tensor is replicated (read it whole from saved rank 0)."""
    target = split_of(key, target_cfg, tp)
    if target.dim is None:
        return None, [(0, 0, -1)]
    saved = split_of(key, saved_cfg, saved_tp)
    pieces: List[Piece] = []
    for a, b in rank_ranges(target, rank):
        pieces.extend(locate(saved, a, b))
    return target.dim, _merge_adjacent(pieces)


def _merge_adjacent(pieces: Sequence[Piece]) -> List[Piece]:
    """Join consecutive pieces of the same saved rank that are contiguous (fewer, larger reads)."""
    out: List[Piece] = []
    for p in pieces:
        if out and out[-1][0] == p[0] and out[-1][2] == p[1] and p[0] is not None:
            out[-1] = (p[0], out[-1][1], p[2])
        else:
            out.append(p)
    return out
