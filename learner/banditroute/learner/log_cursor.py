"""The learner's cursor over the committed event log: train on whatever the pushed batches missed.

The feedback actor pushes joined events to the learner in micro-batches for
freshness, but a push is best effort: an actor that dies between the ack
and the learner loses it. The durable log (:mod:`banditroute.core.event_log`)
is what the learner trusts. Like a log consumer, the learner keeps a cursor
over the committed ``events/`` parts and, every ``interval_s`` and at start,
reads the parts it has not consumed yet and trains on the events in them it
has not trained on yet (by decision id, whichever way they came first).

Delivery is at-least-once (push + log); training is exactly once per
learner lifetime (the id filter). The cursor's state is saved with every
checkpoint (``log_cursor.json`` in the checkpoint folder, named by the
manifest's ``log_cursor`` field) under the same lock as the weights, so a
restarted learner resumes from exactly what its weights hold: events trained
after that checkpoint are trained again (their training was lost with the
process), nothing before it is.

:class:`LogCursor` is a pure state machine (time injected, no I/O; the reading,
the background pass and the checkpoint file are :mod:`banditroute.learner.log_follower`):

- ``watermark``: every part whose name's time is below it is settled
  (consumed, or never visible within ``settle_s`` of its write);
- ``consumed``: the parts at or above the watermark already read;
- ``pending``: ids trained from a push whose part the cursor has not read
  yet (the part's other events still need the log); saved with the cursor;
- ``recent``: every id trained in the last ``2 * settle_s`` (memory only),
  so a late push of an event the cursor already trained is dropped.

Parts become visible out of name order (two writes in flight, a spool
drained after an outage), so the cursor remembers consumed parts instead of
one position, and moves the watermark only ``settle_s`` behind the clock.
A part that becomes visible later than that (a spool drained after a longer
storage outage) is read only if its events were pushed; offline retraining
(`banditroute train-from-log`) reads the whole log.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Sequence

import numpy as np

from banditroute.core.event_log import part_time


@dataclass
class LogCursorConfig:
    """The learner's cursor over the committed event log (``learner.log_cursor``)."""

    enabled: bool = True
    """Train on committed log parts the pushed batches missed (False: pushed batches only)."""
    interval_s: float = 5.0
    """Seconds between catch-up passes over the log (one also runs as the learner starts)."""
    min_age_s: float = 2.0
    """A part is read once its name's time is this old, so the push of its events normally lands first."""
    settle_s: float = 120.0
    """How late after its name's time a part may still become visible and be read; the watermark trails the clock by this."""
    max_rows_per_update: int = 512
    """Most log events per learner update during a catch-up pass."""

    def validate(self) -> None:
        if self.interval_s <= 0:
            raise ValueError("learner.log_cursor.interval_s must be > 0")
        if self.min_age_s < 0:
            raise ValueError("learner.log_cursor.min_age_s must be >= 0")
        if self.settle_s <= self.min_age_s:
            raise ValueError("learner.log_cursor.settle_s must be > learner.log_cursor.min_age_s")
        if self.max_rows_per_update < 1:
            raise ValueError("learner.log_cursor.max_rows_per_update must be >= 1")


class LogCursor:
    """Which log parts and decision ids this learner's weights hold (see the module docstring)."""

    def __init__(self, config: LogCursorConfig, watermark: float = 0.0):
        self.config = config
        self.watermark = float(watermark)
        self.consumed: dict[str, float] = {}
        self.pending: dict[str, float] = {}
        self.recent: dict[str, float] = {}
        self.counters = {"passes": 0, "parts_read": 0, "events_from_log": 0, "duplicates_dropped": 0, "read_errors": 0}

    # --- ids ------------------------------------------------------------------

    def unseen(self, ids: Sequence[str]) -> np.ndarray:
        """Mask of the ids not trained yet (nor earlier in ``ids``)."""
        seen: set[str] = set()
        mask = np.zeros(len(ids), dtype=bool)
        for i, did in enumerate(ids):
            mask[i] = did not in self.recent and did not in seen
            seen.add(did)
        return mask

    def pushed(self, ids: Iterable[str], now: float) -> None:
        """Ids taken for training (or hold-out) before their part is read: the part still has to be read for the others."""
        for did in ids:
            self.recent.setdefault(did, now)
            self.pending.setdefault(did, now)

    # --- parts ----------------------------------------------------------------

    def due(self, listed: Iterable[str], now: float) -> list[str]:
        """Listed parts to read now: not consumed, at or above the watermark, at least ``min_age_s`` old."""
        out = []
        for key in listed:
            t = part_time(key)
            if t is None or key in self.consumed or t < self.watermark or t > now - self.config.min_age_s:
                continue
            out.append(key)
        return sorted(out, key=lambda k: (part_time(k), k))

    def consume(self, key: str, ids: Iterable[str], now: float, events_trained: int = 0) -> None:
        """Part ``key`` is read and every id in it trained: its ids are no longer pending."""
        self.consumed[key] = part_time(key) or 0.0
        for did in ids:
            self.recent.setdefault(did, now)
            self.pending.pop(did, None)
        self.counters["parts_read"] += 1
        self.counters["events_from_log"] += int(events_trained)

    def advance(self, now: float, blocked: Iterable[str] = ()) -> float:
        """Move the watermark to ``settle_s`` behind ``now`` (never past a ``blocked`` part); forget what it passed."""
        target = now - self.config.settle_s
        for key in blocked:
            target = min(target, part_time(key) or target)
        if target > self.watermark:
            self.watermark = target
            self.consumed = {k: t for k, t in self.consumed.items() if t >= target}
        # An id is looked for in parts until they fall below the watermark, which trails its training by settle_s.
        horizon = self.watermark - self.config.settle_s
        self.recent = {d: t for d, t in self.recent.items() if t >= horizon}
        self.pending = {d: t for d, t in self.pending.items() if t >= horizon}
        self.counters["passes"] += 1
        return self.watermark

    # --- persistence ----------------------------------------------------------

    def state(self) -> dict[str, Any]:
        """What a checkpoint saves: enough to resume exactly where these weights are."""
        return {"watermark": self.watermark, "consumed": sorted(self.consumed), "pending": dict(self.pending)}

    @classmethod
    def from_state(cls, config: LogCursorConfig, state: dict[str, Any]) -> "LogCursor":
        cursor = cls(config, float(state.get("watermark", 0.0)))
        cursor.consumed = {k: part_time(k) or 0.0 for k in state.get("consumed", [])}
        cursor.pending = {str(d): float(t) for d, t in dict(state.get("pending", {})).items()}
        cursor.recent = dict(cursor.pending)
        return cursor

    def stats(self) -> dict[str, Any]:
        return {**self.counters, "watermark": self.watermark, "consumed_parts": len(self.consumed),
                "pending_ids": len(self.pending), "recent_ids": len(self.recent)}
