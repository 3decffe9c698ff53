"""reference.mode=precomputed: run the frozen reference ONCE over the data and store its log-probs.

    python tools/precompute_reference.py CONFIG.yml [MORE.yml ...] [--set key=value ...]       # 1 process
    python deepy.py tools/precompute_reference.py CONFIG.yml [...] [--set key=value ...]      # N ranks

`precompute_reference(cfg)` builds the reference exactly as a live reference would be built (the run's
initial weights: seeded init, `checkpoint.load` or the resumed run's `init_from`; then `reference.load`;
`train.precision` dtype; ZeRO-3 engine) through `trainer.freeze_as_reference`, runs it over every example
of data.train_path and data.valid_path, and writes one log-prob sum per reference sequence (nats, float32,
the dtype a live reference's `SequenceStats.logp_sum` has) to `<prefix>.ref_logps.npy` beside each indexed
dataset (`megatron.data.write_reference_logps`). Token counts are not stored: training takes them from the
loss mask. Training with reference.mode=precomputed then holds a single model and reads the values
through the collator (`batch['ref_logps']`). Without a prior tool run, training computes the missing values
itself at start-up (`ensure_reference_logps`, same code, same files); `require_reference_logps` rejects
values made by another reference.

Work split: the dataset in order is cut into micro-batches of train.micro_batch_size examples; micro-batch
j goes to data-parallel rank j mod dp. Every micro-batch therefore has the same contents and layout
whatever the number of ranks, so 1 and N ranks write the same values. Pipeline stages are folded into data
parallelism (a forward-only pass needs no pipeline: each tensor-parallel group holds the whole model).
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional

import numpy as np
import torch
import torch.distributed as dist

from megatron.config import Config, ConfigError, config_to_dict

# What the error for missing values tells the user to run (the same configs and overrides as training).
PRECOMPUTE_COMMAND = ("python tools/precompute_reference.py CONFIG.yml [--set key=value ...] "
                      "(several ranks: python deepy.py tools/precompute_reference.py CONFIG.yml ...)")


def reference_logps_path(prefix: str) -> str:
    """`<prefix>.ref_logps.npy`, where `write_reference_logps` puts the values of dataset `prefix`."""
    return prefix + ".ref_logps.npy"


def reference_source_path(prefix: str) -> str:
    """`<prefix>.ref_logps.source.json`: which reference model and precision produced the values."""
    return prefix + ".ref_logps.source.json"


def reference_source(cfg: Config, init_from: Optional[str]) -> Dict[str, str]:
    """What decides the reference values besides the data: the weights (reference.load, else the run's
    initial weights `init_from`, else the seeded init), train.precision and the model section (sha256)."""
    weights = cfg.reference.load or init_from
    # Kernel and attention paths equal their plain-torch twins (tested), so they do not change the values.
    execution_only = ("attention", "dropout", "kernels", "kernel_ops")
    model = {k: v for k, v in config_to_dict(cfg)["model"].items() if k not in execution_only}
    return {
        "weights": os.path.realpath(weights) if weights else f"seeded init (train.seed={cfg.train.seed})",
        "precision": cfg.train.precision,
        "model_sha256": hashlib.sha256(json.dumps(model, sort_keys=True).encode()).hexdigest()[:16],
    }


def require_reference_logps(dataset, split: str, source: Optional[Dict[str, str]] = None) -> None:
    """Raise ConfigError unless `dataset` (an ExampleDataset) has precomputed reference log-probs, made (when
    `source` is given and the values record theirs) by the same reference.

    The message names the file, the data key it belongs to and the command that (re)creates it.
    """
    path = reference_logps_path(dataset.prefix)
    if dataset.ref_logps is None:
        raise ConfigError(
            f"reference.mode=precomputed but the reference log-probs of data.{split}_path are missing: {path} "
            f"does not exist. Create them with the same configs and --set overrides as this run: {PRECOMPUTE_COMMAND}")
    recorded_path = reference_source_path(dataset.prefix)
    if source is None or not os.path.exists(recorded_path):
        return  # values written by other means (write_reference_logps) carry no record to check
    with open(recorded_path, encoding="utf-8") as fh:
        recorded = json.load(fh)
    diffs = [f"{k}: values {recorded.get(k)!r}, this run {v!r}" for k, v in source.items() if recorded.get(k) != v]
    if diffs:
        raise ConfigError(
            f"reference.mode=precomputed: {path} was computed with another reference than this run's ("
            + "; ".join(diffs) + f"). Recompute them with the same configs and --set overrides as this run: "
            f"{PRECOMPUTE_COMMAND}, or delete {path} and training computes them at start-up")


@dataclass
class PrecomputeResult:
    """Per split ('train', 'valid'): the written .npy path, its number of values and the seconds it took."""
    paths: Dict[str, str]
    counts: Dict[str, int]
    seconds: Dict[str, float]


def _dataset_prefix(cfg: Config, tokenizer, split: str, is_builder: bool, barrier: Callable[[], None]) -> str:
    """The indexed-dataset prefix of data.<split>_path (preprocessed into the cache first when raw), resolved
    the same way `open_dataset` does. Collective: calls `barrier` once."""
    from megatron.data.cache import cached_indexed_dataset
    from megatron.data.settings import preprocess_settings
    from megatron.data.sources import detect_format, indexed_prefix

    path = cfg.data.train_path if split == "train" else cfg.data.valid_path
    settings = preprocess_settings(cfg)
    if detect_format(path, settings.format, f"data.{split}_path") == "indexed":
        barrier()
        return indexed_prefix(path)
    return cached_indexed_dataset(path, tokenizer, settings, cfg.data.cache_dir, is_builder, barrier,
                                  workers=cfg.data.num_workers, progress=is_builder, log=print if is_builder else None,
                                  role=split)


def _remove_stale(prefix: str) -> None:
    # Old values come from another model (or KL seed); without them a crash half-way leaves "missing"
    # (a clear error at training time) rather than stale numbers. Also, opening a dataset whose stored
    # KL seed differs from train.seed is an error, which would block recomputing it.
    for suffix in (".ref_logps.npy", ".ref_logps.json", ".ref_logps.source.json"):
        if os.path.exists(prefix + suffix):
            os.remove(prefix + suffix)


def _reference_logps_of_split(model, dataset, ps, cfg: Config, progress: bool, split: str,
                              lockstep: bool) -> Dict[str, np.ndarray]:
    """This rank's share: {'index': Int64[n] reference positions, 'logp': Float32[n] log-prob sums (nats)}.

    lockstep: every rank runs the same number of forwards (ZeRO-3 gathers parameters collectively over
    the data-parallel group); ranks past the end repeat micro-batch 0 and discard the result.
    """
    from megatron.data import collate, sequence_ids_of_batch

    from .forward import batch_to, forward_stats
    from .build import device_for_rank

    device = device_for_rank()
    mbs = cfg.train.micro_batch_size
    num_micro = (len(dataset) + mbs - 1) // mbs
    rounds = (num_micro + ps.dp_size - 1) // ps.dp_size
    mine = [j for j in range(ps.dp_rank, rounds * ps.dp_size, ps.dp_size) if lockstep or j < num_micro]
    indices: List[np.ndarray] = []
    values: List[np.ndarray] = []
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=len(mine), desc=f"reference logps ({split})", unit="batch", file=sys.stderr,
                   dynamic_ncols=True, mininterval=1.0)
    for j in mine:
        real = j < num_micro
        start = j * mbs if real else 0
        examples = [dataset[i] for i in range(start, min(start + mbs, len(dataset)))]
        batch = collate(examples, cfg.data.pack, cfg.model.max_seq_len, cfg.data.pad_to_max_len)
        with torch.no_grad():
            stats = forward_stats(model, batch_to(batch, device), ps, value_head=False)
        if real:
            indices.append(sequence_ids_of_batch(batch).numpy().astype(np.int64))
            values.append(stats.logp_sum.float().cpu().numpy())
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    cat = (lambda xs, dt: np.concatenate(xs).astype(dt) if xs else np.zeros(0, dtype=dt))
    return {"index": cat(indices, np.int64), "logp": cat(values, np.float32)}


def _assemble(shares: List[Dict[str, np.ndarray]], expected: int, prefix: str) -> np.ndarray:
    """Float32[expected] from the ranks' shares; every reference position must be covered."""
    out = np.full(expected, np.nan, dtype=np.float32)
    for share in shares:
        out[share["index"]] = share["logp"]
    missing = np.flatnonzero(np.isnan(out))
    if missing.size:
        raise RuntimeError(f"precompute for {prefix}: no value for {missing.size} of {expected} reference sequences "
                           f"(first: {missing[:5].tolist()}); the ranks' shares do not cover the dataset")
    return out


def _reference_model(cfg: Config, ps, init_from: Optional[str], say: Callable[[str], None]):
    """The frozen reference, built exactly as a live one (`freeze_as_reference`) on `ps` (no pipeline)."""
    import deepspeed

    from .build import build_policy, device_for_rank, freeze_as_reference

    source = init_from or f"seeded init (train.seed={cfg.train.seed})"
    if cfg.reference.load:
        source = f"reference.load={cfg.reference.load}"
    say(f"reference: {source}, precision {cfg.train.precision}, tensor={ps.tp_size}, data-parallel={ps.dp_size}")
    return freeze_as_reference(cfg, ps, build_policy(cfg, ps, init_from), device_for_rank(), deepspeed)


def _write_split(cfg: Config, ps, model, tokenizer, split: str, init_from: Optional[str],
                 say: Callable[[str], None], result: PrecomputeResult) -> None:
    """Compute and write the values of data.<split>_path with `model` (collective over all ranks of `ps`);
    records the path, count and seconds in `result`."""
    from megatron.data import open_dataset, reference_sequence_count, write_reference_logps

    is_main = ps.rank == 0
    barrier = (lambda: dist.barrier()) if dist.is_initialized() else (lambda: None)
    t0 = time.perf_counter()
    prefix = _dataset_prefix(cfg, tokenizer, split, is_main, barrier)
    if is_main:
        _remove_stale(prefix)
    barrier()
    dataset = open_dataset(cfg, tokenizer, split, is_builder=is_main, barrier=barrier, progress=False, log=None)
    share = _reference_logps_of_split(model, dataset, ps, cfg, progress=is_main, split=split,
                                      lockstep=cfg.parallel.zero_stage == 3)
    # Tensor-parallel peers computed the same values: one share per data-parallel rank suffices.
    share = share if ps.tp_rank == 0 else {"index": np.zeros(0, np.int64), "logp": np.zeros(0, np.float32)}
    shares: List[Optional[Dict[str, np.ndarray]]] = [None] * ps.world_size
    if dist.is_initialized() and ps.world_size > 1:
        dist.gather_object(share, shares if is_main else None, dst=0)
    else:
        shares = [share]
    expected = reference_sequence_count(dataset.indexed.meta)
    failure: List[Optional[str]] = [None]
    if is_main:
        try:
            values = _assemble(shares, expected, dataset.prefix)
            kl_seed = cfg.train.seed if dataset.kind == "unpaired" else None
            # The record first: values never exist without it (a crash in between leaves "missing").
            with open(reference_source_path(dataset.prefix), "w", encoding="utf-8") as fh:
                json.dump(reference_source(cfg, init_from), fh, indent=1)
            write_reference_logps(dataset.prefix, values, kl_seed=kl_seed)
        except (OSError, ValueError, RuntimeError) as exc:
            failure[0] = f"{type(exc).__name__}: {exc}"
    if dist.is_initialized() and ps.world_size > 1:
        dist.broadcast_object_list(failure, src=0)  # every rank stops, rather than waiting on rank 0
    if failure[0] is not None:
        raise RuntimeError(f"writing the reference log-probs of data.{split}_path failed on rank 0: {failure[0]}")
    result.paths[split] = reference_logps_path(dataset.prefix)
    result.counts[split] = expected
    result.seconds[split] = time.perf_counter() - t0
    say(f"reference log-probs of data.{split}_path: {expected} sequences -> {result.paths[split]} "
        f"({result.seconds[split]:.1f} s)")


def precompute_reference(cfg: Config, log: Callable[[str], None] = print) -> PrecomputeResult:
    """Compute and store the reference log-prob sums of data.train_path and data.valid_path (when set).

    Works on 1..N ranks (collective; the caller owns process start-up, as for `run_training`). `cfg` must be
    validated for the current world size. Returns where the values went, on every rank.
    """
    from megatron.data import load_tokenizer
    from megatron.mpu import initialize_parallel
    from megatron.mpu.distributed import init_distributed
    from megatron.objectives import get_objective_class, resolve_objective

    from .build import starting_point

    resolve_objective(cfg)
    obj_cls = get_objective_class(cfg.objective.name)
    if not obj_cls.needs_reference(cfg.objective):
        raise ConfigError(f"key 'objective.name': objective '{cfg.objective.name}' (with these options) uses no "
                          "reference policy, so there is nothing to precompute")
    init_distributed(cfg.parallel.backend)
    ps = initialize_parallel(cfg.parallel.tensor, 1)
    if ps.world_size != cfg.derived.world_size:
        raise ConfigError(f"the config was validated for world size {cfg.derived.world_size} but "
                          f"{ps.world_size} ranks started; launch with launcher.num_gpus * launcher.num_nodes = "
                          f"{cfg.derived.world_size} or re-validate")
    say = log if ps.rank == 0 else (lambda _text: None)
    tokenizer = load_tokenizer(cfg.data.tokenizer)
    _resume_dir, _full, init_from = starting_point(cfg)
    model = _reference_model(cfg, ps, init_from, say)
    result = PrecomputeResult({}, {}, {})
    for split in ["train"] + (["valid"] if cfg.data.valid_path else []):
        _write_split(cfg, ps, model, tokenizer, split, init_from, say, result)
    return result


def ensure_reference_logps(cfg: Config, ps, tokenizer, init_from: Optional[str],
                           log: Callable[[str], None] = print) -> PrecomputeResult:
    """Training start-up with reference.mode=precomputed: compute the values that do not exist yet, in this
    launch, on all its ranks (TRL's precompute_ref_log_probs), and cache them where the tool puts them.

    Splits: data.train_path, and data.valid_path when the run evaluates. A split whose values exist is left
    alone (the trainer's `require_reference_logps` then checks they come from this run's reference). The
    reference is built as the tool builds it (run's initial weights `init_from`, reference.load, precision);
    a pipelined run folds its stages into data parallelism for this pass (one tensor-parallel model per
    group, as the tool does). Torch's RNG state is restored afterwards, so the run continues exactly as after
    a separate tools/precompute_reference.py run. Collective; returns what was written (empty when nothing).
    """
    from megatron.mpu import initialize_parallel

    is_main = ps.rank == 0
    say = log if is_main else (lambda _text: None)
    barrier = (lambda: dist.barrier()) if dist.is_initialized() else (lambda: None)
    splits = ["train"] + (["valid"] if cfg.train.eval_interval > 0 and cfg.data.valid_path else [])
    missing: List[Optional[List[str]]] = [None]
    prefixes = {split: _dataset_prefix(cfg, tokenizer, split, is_main, barrier) for split in splits}
    if is_main:  # rank 0 decides for everyone (a file appearing half-way must not split the ranks)
        missing[0] = [s for s in splits if not os.path.exists(reference_logps_path(prefixes[s]))]
    if dist.is_initialized() and ps.world_size > 1:
        dist.broadcast_object_list(missing, src=0)
    result = PrecomputeResult({}, {}, {})
    if not missing[0]:
        return result
    say(f"reference.mode=precomputed: no reference log-probs yet for "
        f"{', '.join(f'data.{s}_path' for s in missing[0])}; computing them now (once; they are cached beside "
        f"the dataset, as {PRECOMPUTE_COMMAND.split(' (')[0]} would)")
    flat = ps if ps.pp_size == 1 else initialize_parallel(cfg.parallel.tensor, 1)
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        model = _reference_model(cfg, flat, init_from, say)
        for split in missing[0]:
            _write_split(cfg, flat, model, tokenizer, split, init_from, say, result)
        del model
    barrier()
    return result
