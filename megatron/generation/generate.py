"""generate(): prompts -> n completions each, on the training model's tensor-parallel shards.

Batches of up to `batch_size` sequences (prompt x sample rows, in order) are decoded together:

    prefill  each distinct prompt of the batch once (right-padded ragged batch, positions from 0), then its
             cache rows are repeated for the prompt's samples
    decode   one token per row per step: sample (megatron.generation.sampling) -> check stops -> drop
             finished rows from the batch and the cache -> forward the new tokens through the cache

A row's randomness depends on (params.seed, its prompt index, its sample index, the step) only
(`noise.sample_uniforms`), so batch size, batch mates, data-parallel split and tensor-parallel size do not
change the samples. Returned log-probs are the raw model's (temperature 1, padded vocabulary masked), the
values the training forward gives the same tokens. Data-parallel ranks call this independently with their
own prompts (ZeRO-3 included: see `replica.generation_model`); tensor-parallel peers call it with the same
prompts and produce the same completions.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, List, Optional, Sequence

import torch

from megatron.config import ConfigError

from .kv_cache import KVCache
from .noise import sample_uniforms
from .replica import generation_model
from .sampling import SamplingParams, sample_next

LENGTH, STOP = "length", "stop"


class PromptTooLong(ValueError):
    """A prompt leaves no room for a generated token within model.max_seq_len."""


@dataclass
class Completion:
    """One sample: generated ids (a final EOS / stop token included), the model's log-prob of each (nats,
    raw distribution), why it ended (`stop`: EOS, a stop token or a stop string; `length`: max_new_tokens or
    model.max_seq_len), and its text when a detokenizer was given (stop token and stop string excluded)."""
    token_ids: List[int] = field(default_factory=list)
    logprobs: List[float] = field(default_factory=list)
    finish_reason: str = LENGTH
    text: Optional[str] = None


def _check_layout(cfg) -> None:
    if cfg.parallel.pipeline > 1:
        raise ConfigError(f"parallel.pipeline={cfg.parallel.pipeline}: generation runs unpipelined; set "
                          "parallel.pipeline=1 (checkpoints of any pipeline layout load re-sharded). Tensor "
                          "parallelism, data-parallel ranks and ZeRO-3 all work")
    if cfg.model.value_head:
        raise ConfigError("model.value_head: a reward/value model has no LM head and cannot generate")


class _StopStrings:
    """Finds stop strings in a growing completion by decoding only its tail."""

    def __init__(self, stop: Sequence[str], detokenize: Optional[Callable[[List[int]], str]]):
        if stop and detokenize is None:
            raise ValueError("stop strings need a detokenizer: pass generate(..., detokenize=tokenizer.decode)")
        self.stop = list(stop)
        self.detokenize = detokenize
        # Every token decodes to >= 1 character (or a piece of one): this many tail tokens cover any stop string.
        self.window = max((len(s) for s in self.stop), default=0) + 8

    def hit(self, ids: List[int]) -> bool:
        """Whether the completion `ids` now contains a stop string."""
        tail = self.detokenize(ids[-self.window:])
        return any(s in tail for s in self.stop)

    def cut(self, text: str) -> str:
        """`text` up to the first stop string."""
        ends = [text.find(s) for s in self.stop if s in text]
        return text[:min(ends)] if ends else text


def _prefill(model, cfg, ps, prompts: List[List[int]], cache: KVCache, device) -> torch.Tensor:
    """Run the right-padded prompts through the model into `cache`; logits shard [U, Vl] at each last token."""
    lens = torch.tensor([len(p) for p in prompts], dtype=torch.long)
    width = int(lens.max())
    ids = torch.zeros(len(prompts), width, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, :len(p)] = torch.tensor(p, dtype=torch.long)
    pos = cache.begin(lens.to(device), width)
    last = torch.arange(len(prompts)) * width + lens - 1
    logits = model(ids.to(device), pos, None, logit_index=last.to(device), cache=cache)
    cache.commit()
    return logits


def _decode_batch(model, cfg, ps, prompts: Sequence[Sequence[int]], rows: List[tuple], params: SamplingParams,
                  stop_ids: torch.Tensor, stops: _StopStrings, device, dtype,
                  on_done: Callable[[int, int, Completion], None]) -> None:
    """Generate the completions of `rows` [(prompt position, global prompt index, sample index)]."""
    max_seq = cfg.model.max_seq_len
    uniq = list(dict.fromkeys(r[0] for r in rows))
    where = {p: i for i, p in enumerate(uniq)}
    limit = torch.tensor([min(params.max_new_tokens, max_seq - len(prompts[r[0]])) for r in rows])
    cache_len = max(len(prompts[r[0]]) + int(limit[i]) for i, r in enumerate(rows))
    cache = KVCache.for_model(cfg, ps, len(uniq), cache_len, dtype, device)
    logits = _prefill(model, cfg, ps, [list(prompts[p]) for p in uniq], cache, device)
    expand = torch.tensor([where[r[0]] for r in rows], dtype=torch.long)
    if len(uniq) != len(rows) or not torch.equal(expand, torch.arange(len(rows))):
        cache.select(expand.to(device))
        logits = logits.index_select(0, expand.to(device))

    B = len(rows)
    prompt_index = torch.tensor([r[1] for r in rows], dtype=torch.long)
    sample_index = torch.tensor([r[2] for r in rows], dtype=torch.long)
    out = [Completion() for _ in rows]
    active = torch.arange(B)  # batch row -> index into `rows`
    for step in range(int(limit.max())):
        u = (sample_uniforms(params.seed, prompt_index[active], sample_index[active], torch.tensor(step)).to(
            logits.device) if params.temperature > 0.0 else None)  # greedy draws nothing
        tokens, logps = sample_next(logits, params, u, ps, cfg.model.vocab_size)
        tok_list, lp_list = tokens.tolist(), logps.tolist()
        finished = torch.zeros(len(tok_list), dtype=torch.bool)
        stopped = torch.isin(tokens.cpu(), stop_ids) if stop_ids.numel() else finished
        for j, row in enumerate(active.tolist()):
            c = out[row]
            c.token_ids.append(tok_list[j])
            c.logprobs.append(lp_list[j])
            if bool(stopped[j]) or (stops.stop and stops.hit(c.token_ids)):
                c.finish_reason = STOP
                finished[j] = True
            elif len(c.token_ids) >= int(limit[row]):
                finished[j] = True
        for j in finished.nonzero().flatten().tolist():
            row = int(active[j])
            on_done(rows[row][0], rows[row][2], out[row])
        if bool(finished.all()):
            return
        if bool(finished.any()):
            keep = (~finished).nonzero().flatten()
            cache.select(keep.to(device))
            active, tokens = active[keep], tokens.index_select(0, keep.to(tokens.device))
        n = active.numel()
        pos = cache.begin(torch.ones(n, dtype=torch.long, device=device), 1)
        logits = model(tokens[:, None].to(device), pos, None, logit_index=torch.arange(n, device=device),
                       cache=cache)
        cache.commit()


@torch.no_grad()
def generate(model, cfg, ps, prompts: Sequence[Sequence[int]], params: SamplingParams, *,
             prompt_indices: Optional[Sequence[int]] = None, eos_token_ids: Sequence[int] = (),
             batch_size: int = 32, detokenize: Optional[Callable[[List[int]], str]] = None,
             progress: Optional[Callable[[int], None]] = None) -> List[List[Completion]]:
    """`params.n` completions for each prompt.

    model: GPTModel or a DeepSpeed engine around one (ZeRO-3: every data-parallel rank must call once);
    cfg: its Config (model shape, vocab size, max_seq_len); ps: ParallelState.
    prompts: token id lists (each shorter than model.max_seq_len, else PromptTooLong).
    prompt_indices: each prompt's global index for the per-sample randomness (default 0..P-1); give the
      dataset index when prompts are split across data-parallel ranks.
    eos_token_ids: ids that end a completion unless params.ignore_eos (stop_token_ids always do).
    batch_size: sequences decoded together; detokenize: ids -> text (needed for stop strings; fills `text`);
    progress: called with the number of completions just finished.
    Returns completions [P][n]: token ids, log-probs, finish reason, text.
    """
    _check_layout(cfg)
    params.validate()
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    indices = list(range(len(prompts))) if prompt_indices is None else [int(i) for i in prompt_indices]
    if len(indices) != len(prompts):
        raise ValueError(f"prompt_indices has {len(indices)} entries for {len(prompts)} prompts")
    for i, p in enumerate(prompts):
        if len(p) == 0:
            raise ValueError(f"prompt {indices[i]} is empty; give at least one token (e.g. BOS)")
        if len(p) >= cfg.model.max_seq_len:
            raise PromptTooLong(f"prompt {indices[i]} has {len(p)} tokens, no room for a generated token within "
                                f"model.max_seq_len={cfg.model.max_seq_len}; shorten it or skip it")
    stops = _StopStrings(params.stop, detokenize)
    stop_set = set(params.stop_token_ids) | (set() if params.ignore_eos else set(eos_token_ids))
    stop_ids = torch.tensor(sorted(stop_set), dtype=torch.long)
    results: List[List[Optional[Completion]]] = [[None] * params.n for _ in prompts]

    def on_done(pos: int, sample: int, c: Completion) -> None:
        if detokenize is not None:
            ids = c.token_ids[:-1] if (c.finish_reason == STOP and c.token_ids[-1] in stop_set) else c.token_ids
            c.text = stops.cut(detokenize(ids)) if c.finish_reason == STOP else detokenize(ids)
        results[pos][sample] = c
        if progress is not None:
            progress(1)

    rows = [(p, indices[p], s) for p in range(len(prompts)) for s in range(params.n)]
    with generation_model(model, cfg, ps) as module:
        first = next(module.parameters())
        for start in range(0, len(rows), batch_size):
            _decode_batch(module, cfg, ps, prompts, rows[start:start + batch_size], params, stop_ids, stops,
                          first.device, first.dtype, on_done)
    return results  # type: ignore[return-value]
