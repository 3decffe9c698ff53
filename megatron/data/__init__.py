"""Data pipeline: raw records -> tokens -> indexed mmap dataset -> sampler -> packer -> micro-batches.

Public API (see docs/ARCHITECTURE.md for the micro-batch contract):
  load_tokenizer(path)                                   HF tokenizer dir or SentencePiece .model
  build_data_iterator(cfg, dp_rank, dp_size, tokenizer, consumed_samples=0, split='train',
                      is_builder=True, barrier=lambda: None) -> DataIterator
  open_dataset(cfg, tokenizer, split) -> ExampleDataset  collate(examples, pack, max_seq_len)
  dataset_stats(dataset, micro_batch_size)               padding fraction packed vs unpacked
  preprocess(path, prefix, tokenizer, settings)          raw file -> indexed dataset + report
  write_reference_logps(prefix, values), sequence_ids_of_batch(batch)
"""
from .cache import cache_key, cached_indexed_dataset
from .collate import batch_padding_fraction, collate, sequence_ids_of_batch
from .dataset import Example, ExampleDataset, SequenceData, kl_partners
from .errors import BadRecordError, DataError
from .indexed import IndexedDataset, read_meta, reference_sequence_count, write_reference_logps
from .iterator import DataIterator, build_data_iterator, dataset_stats, iterate_all, open_dataset
from .packing import best_fit_decreasing, padding_fraction
from .preprocess import preprocess
from .report import PreprocessReport
from .sampler import MicroBatchSampler
from .settings import Fields, PreprocessSettings, preprocess_settings
from .tokenizer import HFTokenizer, SentencePieceTokenizer, load_tokenizer
