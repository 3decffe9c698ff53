"""The engine's entry point: config -> (cached) indexed dataset -> sampler -> collated micro-batches.

    it = build_data_iterator(cfg, dp_rank, dp_size, tokenizer, consumed_samples, split='train')
    batch = next(it)              # one micro-batch of this rank (the MICRO-BATCH CONTRACT)
    it.state_dict()               # {'consumed_samples': ...} after complete steps, for checkpoints
"""
from __future__ import annotations

from typing import Callable, Dict, Iterator, List, Optional, Sequence

import torch

from megatron.config import ConfigError

from .cache import cached_indexed_dataset
from .collate import collate
from .dataset import ExampleDataset
from .indexed import IndexedDataset
from .packing import padding_fraction
from .sampler import MicroBatchSampler
from .settings import preprocess_settings
from .sources import detect_format, indexed_prefix


def _objective_data_kind(cfg) -> Optional[str]:
    """The data kind the configured objective consumes (`derived.data_kind`, filled by
    megatron.objectives.resolve_objective), or None when the objective has not been resolved."""
    kind = getattr(cfg.derived, "data_kind", "auto")
    return None if kind == "auto" else kind


def open_dataset(cfg, tokenizer, split: str = "train", is_builder: bool = True,
                 barrier: Callable[[], None] = lambda: None, progress: bool = True,
                 log: Optional[Callable[[str], None]] = print) -> ExampleDataset:
    """The `ExampleDataset` of data.train_path (split='train') or data.valid_path (split='valid').

    Raw files go through the preprocessing cache; `data.format: indexed` (or a path with P.meta.json)
    is opened directly after checking it was made with this tokenizer.
    """
    if split not in ("train", "valid"):
        raise ValueError(f"split must be 'train' or 'valid', got {split!r}")
    key = f"data.{split}_path"
    path = cfg.data.train_path if split == "train" else cfg.data.valid_path
    if not path:
        raise ConfigError(f"key '{key}' is not set")
    settings = preprocess_settings(cfg)
    if detect_format(path, settings.format, key) == "indexed":
        prefix = indexed_prefix(path)
        barrier()  # same number of collective calls as the cached path
    else:
        prefix = cached_indexed_dataset(path, tokenizer, settings, cfg.data.cache_dir, is_builder, barrier,
                                        workers=cfg.data.num_workers, progress=progress, log=log, role=split)
    indexed = IndexedDataset(prefix)
    if indexed.meta.get("tokenizer_fingerprint") != tokenizer.fingerprint:
        raise ConfigError(f"key 'data.tokenizer': {prefix} was tokenised with a different tokenizer "
                          f"({indexed.meta.get('tokenizer_fingerprint', '?')[:16]}...) than {tokenizer.path!r}")
    if cfg.data.kind != "auto" and indexed.kind != cfg.data.kind:
        raise ConfigError(f"key 'data.kind': {cfg.data.kind!r} but {prefix} holds {indexed.kind} data")
    wanted = _objective_data_kind(cfg)
    if wanted is not None and wanted != indexed.kind:
        raise ConfigError(f"key '{key}': objective '{cfg.objective.name}' needs {wanted} data, but {path!r} "
                          f"holds {indexed.kind} records; point {key} at {wanted} data")
    return ExampleDataset(indexed, cfg.model.max_seq_len, kl_seed=cfg.train.seed)


class DataIterator:
    """Infinite iterator of this rank's micro-batches; `state_dict()` / `consumed_samples` for resume."""

    def __init__(self, dataset: ExampleDataset, sampler: MicroBatchSampler, pack: bool, max_seq_len: int,
                 pad_to_max_len: bool = False, width_multiple: int = 1):
        self.dataset = dataset
        self.sampler = sampler
        self.pack = pack
        self.max_seq_len = max_seq_len
        self.pad_to_max_len = pad_to_max_len
        self.width_multiple = width_multiple
        self._indices: Iterator[List[int]] = iter(sampler)

    @property
    def consumed_samples(self) -> int:
        """Global samples consumed by completed steps (all ranks)."""
        return self.sampler.consumed_samples

    @property
    def micro_batches_per_step(self) -> int:
        """grad_accum: micro-batches this rank draws per optimizer step."""
        return self.sampler.grad_accum

    def __iter__(self) -> "DataIterator":
        return self

    def __next__(self) -> Dict[str, torch.Tensor]:
        return self.collate(next(self._indices))

    def collate(self, indices: Sequence[int]) -> Dict[str, torch.Tensor]:
        """The micro-batch of dataset examples `indices` laid out as this iterator does."""
        return collate([self.dataset[i] for i in indices], self.pack, self.max_seq_len, self.pad_to_max_len,
                       self.width_multiple)

    def state_dict(self) -> Dict[str, int]:
        """{'consumed_samples': int}; pass it back as build_data_iterator(consumed_samples=...)."""
        return self.sampler.state_dict()

    def load_state_dict(self, state: Dict[str, int]) -> None:
        """Continue from `state['consumed_samples']` (the start of a step)."""
        self.sampler.consumed_samples = int(state["consumed_samples"])
        self._indices = iter(self.sampler)


def build_data_iterator(cfg, dp_rank: int, dp_size: int, tokenizer, consumed_samples: int = 0,
                        split: str = "train", is_builder: bool = True,
                        barrier: Callable[[], None] = lambda: None, progress: bool = True,
                        log: Optional[Callable[[str], None]] = print) -> DataIterator:
    """Micro-batches of data-parallel rank `dp_rank` of `dp_size` for `split` ('train' | 'valid').

    A step is train.global_batch_size examples; this rank gets grad_accum micro-batches of
    train.micro_batch_size examples. Shuffled with train.seed (+ epoch) when data.shuffle and split is
    'train'; validation data is read in order. Every rank calls this (it calls `barrier` once).
    """
    dataset = open_dataset(cfg, tokenizer, split, is_builder, barrier, progress, log)
    t = cfg.train
    sampler = MicroBatchSampler(len(dataset), t.global_batch_size, t.micro_batch_size, dp_rank, dp_size,
                                seed=t.seed, shuffle=cfg.data.shuffle and split == "train",
                                consumed_samples=consumed_samples)
    width_multiple = cfg.parallel.tensor if cfg.parallel.sequence_parallel else 1
    return DataIterator(dataset, sampler, cfg.data.pack, cfg.model.max_seq_len, cfg.data.pad_to_max_len,
                        width_multiple)


def iterate_all(dataset: ExampleDataset, micro_batch_size: int, pack: bool, max_seq_len: int,
                pad_to_max_len: bool = False) -> Iterator[Dict[str, torch.Tensor]]:
    """Every example once, in dataset order, as micro-batches (evaluation, reference precompute)."""
    for start in range(0, len(dataset), micro_batch_size):
        examples = [dataset[i] for i in range(start, min(start + micro_batch_size, len(dataset)))]
        yield collate(examples, pack, max_seq_len, pad_to_max_len)


def dataset_stats(dataset: ExampleDataset, micro_batch_size: int, max_seq_len: Optional[int] = None,
                  pad_to_max_len: bool = False, max_examples: int = 100_000) -> Dict[str, float]:
    """Sizes and padding fractions (packed vs unpacked) of micro-batches of the dataset in order.

    Returns num_examples, num_sequences, num_tokens, mean/max example length and
    padding_fraction_{packed,unpacked} over the first `max_examples` examples.
    """
    max_seq_len = max_seq_len or dataset.max_seq_len
    lengths = dataset.example_seq_lengths(range(min(len(dataset), max_examples)))
    return {
        "num_examples": len(dataset),
        "num_sequences": int(dataset.seq_lengths.size),
        "num_tokens": int(dataset.seq_lengths.sum()),
        "mean_example_len": float(dataset.example_lengths.mean()),
        "max_example_len": int(dataset.example_lengths.max()),
        "padding_fraction_unpacked": padding_fraction(lengths, micro_batch_size, max_seq_len, False, pad_to_max_len),
        "padding_fraction_packed": padding_fraction(lengths, micro_batch_size, max_seq_len, True, pad_to_max_len),
    }
