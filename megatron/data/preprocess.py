"""Raw file -> indexed dataset (tokenise in worker processes, write P.bin/P.idx/P.meta.json, report).

`preprocess(path, prefix, tokenizer, settings)` reads every record, detects the kind when
`kind: auto` (from the first record that parses), tokenises with `workers` processes, writes the
examples in file order and returns a `PreprocessReport` (also stored in P.meta.json). With
`on_bad_record=error` the first bad record (file order) raises `BadRecordError` naming file, line and
reason, and so does a response that would have to be truncated; with `skip` bad records are counted
and dropped and long responses truncated and counted. Records whose prompt and response were
tokenised separately (`prompt_boundary: fallback`) are kept and counted.
"""
from __future__ import annotations

import itertools
import json
import time
from typing import Callable, Iterator, List, Optional

from megatron.config import ConfigError

from .dataset import sequence_lengths
from .errors import RESPONSE_TRUNCATED, BadRecordError, DataError
from .indexed import IndexedDatasetWriter
from .packing import padding_fraction
from .records import detect_kind
from .report import PreprocessReport
from .settings import PreprocessSettings, stored_sequences_per_example
from .sources import RawRecord, detect_format, iter_raw_records
from .workers import BAD, map_records

PEEK_LIMIT = 1000  # records examined to detect the kind before giving up


def _detect(records: Iterator[RawRecord], settings: PreprocessSettings, path: str):
    """(kind, records with the peeked ones put back)."""
    if settings.kind != "auto":
        return settings.kind, records
    peeked: List[RawRecord] = []
    kind: Optional[str] = None
    for raw in itertools.islice(records, PEEK_LIMIT):
        peeked.append(raw)
        payload = raw.payload
        if isinstance(payload, str):
            try:
                payload = json.loads(payload)
            except json.JSONDecodeError:
                continue
        if isinstance(payload, dict):
            kind = detect_kind(payload, settings.fields)
            if kind is None:
                f = settings.fields
                raise ConfigError(
                    f"key 'data.kind': cannot tell the record kind of {raw.where} from its fields "
                    f"{sorted(payload)}; expected {f.prompt}/{f.response}, {f.prompt}/{f.completion}, "
                    f"{f.messages} or {f.text} (sft), {f.chosen}/{f.rejected} (pairwise) or "
                    f"{f.prompt}/{f.completion}/{f.label} (unpaired); set data.kind or the data.*_field names "
                    "(e.g. data.text_field=content)")
            break
    if not peeked:
        raise ConfigError(f"key 'data.train_path': {path!r} has no records")
    return kind or "sft", itertools.chain(peeked, records)


def preprocess(path: str, prefix: str, tokenizer, settings: PreprocessSettings, workers: int = 1,
               progress: bool = True, log: Callable[[str], None] = print,
               micro_batch_size: int = 8, role: str = "train") -> PreprocessReport:
    """Write the indexed dataset of raw file `path` to `prefix` and return the report.

    settings: from `preprocess_settings(cfg)`; workers: tokenising processes; progress: tqdm bar;
    log: where the report is printed (None = silent); micro_batch_size: for the padding-fraction lines;
    role: 'train' or 'valid', the split read from a DatasetDict directory (sources.pick_split).
    """
    from tqdm import tqdm

    start = time.time()
    fmt = detect_format(path, settings.format)
    if fmt == "indexed":
        raise ConfigError(f"key 'data.format': {path!r} is already an indexed dataset")
    split_line: List[str] = []  # the DatasetDict split announcement, also kept in the meta
    kind, records = _detect(iter_raw_records(path, fmt, role, log=split_line.append), settings, path)
    for line in split_line:
        if log is not None:
            log(line)
    settings = settings.with_kind(kind)
    settings.prompt_limit()  # ConfigError now rather than in every worker
    report = PreprocessReport(source=path, kind=kind, max_seq_len=settings.max_seq_len)
    writer = IndexedDatasetWriter(prefix, tokenizer.vocab_size, kind, stored_sequences_per_example(kind))
    outcomes = map_records(records, tokenizer, settings, workers)
    bar = tqdm(desc=f"preprocess {path}", unit=" rec", disable=not progress, mininterval=0.5)
    try:
        for outcome in outcomes:
            bar.update(1)
            report.records_read += 1
            where, status = outcome[0], outcome[1]
            if status == BAD:
                reason, message = outcome[2], outcome[3]
                if settings.on_bad_record == "error":
                    raise BadRecordError(where, reason, message)
                report.drop(reason, where, message)
                continue
            example = outcome[2]
            if example.truncated:
                if settings.on_bad_record == "error":
                    raise BadRecordError(where, RESPONSE_TRUNCATED, "; ".join(example.notes))
                report.truncate(where, "; ".join(example.notes))
            if example.fallback_notes:
                report.fall_back(where, "; ".join(example.fallback_notes))
            writer.add_example([(s.ids, s.prompt_len, s.spans) for s in example.sequences], example.label,
                               example.margin, example.scores)
            report.records_written += 1
            for seq in example.sequences:
                report.add_sequence(len(seq.ids), seq.prompt_len)
    except BaseException:
        writer.abort()
        raise
    finally:
        outcomes.close()  # stops the worker processes when we leave early
        bar.close()
    if report.records_written == 0:
        writer.abort()
        raise DataError(f"{path}: no usable records ({report.total_dropped} dropped; see the reasons below)\n"
                        f"{report.format()}")
    report.seconds = time.time() - start
    # Padding fractions of micro-batches in file order (unpaired: KL lengths of seed 0).
    lengths = sequence_lengths(kind, writer.seqs_per_example, [r[1] for r in writer.rows],
                               [r[2] for r in writer.rows], settings.sequence_budget(), kl_seed=0)
    sample = lengths[:100_000].tolist()
    report.padding_micro_batch_size = micro_batch_size
    report.padding_fraction_unpacked = padding_fraction(sample, micro_batch_size, settings.max_seq_len, False)
    report.padding_fraction_packed = padding_fraction(sample, micro_batch_size, settings.max_seq_len, True)
    report.seconds = time.time() - start
    meta = {"source": path, "tokenizer_fingerprint": tokenizer.fingerprint, "bos_id": tokenizer.bos_id,
            "eos_id": tokenizer.eos_id, "pad_id": tokenizer.pad_id, "max_seq_len": settings.max_seq_len,
            "sequence_budget": settings.sequence_budget(), "max_prompt_len": settings.prompt_limit(),
            "chat_template": settings.chat_template, "split": split_line[0] if split_line else None,
            "report": report.to_dict()}
    writer.finalize(meta)
    if log is not None:
        log(report.format())
    return report
