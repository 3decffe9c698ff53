"""Rollouts -> training experience: completions packed into today's micro-batch contract plus per-token fields.

One rank's rollouts of a step are N completions (prompt ids + generated ids, the generator's log-prob of each
generated token, a reward). Two layouts of their tokens are used:

    grid   [N, T]   completion k's generated token j at [k, j] (T = the longest completion; mask 0 beyond its
                    length): where advantages, KL penalties and returns are computed (advantages.py accepts any
                    layout whose flattened order runs forward in time per completion)
    batch  [B, S]   the packed, padding-free micro-batches of `megatron.data.collate` (sequence = prompt +
                    completion, loss_mask on the positions that predict generated tokens): what the models run on

`TokenMap` moves per-token values between the two (`to_batch`, `to_grid`): generated token j of completion k is
predicted at position prompt_len - 1 + j of its sequence, the j-th scored position of that segment.

Micro-batches: the N completions (in prompt order, a prompt's samples together) are dealt out to
`rollout.minibatches` M minibatches (one optimizer step each) by their index: minibatch m holds completions
m, m + M, m + 2M, ... Each rank holds a contiguous slice of the step's completions whose length is a multiple of M
(the config checks that global_batch_size splits over the ranks), so global minibatch m is the same set of
completions whatever the data-parallel size: every layout takes the same optimizer steps. A minibatch is cut into
micro-batches of `train.micro_batch_size` completions (`derived.grad_accum` of them), packed into rows of
`model.max_seq_len`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch

from megatron.data.collate import collate
from megatron.data.dataset import Example, SequenceData


@dataclass
class Rollouts:
    """One rank's completions of a step, in order (prompt by prompt, its samples together).

    prompt_ids / completion_ids: token ids per completion (completion ids include a final EOS/stop token);
    behaviour_logps: the generator's log-prob of each completion token (nats); group_ids Long[N]: the prompt's
    stream position (completions of one prompt share it); rewards Float64[N]: total reward after shaping;
    keep Bool[N]: False for completions dropped from training (DAPO dynamic sampling).
    """
    prompt_ids: List[List[int]]
    completion_ids: List[List[int]]
    behaviour_logps: List[List[float]]
    group_ids: torch.Tensor
    rewards: torch.Tensor
    keep: Optional[torch.Tensor] = None

    def __len__(self) -> int:
        return len(self.completion_ids)

    @property
    def lengths(self) -> torch.Tensor:
        """Long[N]: generated tokens per completion."""
        return torch.tensor([len(c) for c in self.completion_ids], dtype=torch.long)


def grid_mask(rollouts: Rollouts) -> torch.Tensor:
    """Float32[N, T]: 1 at the generated tokens of completions that train (keep), else 0."""
    lengths = rollouts.lengths
    T = max(int(lengths.max()) if len(rollouts) else 0, 1)
    mask = (torch.arange(T)[None, :] < lengths[:, None]).float()
    if rollouts.keep is not None:
        mask = mask * rollouts.keep.float()[:, None]
    return mask


def to_grid(values: Sequence[Sequence[float]], T: int, dtype=torch.float32) -> torch.Tensor:
    """Per-completion lists of per-token values -> Float[N, T] (0 beyond each list's length)."""
    out = torch.zeros(len(values), T, dtype=dtype)
    for k, v in enumerate(values):
        if len(v):
            out[k, :len(v)] = torch.as_tensor(v, dtype=dtype)
    return out


@dataclass
class TokenMap:
    """Where the scored positions of one micro-batch live in the grid: flat [B*S] index, completion k, token j
    (Long[T_mb] each, in ascending flat order)."""
    flat: torch.Tensor
    k: torch.Tensor
    j: torch.Tensor
    shape: tuple

    @classmethod
    def of(cls, batch: Dict[str, torch.Tensor]) -> "TokenMap":
        """From a collated rollout micro-batch (its `dataset_seq_index` holds each sequence's completion k)."""
        mask = batch["loss_mask"].reshape(-1)
        flat = (mask != 0).nonzero().squeeze(1)
        local = batch["seq_id"].reshape(-1)[flat]
        k = batch["dataset_seq_index"][local]
        # scored positions of a sequence are contiguous and in time order: j counts them from its first one
        first = torch.full((int(local.max()) + 1 if local.numel() else 0,), -1, dtype=torch.long)
        if local.numel():
            first = first.scatter_reduce(0, local, flat, "amin", include_self=False)
        j = flat - first[local] if local.numel() else flat
        return cls(flat=flat, k=k, j=j, shape=tuple(batch["loss_mask"].shape))

    def to_batch(self, grid: torch.Tensor) -> torch.Tensor:
        """Float[N, T] grid -> Float[B, S] of this micro-batch (0 at unscored positions)."""
        out = torch.zeros(self.shape[0] * self.shape[1], dtype=grid.dtype, device=grid.device)
        out[self.flat.to(grid.device)] = grid[self.k.to(grid.device), self.j.to(grid.device)]
        return out.view(self.shape)

    def to_grid(self, values: torch.Tensor, grid: torch.Tensor) -> None:
        """Write this micro-batch's scored values Float[B, S] into `grid` Float[N, T] (in place)."""
        grid[self.k, self.j] = values.detach().reshape(-1)[self.flat.to(values.device)].to(grid.dtype).cpu()


def pack_rollouts(rollouts: Rollouts, minibatches: int, micro_batch_size: int, max_seq_len: int,
                  width_multiple: int = 1) -> List[List[Dict[str, torch.Tensor]]]:
    """[minibatch][micro-batch] collated micro-batches of the rollouts (module docstring).

    Each micro-batch is the micro-batch contract (input_ids, labels, loss_mask, position_ids, segment_ids, seq_id,
    seq_last_pos, dataset_seq_index = the completion index k) plus its `TokenMap` under '_map'. Completions not
    kept (dynamic sampling) stay in their micro-batch with loss_mask 0 (their tokens and sequences count nowhere).
    width_multiple: rows are padded to a multiple of it (the tensor size under sequence parallelism).
    """
    n = len(rollouts)
    if n % minibatches:
        raise ValueError(f"pack_rollouts: {n} completions do not split into {minibatches} minibatches")
    per_mini = n // minibatches
    if per_mini % micro_batch_size:
        raise ValueError(f"pack_rollouts: {per_mini} completions per minibatch do not split into micro-batches of "
                         f"{micro_batch_size}")
    keep = rollouts.keep
    out: List[List[Dict[str, torch.Tensor]]] = []
    for m in range(minibatches):
        members = list(range(m, n, minibatches))  # dealt by index: the same global minibatches at any dp size
        micro = []
        for start in range(0, per_mini, micro_batch_size):
            examples = []
            chunk = members[start:start + micro_batch_size]
            for k in chunk:
                p, c = rollouts.prompt_ids[k], rollouts.completion_ids[k]
                ids = np.asarray(list(p) + list(c), dtype=np.int64)
                if len(ids) > max_seq_len:
                    raise ValueError(f"completion {k}: prompt + completion = {len(ids)} tokens exceed "
                                     f"model.max_seq_len={max_seq_len}")
                examples.append(Example(index=k, kind="sft",
                                        sequences=[SequenceData(ids=ids, prompt_len=len(p), dataset_index=k)]))
            batch = collate(examples, pack=True, max_seq_len=max_seq_len, width_multiple=width_multiple)
            if keep is not None and not bool(keep[chunk].all()):
                dropped = ~keep[batch["dataset_seq_index"]]
                seq = batch["seq_id"]
                off = dropped[seq.clamp(min=0)] & (seq >= 0)
                batch["loss_mask"] = batch["loss_mask"].masked_fill(off, 0.0)
            batch["_map"] = TokenMap.of(batch)
            micro.append(batch)
        out.append(micro)
    return out


def rollout_units(batch: Dict[str, torch.Tensor]) -> Dict[str, float]:
    """The aggregation units of one rollout micro-batch: scored tokens and the sequences that have any (a
    dropped completion, loss_mask 0, is no sequence of the loss)."""
    mask = batch["loss_mask"]
    seq = batch["seq_id"]
    scored = seq[(mask != 0) & (seq >= 0)]
    n = int(torch.unique(scored).numel())
    return {"tokens": float(mask.sum()), "sequences": float(n), "examples": float(n)}


def strip_private(batch: Dict[str, object]) -> Dict[str, object]:
    """The micro-batch without the loop's private keys ('_map')."""
    return {k: v for k, v in batch.items() if not k.startswith("_")}
