"""Where router replicas send their decisions: a registry of sinks.

A sink is constructed as ``SinkClass(options: dict)`` and implements
records.DecisionSink: ``emit_table(table: pyarrow.Table)``, one Arrow batch
of decisions (records.DECISION_SCHEMA, built by records.decisions_to_table;
the Router's is ``serve.core.decision_batch``), and ``close()``.

Contract: when ``emit_table`` returns, the decisions are durable (or
handed to something that is); on failure it raises, and the Router then
answers the affected requests with 503 instead of acknowledging decisions
that could be lost. The Router calls it from a worker thread (never on the
event loop), once per batch, so blocking I/O (fsync, ``ray.get``) is fine.

Register a new sink by adding it to ``DECISION_SINKS`` (the feedback side
adds "feedback-actor" here).
"""

from __future__ import annotations

import os
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Callable

import pyarrow as pa

from banditroute.serve.feedback_sink import FeedbackActorSink
from banditroute.core.records import DECISION_SCHEMA, DecisionRecord, DecisionSink, decisions_from_table

SEGMENT_SUFFIX = ".arrows"


class LocalDecisionLog:
    """Durable local log: Arrow IPC stream segments, one open segment per process, fsync'd per emit.

    Options:
      path               folder of the segments (created); default runs/decisions
      fsync              fsync the segment after every emit (default true)
      max_rows_per_file  rotate to a new segment after this many rows (default 200000)

    Segment names are unique per process (time, pid, random), so several
    replicas can share one folder. A segment is an Arrow IPC *stream*: each
    emit appends one record batch, so a crash can only cut off the batch
    being written, which was never acknowledged; readers skip such a tail.
    After a failed emit the segment is abandoned and the next emit opens a
    new one, so a torn batch never hides decisions written after it.
    """

    def __init__(self, options: dict[str, Any] | None = None):
        options = dict(options or {})
        self.path = Path(options.pop("path", "runs/decisions")).expanduser()
        self.fsync = bool(options.pop("fsync", True))
        self.max_rows_per_file = int(options.pop("max_rows_per_file", 200_000))
        if options:
            raise ValueError(f"decision_sink_options: unknown option(s) for 'local': {sorted(options)}")
        if self.max_rows_per_file < 1:
            raise ValueError("decision_sink_options.max_rows_per_file must be >= 1")
        self.path.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._file = None
        self._writer: pa.ipc.RecordBatchStreamWriter | None = None
        self._rows_in_file = 0
        self.rows_written = 0
        self.segments_abandoned = 0

    def _open_segment(self) -> None:
        self._close_segment()
        name = f"decisions-{time.time_ns()}-{os.getpid()}-{uuid.uuid4().hex[:8]}{SEGMENT_SUFFIX}"
        self._file = open(self.path / name, "wb")
        self._writer = pa.ipc.new_stream(self._file, DECISION_SCHEMA)
        self._rows_in_file = 0
        self._sync()
        if self.fsync:  # make the new file's directory entry durable too
            fd = os.open(self.path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)

    def _sync(self) -> None:
        self._file.flush()
        if self.fsync:
            os.fsync(self._file.fileno())

    def _close_segment(self) -> None:
        if self._writer is not None:
            try:
                self._writer.close()  # writes the end-of-stream marker
                self._sync()
            finally:
                self._file.close()
                self._writer, self._file = None, None

    def emit_table(self, table: pa.Table) -> None:
        if table.num_rows == 0:
            return
        table = table.cast(DECISION_SCHEMA) if table.schema != DECISION_SCHEMA else table
        with self._lock:
            if self._writer is None or self._rows_in_file >= self.max_rows_per_file:
                self._open_segment()
            try:
                self._writer.write_table(table)
                self._sync()
            except BaseException:
                # The segment may now end in a torn batch; readers stop there, so anything appended after it
                # would be hidden. Abandon it (its complete batches stay readable) and start the next emit afresh.
                self._abandon_segment()
                raise
            self._rows_in_file += table.num_rows
            self.rows_written += table.num_rows

    def _abandon_segment(self) -> None:
        """Drop the open segment without an end-of-stream marker (it may hold a torn batch)."""
        self.segments_abandoned += 1
        file, self._writer, self._file = self._file, None, None
        if file is not None:
            try:
                file.close()
            except OSError:
                pass

    def close(self) -> None:
        with self._lock:
            self._close_segment()


class NullDecisionSink:
    """Discards decisions. Only for benchmarks that must isolate inference cost: nothing is learnt."""

    def __init__(self, options: dict[str, Any] | None = None):
        if options:
            raise ValueError(f"decision_sink_options: the 'null' sink takes no options, got {sorted(options)}")

    def emit_table(self, table: pa.Table) -> None:
        return None

    def close(self) -> None:
        return None


DECISION_SINKS: dict[str, Callable[[dict[str, Any]], DecisionSink]] = {
    "local": LocalDecisionLog,
    "null": NullDecisionSink,
    "feedback-actor": FeedbackActorSink,  # -> the feedback actor (banditroute.serve.feedback_sink)
}


def make_decision_sink(name: str, options: dict[str, Any] | None = None) -> DecisionSink:
    """The sink registered under ``name``, built with ``options``."""
    try:
        cls = DECISION_SINKS[name]
    except KeyError:
        raise ValueError(f"decision_sink: unknown sink {name!r}; known: {sorted(DECISION_SINKS)}") from None
    return cls(dict(options or {}))


# --- reading the local log ---------------------------------------------------------


def _read_segment(path: Path) -> list[pa.RecordBatch]:
    batches = []
    with open(path, "rb") as f:
        try:
            reader = pa.ipc.open_stream(f)
        except (pa.ArrowInvalid, OSError):
            return batches  # empty or cut before the schema was complete
        while True:
            try:
                batches.append(reader.read_next_batch())
            except StopIteration:
                break
            except (pa.ArrowInvalid, OSError):
                break  # a tail cut off mid-write (never acknowledged)
    return batches


def read_decision_log(path: str | os.PathLike) -> pa.Table:
    """Every complete decision in a LocalDecisionLog folder, as one table (records.DECISION_SCHEMA)."""
    folder = Path(path).expanduser()
    batches: list[pa.RecordBatch] = []
    if folder.is_dir():
        for seg in sorted(folder.glob(f"*{SEGMENT_SUFFIX}")):
            batches.extend(_read_segment(seg))
    return pa.Table.from_batches(batches, schema=DECISION_SCHEMA)


def read_decisions(path: str | os.PathLike) -> list[DecisionRecord]:
    """The local log as DecisionRecords."""
    return decisions_from_table(read_decision_log(path))
