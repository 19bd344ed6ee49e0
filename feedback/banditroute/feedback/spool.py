"""A bounded spool on SHARED storage for log parts that the log's storage could not take.

When the event log's storage (S3) refuses a write, the feedback service
writes the part here instead, under the exact key it would have had in the
log (``events/dt=.../hr=../part-....parquet``), and acknowledges the reward
once the spool's write has completed. A background drain copies parts to
the log oldest first and deletes a spool part only after its log write
succeeded; writing the same key twice replaces the object, so a drain
repeated after a crash leaves no duplicate in the log.

The spool is a :class:`~banditroute.core.storage.Storage` root
(``feedback.spool_uri``: a second bucket, a shared RWX mount; default the
log's own storage under ``spool/``), never a node's local disk: a feedback
actor that Ray restarts on ANOTHER node reads the same spool, so it knows
every reward acknowledged from there (a replay answers 'duplicate') and
drains them (nothing acknowledged is lost with the old node).

The bound is in rows (events + decisions + late rewards): a part that would
take the spool past ``max_rows`` raises :class:`SpoolFull`, which the
service turns into back-pressure (503 for rewards, an exception for the
replicas' decision batches). The row index is read from storage on first
use (:meth:`Spool.load`), so a restarted process finds its parts.
"""

from __future__ import annotations

import io
import logging
import os
import threading

import pyarrow as pa
import pyarrow.parquet as pq

from banditroute.core.storage import Storage, StorageConfig, open_storage
from banditroute.feedback.config import SPOOL_PREFIX, FeedbackConfig
from banditroute.feedback.log import part_time

logger = logging.getLogger(__name__)


class SpoolFull(Exception):
    """The spool has no room for this part; nothing was written (the caller answers 'retry later')."""

    def __init__(self, waiting: int, max_rows: int):
        super().__init__(f"event buffer full ({waiting} events waiting for storage; limit {max_rows})")
        self.waiting, self.max_rows = waiting, max_rows


def table_to_parquet_bytes(table: pa.Table) -> bytes:
    sink = io.BytesIO()
    pq.write_table(table, sink)
    return sink.getvalue()


def _order(key: str) -> tuple[float, str]:
    return (part_time(key) or 0.0, key)


class Spool:
    """Log parts waiting for the log's storage, one Parquet object per part, keyed like the log (thread-safe)."""

    def __init__(self, storage: Storage, max_rows: int):
        if max_rows < 1:
            raise ValueError("max_rows must be >= 1")
        self.storage = storage
        self.max_rows = max_rows
        self._lock = threading.Lock()
        self._rows: dict[str, int] = {}
        self._reserved = 0
        self.loaded = False
        self.spooled = 0
        self.drained = 0
        self.full_rejections = 0
        self.unreadable: list[str] = []

    @classmethod
    def at(cls, location: str | os.PathLike | StorageConfig, max_rows: int) -> "Spool":
        """A spool rooted at a path, URI or StorageConfig."""
        config = location if isinstance(location, StorageConfig) else StorageConfig(uri=os.fspath(location))
        return cls(open_storage(config), max_rows)

    @property
    def location(self) -> str:
        return self.storage.uri_for()

    # --- state ----------------------------------------------------------------

    def load(self) -> None:
        """Read the index of waiting parts from storage (once; StorageUnavailable while it cannot be listed)."""
        if self.loaded:
            return
        rows: dict[str, int] = {}
        unreadable = []
        for key in self.storage.list(""):
            if not key.endswith(".parquet"):
                continue
            try:
                rows[key] = pq.ParquetFile(pa.BufferReader(self.storage.read_bytes(key))).metadata.num_rows
            except (pa.ArrowInvalid, ValueError) as exc:  # writes are atomic: unexpected; keep it for a human
                logger.error("spool part %s is unreadable (%s); left in place, not drained", key, exc)
                unreadable.append(key)
        with self._lock:
            if self.loaded:
                return
            rows.update(self._rows)
            self._rows, self.unreadable, self.loaded = rows, unreadable, True
        if rows:
            logger.warning("spool %s holds %d parts (%d rows) written before this process started",
                           self.location, len(rows), self.depth)

    @property
    def depth(self) -> int:
        """Rows waiting for storage."""
        return sum(self._rows.values())

    @property
    def active(self) -> bool:
        """Whether any part is waiting (then new parts join the queue, so the log keeps its order)."""
        return bool(self._rows)

    def keys(self, prefix: str | None = None) -> list[str]:
        """Waiting part keys, oldest first (optionally of one stream)."""
        with self._lock:
            keys = list(self._rows)
        if prefix is not None:
            keys = [k for k in keys if k.startswith(prefix.rstrip("/") + "/")]
        return sorted(keys, key=_order)

    # --- writing / draining ------------------------------------------------------

    def put(self, key: str, data: bytes, rows: int) -> None:
        """Store one part durably on the spool's storage; SpoolFull if it does not fit (StorageUnavailable as it comes)."""
        self.load()
        with self._lock:
            waiting = sum(self._rows.values()) + self._reserved
            if waiting + rows > self.max_rows:
                self.full_rejections += 1
                raise SpoolFull(waiting, self.max_rows)
            self._reserved += rows  # the room is held while the (unlocked) write runs; the drain does not see it yet
        try:
            self.storage.write_bytes(key, data)
            with self._lock:
                self._rows[key] = rows
                self.spooled += rows
        finally:
            with self._lock:
                self._reserved -= rows

    def read_bytes(self, key: str) -> bytes:
        return self.storage.read_bytes(key)

    def read_table(self, prefix: str, columns: list[str] | None = None) -> pa.Table | None:
        """All waiting parts of one stream as one table (None if there are none)."""
        self.load()
        tables = [pq.read_table(pa.BufferReader(self.read_bytes(k)), columns=columns) for k in self.keys(prefix)]
        return pa.concat_tables(tables, promote_options="default") if tables else None

    def remove(self, key: str) -> None:
        """The part is in the log now: forget it (call only after the log write succeeded)."""
        self.storage.delete(key, missing_ok=True)
        with self._lock:
            rows = self._rows.pop(key, None)
            if rows is not None:
                self.drained += rows

    def forget(self, key: str) -> None:
        """Drop ``key`` from the index without counting it drained (it is gone from the spool already)."""
        with self._lock:
            self._rows.pop(key, None)

    def stats(self) -> dict[str, int]:
        return {
            "spooled": self.spooled,
            "drained": self.drained,
            "spool_full_rejections": self.full_rejections,
            "spool_depth": self.depth,
            "spool_parts": len(self._rows),
        }


def open_spool(config: FeedbackConfig, log_storage: Storage) -> Spool | None:
    """The feedback service's spool (None when ``spool_max_events`` is 0): ``spool_uri``, or the log's root under ``spool/``."""
    if config.spool_max_events <= 0:
        return None
    if config.spool_dir and not config.spool_uri:
        logger.warning("feedback.spool_dir is deprecated (read as feedback.spool_uri=%s): it must be storage every node "
                       "reaches, never a node's own disk (emptyDir), or an actor moved to another node misses its parts",
                       config.spool_dir)
    if config.spool_uri or config.spool_dir:
        storage = open_storage(config.spool_storage_for(log_storage.config))
    else:
        storage = log_storage.child(SPOOL_PREFIX)
    return Spool(storage, config.spool_max_events)
