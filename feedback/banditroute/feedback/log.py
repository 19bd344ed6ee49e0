"""The durable feedback log: Arrow record batches appended as Parquet part files.

Three append-only streams under one storage root (local folder or S3,
through :mod:`banditroute.core.storage`):

====================  ========================  =====================================
prefix                schema                    what
====================  ========================  =====================================
``events/``           ``records.EVENT_SCHEMA``  joined events (rewarded + defaulted):
                                                what the learner trains on and OPE reads
``decisions/``        ``records.DECISION_SCHEMA``  every decision recorded, so pending
                                                decisions survive a restart
``late_rewards/``     :data:`LATE_SCHEMA`       rewards that came after the window
                                                (audit only, never trained on)
====================  ========================  =====================================

Part files are Hive-partitioned by UTC hour and named by write time, so
``pyarrow.dataset``/Spark/Athena read the log as one table, and recovery
lists only the hours it needs::

    events/dt=2025-11-26/hr=14/part-1764166800123-<writer>-00000042.parquet

Every part is written in ONE atomic storage write (local: temp file +
fsync + rename; S3: one PUT), and the feedback actor acknowledges a reward
only after the part holding it has been written.
"""

from __future__ import annotations

import os
import re
import time
import uuid
from datetime import datetime, timedelta, timezone
from typing import Iterable, Sequence

import pyarrow as pa
import pyarrow.parquet as pq

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

EVENTS_PREFIX = "events"
DECISIONS_PREFIX = "decisions"
LATE_PREFIX = "late_rewards"

LATE_SCHEMA = pa.schema(
    [
        ("decision_id", pa.string()),
        ("score", pa.float64()),
        ("cost", pa.float64()),
        ("time", pa.float64()),
        ("finished_as", pa.string()),
    ]
)

_PART_RE = re.compile(r"part-(\d{13})-")
# Scanning hour folders one by one is only worth it for short look-backs.
_MAX_HOURS_SCANNED = 72


def _hour_folder(prefix: str, ts: float) -> str:
    dt = datetime.fromtimestamp(ts, tz=timezone.utc)
    return f"{prefix}/dt={dt:%Y-%m-%d}/hr={dt:%H}"


def part_time(key: str) -> float | None:
    """Write time (unix seconds) encoded in a part key, or None for foreign files."""
    m = _PART_RE.search(key.rsplit("/", 1)[-1])
    return int(m.group(1)) / 1000.0 if m else None


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
        return f"{_hour_folder(prefix, now)}/part-{int(now * 1000):013d}-{self.writer_id}-{self._seq:08d}.parquet"

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
        now = time.time() if now is None else now
        if since is None or (now - since) > _MAX_HOURS_SCANNED * 3600:
            keys = self.storage.list(prefix)
        else:
            keys = []
            hour = datetime.fromtimestamp(since, tz=timezone.utc).replace(minute=0, second=0, microsecond=0)
            end = datetime.fromtimestamp(now, tz=timezone.utc) + timedelta(hours=1)
            while hour <= end:
                keys += self.storage.list(_hour_folder(prefix, hour.timestamp()))
                hour += timedelta(hours=1)
        keys = [k for k in keys if k.endswith(".parquet")]
        if since is not None:
            keys = [k for k in keys if (part_time(k) or 0.0) >= since]
        return sorted(keys, key=lambda k: (part_time(k) or 0.0, k))

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


def first_per_decision(table: pa.Table) -> pa.Table:
    """``table`` without repeated decision ids (the first row of each is kept; needs a decision_id column)."""
    if "decision_id" not in table.column_names or table.num_rows < 2:
        return table
    seen: set[str] = set()
    keep = []
    for did in table.column("decision_id").to_pylist():
        keep.append(did not in seen)
        seen.add(did)
    return table if all(keep) else table.filter(pa.array(keep))


def _conform(table: pa.Table, schema: pa.Schema) -> pa.Table:
    """``table`` in ``schema``'s column order and types; a nullable column it lacks (a part written
    before that column existed, e.g. served_model) is all nulls."""
    columns = []
    for f in schema:
        if f.name in table.column_names:
            columns.append(table.column(f.name).cast(f.type))
        elif f.nullable:
            columns.append(pa.nulls(len(table), f.type))
        else:
            raise KeyError(f"log part lacks the required column {f.name!r}")
    return pa.Table.from_arrays(columns, schema=schema) if columns else schema.empty_table()


def read_parts(storage: Storage, keys: Iterable[str], schema: pa.Schema, columns: Sequence[str] | None = None) -> pa.Table:
    """Concatenate Parquet parts (cast to ``schema``); an empty table when there are none."""
    target = schema if columns is None else pa.schema([schema.field(c) for c in columns])
    tables = []
    for key in keys:
        part = pq.ParquetFile(pa.BufferReader(storage.read_bytes(key)))
        present = set(part.schema_arrow.names)
        tables.append(_conform(part.read(columns=[c for c in target.names if c in present]), target))
    if not tables:
        return target.empty_table()
    return pa.concat_tables(tables)


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
    return first_per_decision(read_parts(storage, sorted(keys, key=lambda k: (part_time(k) or 0.0, k)), EVENT_SCHEMA))
