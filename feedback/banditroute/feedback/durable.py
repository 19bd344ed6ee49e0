"""Durable log writes that survive a storage outage: the log, or the shared spool until storage returns.

:class:`SpoolingWriter` is what the feedback service's group committers
call (in a worker thread). While storage answers, a part goes straight to
the event log. When storage refuses (``StorageUnavailable``), the part goes
to the bounded :class:`~banditroute.feedback.spool.Spool` on shared
storage under the key it would have had in the log, and later parts queue behind it
so the log keeps its order; :meth:`SpoolingWriter.drain` copies them to the
log, oldest first, once storage answers again.
"""

from __future__ import annotations

import logging
from typing import Any

import pyarrow as pa

from banditroute.core.storage import StorageUnavailable
from banditroute.feedback.log import EventLog
from banditroute.feedback.spool import Spool, table_to_parquet_bytes

logger = logging.getLogger(__name__)

# stats() of a writer without a spool: the same keys, all zero.
_NO_SPOOL_STATS = {"spooled": 0, "drained": 0, "spool_full_rejections": 0, "spool_depth": 0, "spool_parts": 0}


class SpoolingWriter:
    """Writes log parts to ``log``, or to ``spool`` while storage is unavailable (None: no spool, errors propagate)."""

    def __init__(self, log: EventLog, spool: Spool | None):
        self.log = log
        self.spool = spool
        self.storage_errors = 0
        self.last_storage_error: str | None = None

    def note_storage_error(self, exc: BaseException) -> None:
        self.storage_errors += 1
        self.last_storage_error = str(exc)[:500]

    def write(self, prefix: str, part: pa.Table) -> str:
        """Write one part to the log, or to the spool while the log's storage is unavailable; returns its log key.

        While parts wait in the spool, new parts queue behind them (no storage
        call per request during an outage; the drain keeps the log's order).
        A write that failed may still have landed (the connection broke after
        the object was stored), so the part is spooled under the SAME key: the
        drain then replaces that object instead of adding a second copy.
        Raises SpoolFull when the spool has no room, other errors as they come.
        """
        key = self.log.part_key(prefix)
        if self.spool is None:
            self.log.write_table(key, part)
            return key
        if not self.spool.active:
            try:
                self.log.write_table(key, part)
                return key
            except StorageUnavailable as exc:
                self.note_storage_error(exc)
                logger.warning("storage unavailable; spooling %s parts to %s until it returns (%s)", prefix,
                               self.spool.location, exc)
        self.spool.put(key, table_to_parquet_bytes(part), part.num_rows)
        return key

    def drain(self) -> int:
        """Copy spooled parts to the log, oldest first, until empty or storage fails (blocking; rows drained).

        A part leaves the spool only after its log write succeeded; a repeat
        writes the same key again (replaces the object), so no duplicates.
        """
        if self.spool is None:
            return 0
        drained = 0
        try:
            self.spool.load()
        except StorageUnavailable as exc:  # the spool's own storage is down: try again next time
            self.note_storage_error(exc)
            return 0
        for key in self.spool.keys():
            try:
                data = self.spool.read_bytes(key)
            except FileNotFoundError:  # another drain (an old instance of the actor) moved it already
                self.spool.forget(key)
                continue
            except StorageUnavailable as exc:
                self.note_storage_error(exc)
                break
            try:
                self.log.write_part(key, data)
            except StorageUnavailable as exc:  # the part stays; the next drain repeats it
                self.note_storage_error(exc)
                break
            before = self.spool.drained
            self.spool.remove(key)
            drained += self.spool.drained - before
        return drained

    def stats(self) -> dict[str, Any]:
        return {
            **(self.spool.stats() if self.spool is not None else _NO_SPOOL_STATS),
            "spool_location": self.spool.location if self.spool is not None else None,
            "storage_errors": self.storage_errors,
            "last_storage_error": self.last_storage_error,
        }
