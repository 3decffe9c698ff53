"""Core attention kernels, chosen in one place: `eager` (the plain-torch reference twin), `sdpa`
(torch scaled_dot_product_attention over the whole row with a block-diagonal causal mask), `segments`
(padding-free: one causal SDPA call per packed sequence, so a row costs the sum of its segments' squares and
padding costs nothing) and `flash` (flash-attn varlen, CUDA fp16/bf16 only); `auto` picks flash when usable,
else segments.

All take q [B, S, nq, hd], k, v [B, S, nkv, hd] (nq a multiple of nkv: grouped-query attention, Ainslie et
al. 2023, arXiv:2305.13245; query head i reads kv head i // (nq/nkv)) and segment_ids [B, S] (1..k per packed
sequence, 0 padding), and return [B, S, nq, hd] in q's dtype. Query i sees key j iff seg[i] == seg[j] != 0
and j <= i. Padding rows give exact zeros (never NaN). flash-attn is imported lazily, never at module import.
"""
from __future__ import annotations

import importlib.util
import math
from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F

from .varlen import varlen_attention

BACKENDS = ("auto", "flash", "segments", "sdpa", "eager")


def flash_attn_installed() -> bool:
    """Whether the flash_attn package can be imported (checked without importing it)."""
    return importlib.util.find_spec("flash_attn") is not None


def flash_usable(q: torch.Tensor) -> bool:
    """flash-attn runs only when installed, on CUDA tensors, in fp16 or bf16."""
    return q.is_cuda and q.dtype in (torch.float16, torch.bfloat16) and flash_attn_installed()


def resolve_backend(name: str, q: torch.Tensor) -> str:
    """The concrete backend for `name` given the tensors; raises if `flash` is requested but not usable."""
    if name not in BACKENDS:
        raise ValueError(f"attention backend {name!r} is not one of {', '.join(BACKENDS)}")
    if name == "auto":
        return "flash" if flash_usable(q) else "segments"
    if name == "flash" and not flash_usable(q):
        why = ("flash_attn is not installed" if not flash_attn_installed() else
               f"tensors are on {q.device} in {q.dtype}; flash-attn needs CUDA fp16/bf16")
        raise RuntimeError(f"model.attention=flash but {why}; set model.attention to auto or sdpa")
    return name


def packed_causal_mask(segment_ids: torch.Tensor) -> torch.Tensor:
    """Boolean [B, S, S] mask, True where query i may attend key j: same nonzero segment and j <= i.

    Padding queries (segment 0) are additionally allowed their own position so softmax has a finite row; their
    outputs are zeroed afterwards by the callers.
    """
    S = segment_ids.shape[1]
    causal = torch.ones(S, S, dtype=torch.bool, device=segment_ids.device).tril()
    same = segment_ids[:, :, None] == segment_ids[:, None, :]
    real = (segment_ids != 0)[:, :, None]
    mask = same & real & causal
    eye = torch.eye(S, dtype=torch.bool, device=segment_ids.device)
    return mask | (eye & ~real)


def repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    """[B, S, nkv, hd] -> [B, S, nkv * n_rep, hd], each kv head repeated n_rep times consecutively (GQA)."""
    return x if n_rep == 1 else x.repeat_interleave(n_rep, dim=2)


def _zero_padding(out: torch.Tensor, segment_ids: torch.Tensor) -> torch.Tensor:
    """out [B, S, nq, hd] with padding rows (segment 0) set to 0."""
    return out * (segment_ids != 0)[:, :, None, None].to(out.dtype)


def eager_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, segment_ids: torch.Tensor,
                    scale: Optional[float] = None) -> torch.Tensor:
    """Reference attention: fp32 matmul, masked softmax, matmul. Shapes as in the module docstring."""
    n_rep = q.shape[2] // k.shape[2]
    scale = scale if scale is not None else 1.0 / math.sqrt(q.shape[-1])
    qh = q.float().transpose(1, 2)  # [B, nq, S, hd]
    kh = repeat_kv(k, n_rep).float().transpose(1, 2)
    vh = repeat_kv(v, n_rep).float().transpose(1, 2)
    scores = torch.matmul(qh, kh.transpose(-1, -2)) * scale  # [B, nq, S, S]
    scores = scores.masked_fill(~packed_causal_mask(segment_ids)[:, None], float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    out = torch.matmul(probs, vh).transpose(1, 2).to(q.dtype)  # [B, S, nq, hd]
    return _zero_padding(out, segment_ids)


def sdpa_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, segment_ids: torch.Tensor,
                   scale: Optional[float] = None) -> torch.Tensor:
    """torch SDPA with the packed block-diagonal causal boolean mask. Shapes as in the module docstring."""
    n_rep = q.shape[2] // k.shape[2]
    mask = packed_causal_mask(segment_ids)[:, None]  # [B, 1, S, S]
    out = F.scaled_dot_product_attention(q.transpose(1, 2), repeat_kv(k, n_rep).transpose(1, 2),
                                         repeat_kv(v, n_rep).transpose(1, 2), attn_mask=mask, scale=scale)
    return _zero_padding(out.transpose(1, 2), segment_ids)


def segment_runs(segment_ids: torch.Tensor) -> Tuple[List[int], List[bool]]:
    """Runs of equal segment id over the flattened rows: (lengths, is_real) as python lists.

    segment_ids [B, S] -> runs covering all B*S positions in order; a run never crosses a row boundary, and
    is_real is False for padding runs (segment 0). One host sync (the lists drive per-segment kernel calls).
    """
    B, S = segment_ids.shape
    flat = segment_ids.reshape(-1)
    start = torch.ones_like(flat, dtype=torch.bool)
    start[1:] = flat[1:] != flat[:-1]
    start[::S] = True
    first = start.nonzero().squeeze(1)
    lengths = torch.diff(first, append=first.new_tensor([flat.numel()]))
    return lengths.tolist(), (flat[first] != 0).tolist()


def segment_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, segment_ids: torch.Tensor,
                      scale: Optional[float] = None) -> torch.Tensor:
    """Padding-free attention for packed rows: causal SDPA on each sequence alone. Shapes as in the module
    docstring. The flattened tokens are split into runs (torch.split, whose backward is one concatenation)
    and each real run attends causally to itself (no mask tensor: SDPA's is_causal path, which also skips the
    blocks above the diagonal); padding runs give zeros."""
    B, S, nq, hd = q.shape
    nkv = k.shape[2]
    lengths, real = segment_runs(segment_ids)
    qs = q.reshape(B * S, nq, hd).split(lengths)
    ks = k.reshape(B * S, nkv, hd).split(lengths)
    vs = v.reshape(B * S, nkv, v.shape[-1]).split(lengths)
    outs = []
    for n, is_real, qi, ki, vi in zip(lengths, real, qs, ks, vs):
        if not is_real:
            outs.append(qi.new_zeros(n, nq, vi.shape[-1]))
            continue
        # 4-D [1, heads, n, hd]: with 3-D inputs torch picks its unfused math backend on CPU
        o = F.scaled_dot_product_attention(qi.transpose(0, 1)[None], ki.transpose(0, 1)[None],
                                           vi.transpose(0, 1)[None], is_causal=True, scale=scale,
                                           enable_gqa=nq != nkv)  # [1, nq, n, hd]
        outs.append(o.squeeze(0).transpose(0, 1))  # squeeze, not o[0]: a select's backward zero-fills
    return torch.cat(outs).view(B, S, nq, outs[0].shape[-1])


def flash_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, segment_ids: torch.Tensor,
                    scale: Optional[float] = None) -> torch.Tensor:
    """flash_attn_varlen_func over the real tokens (cu_seqlens from segment_ids); GQA handled by the kernel."""
    from flash_attn import flash_attn_varlen_func  # lazy: optional dependency, CUDA only

    scale = scale if scale is not None else 1.0 / math.sqrt(q.shape[-1])
    return varlen_attention(q, k, v, segment_ids, scale, flash_attn_varlen_func)


def core_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, segment_ids: torch.Tensor,
                   backend: str = "auto", scale: Optional[float] = None) -> torch.Tensor:
    """Dispatch to the backend named by `backend` (cfg.model.attention). Returns [B, S, nq, hd]."""
    name = resolve_backend(backend, q)
    kernels = {"flash": flash_attention, "segments": segment_attention, "sdpa": sdpa_attention,
               "eager": eager_attention}
    return kernels[name](q, k, v, segment_ids, scale)
