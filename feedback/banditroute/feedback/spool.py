"""A bounded, durable spool on LOCAL disk for log parts that storage could not take.

When the event log's storage (S3) is unavailable, the feedback service
writes each log part here instead, under the exact key it would have had in
the log (``events/dt=.../hr=../part-....parquet``), and acknowledges the
reward once the part is fsync'd. A background drain copies parts to the log
oldest first and deletes a spool part only after its log write succeeded;
writing the same key twice replaces the object, so a drain repeated after a
crash leaves no duplicate in the log.

The bound is in rows (events + decisions + late rewards): a part that would
take the spool past ``max_rows`` raises :class:`SpoolFull`, which the
service turns into back-pressure (503 for rewards, an exception for the
replicas' decision batches). A restarted process finds its parts on disk.
"""

from __future__ import annotations

import io
import logging
import os
import threading
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from banditroute.feedback.log import part_time
from banditroute.core.storage import TMP_PREFIX, atomic_local_write

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


def _fsync_dir(path: Path) -> None:
    """Make a create/rename/unlink in ``path`` durable (the file's own fsync does not cover its name)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _order(key: str) -> tuple[float, str]:
    return (part_time(key) or 0.0, key)


class LocalSpool:
    """Log parts waiting for storage, one Parquet file per part, keyed like the log (thread-safe)."""

    def __init__(self, directory: str | os.PathLike, max_rows: int):
        if max_rows < 1:
            raise ValueError("max_rows must be >= 1")
        self.directory = Path(directory).expanduser().resolve()
        self.directory.mkdir(parents=True, exist_ok=True)
        self.max_rows = max_rows
        self._lock = threading.Lock()
        self._rows: dict[str, int] = {}
        self.spooled = 0
        self.drained = 0
        self.full_rejections = 0
        for path in sorted(self.directory.rglob("*.parquet")):
            if path.name.startswith(TMP_PREFIX):
                path.unlink(missing_ok=True)  # an interrupted write: never acknowledged
                continue
            key = path.relative_to(self.directory).as_posix()
            try:
                self._rows[key] = pq.read_metadata(path).num_rows
            except Exception as exc:  # noqa: BLE001 - atomic writes make this unexpected; keep the file for a human
                logger.error("spool part %s is unreadable (%s); left in place, not drained", path, exc)
        if self._rows:
            logger.warning("spool %s holds %d parts (%d rows) from before a restart", self.directory, len(self._rows), self.depth)

    # --- state ----------------------------------------------------------------

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

    def _path(self, key: str) -> Path:
        path = (self.directory / key).resolve()
        if self.directory not in path.parents:
            raise ValueError(f"spool key {key!r} escapes the spool folder")
        return path

    # --- writing / draining ------------------------------------------------------

    def put(self, key: str, data: bytes, rows: int) -> None:
        """Store one part durably (fsync'd file and folder); SpoolFull if it does not fit."""
        with self._lock:
            waiting = sum(self._rows.values())
            if waiting + rows > self.max_rows:
                self.full_rejections += 1
                raise SpoolFull(waiting, self.max_rows)
            path = self._path(key)
            atomic_local_write(str(path), data)
            _fsync_dir(path.parent)
            self._rows[key] = rows
            self.spooled += rows

    def read_bytes(self, key: str) -> bytes:
        return self._path(key).read_bytes()

    def read_table(self, prefix: str, columns: list[str] | None = None) -> pa.Table | None:
        """All waiting parts of one stream as one table (None if there are none)."""
        tables = [pq.read_table(self._path(k), columns=columns) for k in self.keys(prefix)]
        return pa.concat_tables(tables, promote_options="default") if tables else None

    def remove(self, key: str) -> None:
        """The part is in the log now: forget it (call only after the log write succeeded)."""
        with self._lock:
            rows = self._rows.pop(key, None)
            path = self._path(key)
            path.unlink(missing_ok=True)
            _fsync_dir(path.parent)
            if rows is not None:
                self.drained += rows

    def stats(self) -> dict[str, int]:
        return {
            "spooled": self.spooled,
            "drained": self.drained,
            "spool_full_rejections": self.full_rejections,
            "spool_depth": self.depth,
            "spool_parts": len(self._rows),
        }
