"""An ordered parallel map over record chunks with worker processes that each build their own Encoder.

Worker processes receive (chunk_id, [RawRecord]) from a bounded queue, return (chunk_id, outcomes),
and the caller gets outcomes in input order. A worker builds its `Encoder` once from the tokenizer
(which pickles by path) and settings it was started with, so there is no module-level state. Errors
that are not record problems (a bug, a config error) stop everything and are re-raised in the caller.
"""
from __future__ import annotations

import json
import multiprocessing as mp
import queue
import threading
import traceback
from typing import Iterable, Iterator, List, Tuple

from .encode import Encoder
from .errors import MALFORMED_JSON, NOT_AN_OBJECT, RecordProblem
from .records import normalise
from .settings import PreprocessSettings
from .sources import RawRecord

CHUNK = 64
OK, BAD = "ok", "bad"


def process_record(encoder: Encoder, raw: RawRecord) -> Tuple:
    """(where, 'ok', EncodedExample) or (where, 'bad', reason, message) for one raw record."""
    payload = raw.payload
    if isinstance(payload, str):
        try:
            payload = json.loads(payload)
        except json.JSONDecodeError as exc:
            return (raw.where, BAD, MALFORMED_JSON, f"{exc.msg} (column {exc.colno})")
    if not isinstance(payload, dict):
        return (raw.where, BAD, NOT_AN_OBJECT, f"expected a JSON object, got {type(payload).__name__}")
    try:
        return (raw.where, OK, encoder.encode(normalise(payload, encoder.settings.kind, encoder.settings.fields)))
    except RecordProblem as problem:
        return (raw.where, BAD, problem.reason, problem.message)


def _worker(tokenizer, settings: PreprocessSettings, tasks, results) -> None:
    try:
        encoder = Encoder(tokenizer, settings)
        while True:
            task = tasks.get()
            if task is None:
                return
            chunk_id, raws = task
            results.put((chunk_id, [process_record(encoder, r) for r in raws], None))
    except BaseException as exc:  # hand any failure to the parent instead of dying silently
        results.put((-1, None, _portable(exc)))


def _portable(exc: BaseException):
    """The exception if it pickles, else a RuntimeError carrying its traceback text."""
    import pickle
    try:
        pickle.dumps(exc)
        return exc
    except Exception:
        return RuntimeError("".join(traceback.format_exception(exc)))


def _chunks(records: Iterable[RawRecord]) -> Iterator[List[RawRecord]]:
    chunk: List[RawRecord] = []
    for r in records:
        chunk.append(r)
        if len(chunk) == CHUNK:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def map_records(records: Iterable[RawRecord], tokenizer, settings: PreprocessSettings,
                workers: int) -> Iterator[Tuple]:
    """Outcomes of `process_record` for every record, in input order, using `workers` processes."""
    if workers <= 1:
        encoder = Encoder(tokenizer, settings)
        for r in records:
            yield process_record(encoder, r)
        return
    # fork starts workers without re-importing transformers (seconds per worker); spawn elsewhere
    ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
    tasks, results = ctx.Queue(maxsize=4 * workers), ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(tokenizer, settings, tasks, results), daemon=True)
             for _ in range(workers)]
    for p in procs:
        p.start()
    stop = threading.Event()
    fed = {"chunks": None}  # set by the feeder when every chunk is queued

    def put(item) -> bool:
        while not stop.is_set():
            try:
                tasks.put(item, timeout=0.2)
                return True
            except queue.Full:
                continue
        return False

    def feed() -> None:
        n = 0
        try:
            for n, chunk in enumerate(_chunks(records), 1):
                if not put((n - 1, chunk)):
                    return
        except BaseException as exc:  # a reading error: report it through the results queue
            results.put((-1, None, _portable(exc)))
            return
        fed["chunks"] = n
        for _ in procs:
            put(None)

    feeder = threading.Thread(target=feed, daemon=True)
    feeder.start()
    pending, next_id, done = {}, 0, False
    try:
        while fed["chunks"] is None or next_id < fed["chunks"]:
            try:
                chunk_id, outcomes, error = results.get(timeout=0.5)
            except queue.Empty:
                dead = [p for p in procs if not p.is_alive() and p.exitcode not in (0, None)]
                if dead:
                    raise RuntimeError(f"a preprocessing worker died (exit code {dead[0].exitcode})")
                continue
            if error is not None:
                raise error
            pending[chunk_id] = outcomes
            while next_id in pending:
                yield from pending.pop(next_id)
                next_id += 1
        done = True
    finally:
        if done:  # every chunk came back: the feeder is queueing the stop markers, let workers exit
            feeder.join(timeout=30)
        stop.set()
        if not done:
            tasks.cancel_join_thread()  # unread chunks must not keep this process from exiting
        for p in procs:
            p.join(timeout=30 if done else 0)
            if p.is_alive():
                p.terminate()
                p.join()
        feeder.join(timeout=1)
