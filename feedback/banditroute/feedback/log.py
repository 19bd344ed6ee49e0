"""The durable feedback log's writer (and its readers): Arrow record batches appended as Parquet part files.

The layout (three streams ``events/``, ``decisions/``, ``late_rewards/``,
Hive-partitioned by UTC hour, parts named by write time) is defined in
:mod:`banditroute.core.event_log`, shared with the learner's log cursor;
the names are re-exported here for the feedback side.

Every part is written in ONE atomic storage write (local: temp file +
fsync + rename; S3: one PUT), and the feedback actor acknowledges a reward
only after the part holding it has been written. The learner trusts that:
its cursor (:mod:`banditroute.learner.log_cursor`) trains on every
committed part the pushed batches missed.
"""

from __future__ import annotations

import os
import time
import uuid
from typing import Sequence

import pyarrow as pa
import pyarrow.parquet as pq

from banditroute.core.event_log import (  # noqa: F401 - re-exported: the feedback side's names for the layout
    DECISIONS_PREFIX,
    EVENTS_PREFIX,
    LATE_PREFIX,
    LATE_SCHEMA,
    conform as _conform,
    first_per_decision,
    list_parts,
    part_key,
    part_time,
    read_parts,
    sort_parts,
)
from banditroute.core.records import (
    DECISION_SCHEMA,
    EVENT_SCHEMA,
    DecisionRecord,
    JoinedEvent,
    RewardRecord,
    decisions_to_table,
    events_to_table,
)
from banditroute.core.storage import Storage, StorageConfig, open_storage


class EventLog:
    """Append and read the three log streams in one storage root."""

    def __init__(self, storage: Storage, writer_id: str | None = None):
        self.storage = storage
        self.writer_id = writer_id or f"{os.getpid()}{uuid.uuid4().hex[:6]}"
        self._seq = 0

    @classmethod
    def open(cls, config: StorageConfig | str) -> "EventLog":
        return cls(open_storage(config))

    # --- writing ------------------------------------------------------------

    def _part_key(self, prefix: str, now: float) -> str:
        self._seq += 1
        return part_key(prefix, now, self.writer_id, self._seq)

    def part_key(self, prefix: str, now: float | None = None) -> str:
        """A fresh key for a part of stream ``prefix`` (what a spooled part will be called in the log)."""
        return self._part_key(prefix, time.time() if now is None else now)

    def write_table(self, key: str, table: pa.Table) -> None:
        """Write a part under a key from :meth:`part_key` (replaces an object of that key)."""
        self.storage.write_parquet(key, table)

    def write_part(self, key: str, data: bytes) -> None:
        """Write an already-encoded Parquet part under ``key`` (replaces it: repeating a drain is harmless)."""
        self.storage.write_bytes(key, data)

    def _append(self, prefix: str, table: pa.Table, now: float | None) -> str:
        key = self._part_key(prefix, time.time() if now is None else now)
        self.storage.write_parquet(key, table)
        return key

    def append_events(self, events: Sequence[JoinedEvent], now: float | None = None) -> str:
        return self._append(EVENTS_PREFIX, events_to_table(events), now)

    def append_decisions(self, decisions: Sequence[DecisionRecord], now: float | None = None) -> str:
        return self._append(DECISIONS_PREFIX, decisions_to_table(decisions), now)

    def append_late(self, rewards: Sequence[tuple[RewardRecord, str]], now: float | None = None) -> str:
        rows = [
            {"decision_id": r.decision_id, "score": float(r.score), "cost": r.cost, "time": float(r.time), "finished_as": why}
            for r, why in rewards
        ]
        return self._append(LATE_PREFIX, pa.Table.from_pylist(rows, schema=LATE_SCHEMA), now)

    # --- reading ------------------------------------------------------------

    def list_parts(self, prefix: str, since: float | None = None, now: float | None = None) -> list[str]:
        """Part keys of one stream in write order; with ``since``, only parts written at or after it."""
        return list_parts(self.storage, prefix, since, now)

    def read(self, prefix: str, schema: pa.Schema, since: float | None = None, columns: Sequence[str] | None = None) -> pa.Table:
        keys = self.list_parts(prefix, since)
        return read_parts(self.storage, keys, schema, columns)

    def read_events(self, since: float | None = None, columns: Sequence[str] | None = None, dedupe: bool = True) -> pa.Table:
        """Joined events, oldest part first; with ``dedupe`` each decision id once (its first row).

        Writes are at-least-once at the storage level (a write that failed may
        have landed, and a client's retry writes again); the join makes the
        first reward win, so readers keep the first row per decision id.
        """
        table = self.read(EVENTS_PREFIX, EVENT_SCHEMA, since, columns)
        return first_per_decision(table) if dedupe else table

    def read_decisions(self, since: float | None = None, columns: Sequence[str] | None = None) -> pa.Table:
        return self.read(DECISIONS_PREFIX, DECISION_SCHEMA, since, columns)

    def read_late(self, since: float | None = None) -> pa.Table:
        return self.read(LATE_PREFIX, LATE_SCHEMA, since)

    def count_rows(self, prefix: str = EVENTS_PREFIX) -> int:
        """Rows in a stream, from the Parquet footers."""
        total = 0
        for key in self.list_parts(prefix):
            total += pq.ParquetFile(pa.BufferReader(self.storage.read_bytes(key))).metadata.num_rows
        return total


def read_event_log(location: str, endpoint_url: str | None = None) -> pa.Table:
    """Joined events from a log root, its ``events/`` folder, or a single Parquet file (path or URI).

    A root or folder is read recursively; S3 URIs take ``endpoint_url`` for
    MinIO/moto. Used by `banditroute ope --events`.
    """
    if "://" not in location and os.path.isfile(location):
        return first_per_decision(_conform(pq.read_table(location), EVENT_SCHEMA))
    if location.endswith(".parquet"):
        parent, name = location.rstrip("/").rsplit("/", 1)
        storage = open_storage(StorageConfig(uri=parent, endpoint_url=endpoint_url))
        return first_per_decision(read_parts(storage, [name], EVENT_SCHEMA))
    storage = open_storage(StorageConfig(uri=location, endpoint_url=endpoint_url))
    keys = [k for k in storage.list("") if k.endswith(".parquet")]
    events = [k for k in keys if k.startswith(EVENTS_PREFIX + "/")]
    keys = events or [k for k in keys if not k.startswith((DECISIONS_PREFIX + "/", LATE_PREFIX + "/"))]
    if not keys:
        raise FileNotFoundError(f"{location}: no Parquet event files found")
    return first_per_decision(read_parts(storage, sort_parts(keys), EVENT_SCHEMA))
