"""The durable event log's layout on storage: part naming, listing committed parts in order, reading parts.

The feedback actor WRITES the log (:mod:`banditroute.feedback.log`); the
learner's cursor (:mod:`banditroute.learner.log_cursor`), OPE and offline
retraining READ it. Both sides need the same layout, so it lives here, below
both (feedback/ and learner/ never import each other).

Three append-only streams under one storage root:

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

Part files are Hive-partitioned by UTC hour and named by write time::

    events/dt=2025-11-26/hr=14/part-1764166800123-<writer>-00000042.parquet

A part is COMMITTED once it is listed: every part is written in one atomic
storage write (local: temp file + fsync + rename; S3: one PUT), so a reader
never sees half a part. Parts can become visible out of name order (two
writes in flight, a spool drained after a storage outage), which is why the
learner's cursor remembers the parts it consumed instead of one position.
"""

from __future__ import annotations

import re
import time
from datetime import datetime, timedelta, timezone
from typing import Iterable, Sequence

import pyarrow as pa
import pyarrow.parquet as pq

from banditroute.core.records import EVENT_SCHEMA
from banditroute.core.storage import Storage

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
MAX_HOURS_SCANNED = 72


def hour_folder(prefix: str, ts: float) -> str:
    """The folder of stream ``prefix`` that holds parts written at unix time ``ts``."""
    dt = datetime.fromtimestamp(ts, tz=timezone.utc)
    return f"{prefix}/dt={dt:%Y-%m-%d}/hr={dt:%H}"


def part_key(prefix: str, now: float, writer_id: str, seq: int) -> str:
    """The key of a writer's ``seq``-th part of stream ``prefix``, written at ``now``."""
    return f"{hour_folder(prefix, now)}/part-{int(now * 1000):013d}-{writer_id}-{seq:08d}.parquet"


def part_time(key: str) -> float | None:
    """Write time (unix seconds) encoded in a part key, or None for foreign files."""
    m = _PART_RE.search(key.rsplit("/", 1)[-1])
    return int(m.group(1)) / 1000.0 if m else None


def sort_parts(keys: Iterable[str]) -> list[str]:
    """Part keys in write order (ties by key)."""
    return sorted(keys, key=lambda k: (part_time(k) or 0.0, k))


def list_parts(storage: Storage, prefix: str, since: float | None = None, now: float | None = None) -> list[str]:
    """Committed part keys of one stream in write order; with ``since``, only parts written at or after it.

    A short look-back lists only the hour folders it needs (one LIST each).
    """
    now = time.time() if now is None else now
    if since is None or (now - since) > MAX_HOURS_SCANNED * 3600:
        keys = storage.list(prefix)
    else:
        keys = []
        hour = datetime.fromtimestamp(since, tz=timezone.utc).replace(minute=0, second=0, microsecond=0)
        end = datetime.fromtimestamp(now, tz=timezone.utc) + timedelta(hours=1)
        while hour <= end:
            keys += storage.list(hour_folder(prefix, hour.timestamp()))
            hour += timedelta(hours=1)
    keys = [k for k in keys if k.endswith(".parquet")]
    if since is not None:
        keys = [k for k in keys if (part_time(k) or 0.0) >= since]
    return sort_parts(keys)


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


def conform(table: pa.Table, schema: pa.Schema) -> pa.Table:
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


def read_part(storage: Storage, key: str, schema: pa.Schema = EVENT_SCHEMA, columns: Sequence[str] | None = None) -> pa.Table:
    """One Parquet part as an Arrow table in ``schema`` (or its ``columns``)."""
    target = schema if columns is None else pa.schema([schema.field(c) for c in columns])
    part = pq.ParquetFile(pa.BufferReader(storage.read_bytes(key)))
    present = set(part.schema_arrow.names)
    return conform(part.read(columns=[c for c in target.names if c in present]), target)


def read_parts(storage: Storage, keys: Iterable[str], schema: pa.Schema, columns: Sequence[str] | None = None) -> pa.Table:
    """Concatenate Parquet parts (cast to ``schema``); an empty table when there are none."""
    tables = [read_part(storage, key, schema, columns) for key in keys]
    if not tables:
        return (schema if columns is None else pa.schema([schema.field(c) for c in columns])).empty_table()
    return pa.concat_tables(tables)
