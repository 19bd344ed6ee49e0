"""The learner actor's log consumer: catch-up passes over the event log, the push filter, the cursor in checkpoints.

The pure state (which parts and ids the weights hold) is
:class:`~banditroute.learner.log_cursor.LogCursor`; this module does its
I/O. The learner actor's intake (``update``) passes every batch through
:meth:`LogFollower.take` (drops ids already trained, marks the rest) under
its lock; :meth:`LogFollower.start` runs catch-up passes in a background
thread (one at start, then every ``interval_s``) that feed the parts' untrained
events through the same ``update``; the cursor is saved with each checkpoint
(:meth:`LogFollower.save`) under the actor's lock, so it always matches the
weights: every id marked is in the weights or in the same critical section.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any, Callable

import pyarrow as pa

from banditroute.core.event_log import EVENTS_PREFIX, first_per_decision, list_parts, read_part
from banditroute.core.storage import Storage, StorageConfig, open_storage
from banditroute.learner.checkpoint import checkpoint_dir, list_checkpoints, read_manifest
from banditroute.learner.log_cursor import LogCursor, LogCursorConfig

logger = logging.getLogger(__name__)

CURSOR_FILE = "log_cursor.json"
"""The cursor's state in a checkpoint folder (the manifest's ``log_cursor`` field names it)."""


def catch_up(cursor: LogCursor, log: Storage, now: float, train: Callable[[pa.Table], Any],
             lock: Any = None) -> dict[str, int]:
    """Read every due part of ``log``'s events stream, ``train`` on the events not trained yet, advance.

    ``train`` is the learner's intake (``LearnerActor.update``): it filters
    and marks ids itself under the learner's lock, so an event pushed while
    this pass reads its part is trained once. ``lock`` guards the cursor
    only and is never held while training. A part that cannot be read stops
    the pass and holds the watermark below it (the next pass retries it).
    """
    lock = lock if lock is not None else threading.RLock()
    trained = 0
    blocked: list[str] = []
    with lock:
        since = cursor.watermark or None
    keys = list_parts(log, EVENTS_PREFIX, since=since, now=now)
    with lock:
        keys = cursor.due(keys, now)
    for i, key in enumerate(keys):
        try:
            table = first_per_decision(read_part(log, key))
        except Exception as exc:  # noqa: BLE001 - storage outage or a bad part: retried next pass
            cursor.counters["read_errors"] += 1
            logger.warning("log cursor: cannot read %s (%s); retrying next pass", key, exc)
            blocked = keys[i:]
            break
        ids = table.column("decision_id").to_pylist()
        with lock:
            fresh = table.filter(pa.array(cursor.unseen(ids)))
        step = cursor.config.max_rows_per_update
        for start in range(0, len(fresh), step):
            train(fresh.slice(start, step))
        with lock:
            cursor.consume(key, ids, now, len(fresh))
        trained += len(fresh)
    with lock:
        cursor.advance(now, blocked)
    return {"parts": len(keys) - len(blocked), "events": trained, "blocked": len(blocked)}


def load_cursor(ckpt: Storage | None, version: int, config: LogCursorConfig, fallback_watermark: float = 0.0) -> LogCursor:
    """The cursor saved with checkpoint ``version``; without one (none, or an older checkpoint), one at ``fallback_watermark``."""
    if ckpt is not None and version in list_checkpoints(ckpt):
        name = read_manifest(ckpt, version).get("log_cursor")
        if name:
            try:
                return LogCursor.from_state(config, ckpt.read_json(f"{checkpoint_dir(version)}/{name}"))
            except FileNotFoundError:
                logger.warning("checkpoint v%d names a log cursor file it lacks", version)
    return LogCursor(config, fallback_watermark)


class LogFollower:
    """A learner's cursor over the event log at ``log`` (None, or disabled: pushes only, no filter)."""

    def __init__(self, config: LogCursorConfig, log: Storage | None, cursor: LogCursor,
                 clock: Callable[[], float] = time.time):
        self.config = config
        self.log = log if config.enabled else None
        self.cursor = cursor
        self.clock = clock
        self.last_pass: dict[str, Any] | None = None
        self.last_error: str | None = None
        self._lock = threading.RLock()  # the cursor's own: never held while training
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @classmethod
    def resume(cls, config: LogCursorConfig, storage: StorageConfig | None, ckpt: Storage | None, learner: Any) -> "LogFollower":
        """The follower of a just-resumed ``learner`` (its weights came from checkpoint ``policy_version``, if one is).

        ``storage`` is the log's root (the learner's storage); None: no log, pushes only.
        Without a saved cursor (no checkpoint, or an older one) the cursor starts at the
        weights' ``trained_through`` (a fresh policy: 0, the whole log).
        """
        log = open_storage(storage) if storage is not None else None
        resumed_version, fallback_watermark = int(learner.policy_version), float(learner.trained_through)
        try:
            cursor = load_cursor(ckpt, resumed_version, config, fallback_watermark)
        except Exception as exc:  # noqa: BLE001 - storage outage at start: the fallback only re-reads more
            logger.warning("could not read the log cursor of v%d: %s", resumed_version, exc)
            cursor = LogCursor(config, fallback_watermark)
        return cls(config, log, cursor)

    # --- intake (the learner's update calls this under its lock) -----------------

    def take(self, events: Any) -> tuple[Any, int]:
        """``events`` minus those already trained (by decision id), now marked trained; and how many were dropped."""
        if self.log is None or not isinstance(events, pa.Table) or not len(events) or "decision_id" not in events.column_names:
            return events, 0
        ids = events.column("decision_id").to_pylist()
        with self._lock:
            mask = self.cursor.unseen(ids)
            self.cursor.pushed([d for d, keep in zip(ids, mask) if keep], self.clock())
        dropped = int(len(mask) - mask.sum())
        self.cursor.counters["duplicates_dropped"] += dropped
        return (events.filter(pa.array(mask)) if dropped else events), dropped

    # --- catch-up ------------------------------------------------------------------

    def catch_up(self, train: Callable[[pa.Table], Any]) -> dict[str, int]:
        """One pass now (blocking)."""
        if self.log is None:
            return {"parts": 0, "events": 0, "blocked": 0}
        result = catch_up(self.cursor, self.log, self.clock(), train, self._lock)
        self.last_pass = {**result, "at": self.clock()}
        return result

    def start(self, train: Callable[[pa.Table], Any]) -> None:
        """Background passes: one at once, then every ``interval_s`` (a daemon thread)."""
        if self.log is None or self._thread is not None:
            return

        def loop() -> None:
            while True:
                try:
                    result = self.catch_up(train)
                    if result["events"]:
                        logger.info("log cursor trained %d events from %d parts the pushes missed",
                                    result["events"], result["parts"])
                    self.last_error = None
                except Exception as exc:  # noqa: BLE001 - the next pass retries
                    self.last_error = f"{type(exc).__name__}: {exc}"[:300]
                    logger.warning("log cursor pass failed: %s", self.last_error)
                if self._stop.wait(self.config.interval_s):
                    return

        self._thread = threading.Thread(target=loop, name="banditroute-log-cursor", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    # --- checkpoints (call under the learner's lock) -------------------------------

    def save(self, ckpt: Storage, version: int) -> dict[str, Any]:
        """Write the cursor into checkpoint folder ``version`` (before its manifest); the manifest fields."""
        if self.log is None:
            return {}
        with self._lock:
            state = self.cursor.state()
        ckpt.write_json(f"{checkpoint_dir(version)}/{CURSOR_FILE}", state)
        return {"log_cursor": CURSOR_FILE, "log_watermark": self.cursor.watermark}

    def stats(self) -> dict[str, Any]:
        with self._lock:
            cursor = self.cursor.stats()
        return {"enabled": self.log is not None, **cursor, "last_pass": self.last_pass,
                "last_error": self.last_error}
