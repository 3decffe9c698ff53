"""Preallocated key/value cache for incremental decoding, with explicit per-row lengths.

One buffer pair per layer, `[B, nkv/tp, max_len, hd]` (this rank's KV heads; grouped-query attention keeps
only the KV heads). Row b holds `lengths[b]` valid tokens at slots `0 .. lengths[b]-1`; the length is stored,
never inferred from the buffer contents. A forward over new tokens goes:

    pos = cache.begin(num_new, width)    # rows feed `width` slots; the first num_new[b] of row b are real
    logits = model(ids, pos, None, logit_index=..., cache=cache)   # each block attends via cache.layer(i)
    cache.commit()                       # lengths += num_new

New tokens of row b are written at slots `lengths[b] + i` with rotary position `lengths[b] + i` (positions
restart at 0 for every row, as in the training batches). Padding slots (i >= num_new[b]) are written too, but
they lie beyond the row's committed length and are overwritten by the row's next real token before any real
query can see them: query i of row b sees slots `j <= lengths[b] + i` only. So each row's logits equal an
unpadded forward of that row alone (ragged prompt batches are right-padded).
"""
from __future__ import annotations

from typing import List, Optional

import torch
import torch.nn.functional as F


class LayerCache:
    """The cache of one layer: `attend(q, k, v)` stores k, v and attends q over the row's cached prefix."""

    def __init__(self, owner: "KVCache", index: int):
        self.owner = owner
        self.index = index

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q [B, S, nq, hd], k, v [B, S, nkv, hd] of the new tokens (rotary applied) -> [B, S, nq, hd].

        Writes k, v at slots lengths[b] + i, then runs causal attention of the new queries over slots
        0 .. kv_len-1 of this layer's buffers (kv_len = the longest row after this step)."""
        c = self.owner
        step = c.step
        if step is None:
            raise RuntimeError("KVCache.attend called outside begin()/commit(); call cache.begin(...) first")
        kb, vb = c.keys[self.index], c.values[self.index]
        B, S, nq, hd = q.shape
        nkv = kb.shape[1]
        # One index_copy_ per buffer: row (b, h, slot) of the [B*nkv*max_len, hd] view gets the new (b, s, h).
        flat = step.flat_rows(nkv, kb.shape[2])
        kb.view(-1, hd).index_copy_(0, flat, k.transpose(1, 2).reshape(-1, hd).to(kb.dtype))
        vb.view(-1, hd).index_copy_(0, flat, v.transpose(1, 2).reshape(-1, hd).to(vb.dtype))
        rep = nq // nkv
        # Grouped-query attention without copying the cache: the `rep` query heads of each KV head become
        # rep*S query rows of that head ([B, nkv, rep*S, hd]); the mask is repeated to match.
        qg = q.reshape(B, S, nkv, rep, hd).permute(0, 2, 3, 1, 4).reshape(B, nkv, rep * S, hd)
        out = F.scaled_dot_product_attention(qg, kb[:, :, :step.kv_len], vb[:, :, :step.kv_len],
                                             attn_mask=step.mask(rep))
        return out.reshape(B, nkv, rep, S, hd).permute(0, 3, 1, 2, 4).reshape(B, S, nq, hd)


class _Step:
    """What one begin() prepared for every layer: write slots, the attended length and the causal mask."""

    def __init__(self, lengths: torch.Tensor, num_new: torch.Tensor, width: int):
        B = lengths.shape[0]
        self.num_new = num_new
        self.slots = lengths[:, None] + torch.arange(width, device=lengths.device)[None, :]  # [B, S]
        self.kv_len = int((lengths + width).max()) if B else 0
        keys = torch.arange(self.kv_len, device=lengths.device)
        self._mask = keys[None, None, :] <= self.slots[:, :, None]  # [B, S, kv_len]: key j <= query slot
        self._by_rep = {}
        self._flat = {}

    def flat_rows(self, nkv: int, max_len: int) -> torch.Tensor:
        """Long[B*nkv*S]: the row of a [B, nkv, max_len, hd] buffer viewed as [B*nkv*max_len, hd] that token
        (b, s) of kv head h goes to, in (b, h, s) order."""
        key = (nkv, max_len)
        if key not in self._flat:
            B, S = self.slots.shape
            base = (torch.arange(B, device=self.slots.device)[:, None] * nkv
                    + torch.arange(nkv, device=self.slots.device)[None, :]) * max_len  # [B, nkv]
            self._flat[key] = (base[:, :, None] + self.slots[:, None, :]).reshape(-1)
        return self._flat[key]

    def mask(self, rep: int) -> torch.Tensor:
        """Boolean [B, 1, rep*S, kv_len] (the [B, S, kv_len] mask repeated for `rep` query heads per KV head)."""
        if rep not in self._by_rep:
            B, S, L = self._mask.shape
            self._by_rep[rep] = self._mask[:, None, None].expand(B, 1, rep, S, L).reshape(B, 1, rep * S, L)
        return self._by_rep[rep]


class KVCache:
    """Per-layer preallocated K/V buffers `[B, nkv_local, max_len, hd]` and explicit lengths `[B]` (long).

    Build with `KVCache.for_model(cfg, ps, batch, max_len, dtype, device)`. Use begin()/commit() around
    every cached forward (see the module docstring); `select(rows)` keeps or repeats rows (finished rows
    dropped, a prefilled prompt repeated for its n samples).
    """

    def __init__(self, num_layers: int, batch: int, num_kv_heads: int, head_dim: int, max_len: int,
                 dtype: torch.dtype = torch.float32, device: Optional[torch.device] = None):
        shape = (batch, num_kv_heads, max_len, head_dim)
        self.keys: List[torch.Tensor] = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.values: List[torch.Tensor] = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.lengths = torch.zeros(batch, dtype=torch.long, device=device)
        self.max_len = max_len
        self.step: Optional[_Step] = None
        self._layers = [LayerCache(self, i) for i in range(num_layers)]

    @classmethod
    def for_model(cls, cfg, ps, batch: int, max_len: int, dtype: torch.dtype,
                  device: Optional[torch.device] = None) -> "KVCache":
        """A cache for the model of `cfg` on this tensor-parallel rank (nkv/tp KV heads per layer)."""
        d = cfg.derived
        return cls(cfg.model.num_layers, batch, d.num_kv_heads // ps.tp_size, d.head_dim, max_len, dtype, device)

    @property
    def batch(self) -> int:
        """Number of rows."""
        return self.lengths.shape[0]

    def layer(self, index: int) -> LayerCache:
        """The cache of block `index` (what GPTModel hands to that block's attention)."""
        return self._layers[index]

    def begin(self, num_new: torch.Tensor, width: int) -> torch.Tensor:
        """Prepare a forward of `width` new slots per row, the first `num_new[b]` (Long[B], >= 1) real.

        Returns position_ids [B, width] (lengths[b] + i). Raises if a row would pass `max_len`."""
        if self.step is not None:
            raise RuntimeError("KVCache.begin called twice without commit()")
        end = self.lengths + width
        if self.batch and int(end.max()) > self.max_len:
            raise ValueError(f"KV cache overflow: a row would reach {int(end.max())} slots but the cache holds "
                             f"{self.max_len}; build it with a larger max_len")
        self.step = _Step(self.lengths, num_new.to(self.lengths.device), width)
        return self.step.slots

    def commit(self) -> None:
        """Make the real tokens of the last begin() part of each row: lengths += num_new."""
        if self.step is None:
            raise RuntimeError("KVCache.commit called without begin()")
        self.lengths = self.lengths + self.step.num_new
        self.step = None

    def select(self, rows: torch.Tensor) -> None:
        """Keep rows `rows` (Long[B'], in that order; repeats allowed) of every buffer and of `lengths`."""
        if self.step is not None:
            raise RuntimeError("KVCache.select between begin() and commit()")
        rows = rows.to(self.lengths.device)
        self.keys = [k.index_select(0, rows) for k in self.keys]
        self.values = [v.index_select(0, rows) for v in self.values]
        self.lengths = self.lengths.index_select(0, rows)
