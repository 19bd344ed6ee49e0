"""The feedback service: join + durable log + batches to the learner (asyncio, no Ray).

:class:`FeedbackService` is what the feedback actor runs; it is plain
asyncio so its ordering guarantees are tested without a cluster:

1. ``record_decisions``: decisions from router replicas start waiting for
   their reward at once, and are appended to the decision log (group
   commit) so that pending decisions survive a restart.
2. ``submit_reward``: joins the reward to its decision (first reward wins),
   appends the joined event to the event log, and returns ``accepted`` only
   AFTER that write has completed. A failed write un-joins the reward
   (``unavailable``; the client retries). Rewards for ids not seen yet wait
   up to ``unknown_grace_s`` for their decision (a replica's decision record
   can trail the client's reward by a few milliseconds).
3. Committed events go to a :class:`MicroBatcher`; a background loop hands
   due batches (size or max delay) to the learner, one call in flight at a
   time (backpressure: while the learner is busy, the next batch grows).
4. A sweep closes expired windows (default reward or drop) every
   ``sweep_interval_s``.
5. Storage outages: a write that storage refuses (``StorageUnavailable``)
   goes to a bounded, fsync'd spool on local disk (``feedback/spool.py``)
   and is acknowledged from there; a background loop drains the spool to
   the log in order when storage answers again. A full spool is
   back-pressure: rewards answer 'unavailable' ("event buffer full ...")
   and decision batches raise (the replicas answer 503).

Recovery (``recover()``, at start): the event log tells which decisions
finished (rewarded/defaulted); the decision log of the last window gives the
decisions still pending. Both reads are bounded by time (the log is
partitioned by hour). Acknowledged events are in the log by construction;
events acknowledged but not yet delivered to the learner when the process
died are NOT re-sent to the learner (at-most-once to the learner, exactly
once in the log; OPE and offline retraining read the log).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import math
import tempfile
import time
from pathlib import Path
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable, Sequence

import pyarrow as pa

from banditroute.feedback.batching import GroupCommitter, MicroBatcher
from banditroute.feedback.join import (
    JoinConfig,
    RewardJoiner,
    RewardStatus,
    RewardValidationError,
)
from banditroute.feedback.log import DECISIONS_PREFIX, EVENTS_PREFIX, LATE_PREFIX, LATE_SCHEMA, EventLog
from banditroute.feedback.spool import LocalSpool, SpoolFull, table_to_parquet_bytes
from banditroute.core.records import (
    DECISION_SCHEMA,
    DecisionRecord,
    JoinedEvent,
    RewardRecord,
    decisions_from_table,
    decisions_to_table,
    events_to_table,
)
from banditroute.core.storage import StorageUnavailable

logger = logging.getLogger(__name__)

# Slack between a decision's time and the write time of the decision-log part holding it.
_DECISION_LOG_SLACK_S = 120.0


@dataclass
class FeedbackConfig:
    """The feedback actor: join, durable log writes, batches to the learner."""

    join: JoinConfig = field(default_factory=JoinConfig)
    """Reward window, expiry policy and memory bounds of the join."""
    event_flush_wait_s: float = 0.0
    """Group commit: extra seconds the event writer waits to gather rewards (0: whatever arrived while the previous write ran)."""
    decision_flush_wait_s: float = 0.0
    """Group commit: extra seconds the decision writer waits to gather decisions (0: whatever arrived meanwhile)."""
    max_rows_per_part: int = 20_000
    """Most rows in one Parquet part file."""
    learner_batch_size: int = 32
    """A batch goes to the learner once it has this many events ..."""
    learner_max_delay_s: float = 0.1
    """... or once its oldest event has waited this long (seconds)."""
    learner_max_batch: int = 2048
    """Most events in one learner update (a backlog is split)."""
    learner_max_backlog: int = 200_000
    """Most events queued for the learner; beyond it the oldest are skipped (they stay in the log)."""
    send_to_learner: bool = True
    """Hand committed events to the learner actor (off: log only)."""
    unknown_grace_s: float = 2.0
    """Seconds a reward for a not-yet-seen decision id waits for the decision record before 'unknown'."""
    sweep_interval_s: float = 1.0
    """Seconds between window-expiry sweeps."""
    recover_on_start: bool = True
    """Rebuild pending/finished decisions from the logs when the actor starts."""
    spool_dir: str | None = None
    """Local folder for log parts written while storage is unavailable (fsync'd, drained in order when it returns); None = <temp dir>/banditroute-spool/<hash of the log URI>, which a restarted actor on the same node finds again."""
    spool_max_events: int = 100_000
    """Most rows (events + decisions) waiting in the spool; beyond it rewards get 503 'event buffer full' and decision batches fail (0 = no spool: a write storage refuses answers 'unavailable')."""
    spool_drain_interval_s: float = 1.0
    """Seconds between tries to drain the spool to storage (and to finish a recovery that a storage outage interrupted)."""

    def validate(self) -> None:
        self.join.validate()
        for name in ("event_flush_wait_s", "decision_flush_wait_s", "learner_max_delay_s", "unknown_grace_s"):
            value = getattr(self, name)
            if not (value >= 0 and math.isfinite(value)):
                raise ValueError(f"feedback.{name} must be >= 0")
        if self.sweep_interval_s <= 0:
            raise ValueError("feedback.sweep_interval_s must be > 0")
        if not (self.spool_drain_interval_s > 0 and math.isfinite(self.spool_drain_interval_s)):
            raise ValueError("feedback.spool_drain_interval_s must be > 0")
        if self.spool_max_events < 0:
            raise ValueError("feedback.spool_max_events must be >= 0")
        if self.spool_dir is not None and not str(self.spool_dir).strip():
            raise ValueError("feedback.spool_dir must be a folder path or null")
        for name in ("max_rows_per_part", "learner_batch_size", "learner_max_batch", "learner_max_backlog"):
            if getattr(self, name) < 1:
                raise ValueError(f"feedback.{name} must be >= 1")


Deliver = Callable[[pa.Table], Awaitable[Any]]


class BatchRejected(Exception):
    """Raised by a ``deliver`` callback when the learner is reachable but failed on this batch (not retried)."""


def default_spool_dir(log_uri: str) -> str:
    """<temp dir>/banditroute-spool/<hash of the log URI>: stable across restarts on one node, one per log."""
    digest = hashlib.sha256(log_uri.encode("utf-8")).hexdigest()[:16]
    return str(Path(tempfile.gettempdir()) / "banditroute-spool" / digest)


class FeedbackService:
    def __init__(
        self,
        config: FeedbackConfig,
        log: EventLog,
        deliver: Deliver | None = None,
        clock: Callable[[], float] = time.time,
    ):
        config.validate()
        self.config = config
        self.log = log
        self.deliver = deliver if config.send_to_learner else None
        self.clock = clock
        self.joiner = RewardJoiner(config.join)
        self.batcher: MicroBatcher[JoinedEvent] = MicroBatcher(
            config.learner_batch_size, config.learner_max_delay_s, config.learner_max_batch
        )
        self._events = GroupCommitter(self._write_events, config.event_flush_wait_s, config.max_rows_per_part)
        self._decisions = GroupCommitter(self._write_decisions, config.decision_flush_wait_s, config.max_rows_per_part)
        self._late = GroupCommitter(self._write_late, config.event_flush_wait_s, config.max_rows_per_part)
        self._arrivals: dict[str, asyncio.Event] = {}
        self._inflight: dict[str, asyncio.Future] = {}
        self.spool: LocalSpool | None = None
        if config.spool_max_events > 0:
            self.spool = LocalSpool(config.spool_dir or default_spool_dir(log.storage.uri_for()), config.spool_max_events)
        # True while recover() could not read the log (storage down): rewards for ids it would have restored wait.
        self.recovery_pending = False
        self.storage_errors = 0
        self.last_storage_error: str | None = None
        self._deliver_lock: asyncio.Lock | None = None
        self._ship_wakeup: asyncio.Event | None = None
        self._tasks: list[asyncio.Task] = []
        self.delivery: dict[str, Any] = {
            "batches_sent": 0, "events_sent": 0, "learner_errors": 0, "events_skipped_backlog": 0,
            "batches_rejected": 0, "events_rejected": 0,
            "last_learner_error": None, "last_metrics": None,
        }
        self.recovered: dict[str, int] = {}

    # --- lifecycle ------------------------------------------------------------

    def recover(self) -> dict[str, int]:
        """Rebuild join state from the logs and the spool (synchronous; call before serving).

        Spooled parts count like logged ones (they were acknowledged). When
        storage is unavailable, the spool alone is restored, ``recovery_pending``
        is set and the drain loop finishes the recovery once storage answers;
        meanwhile rewards for ids not known yet answer 'unavailable' (not
        'unknown'), so a retried reward can never be accepted twice.
        """
        now = self.clock()
        finished, decisions = self._spooled_state()
        try:
            log_finished, log_decisions = self._logged_state(now)
        except StorageUnavailable as exc:
            if self.spool is None:
                raise
            self._note_storage_error(exc)
            self.recovery_pending = True
            pending = self.joiner.restore(decisions, finished, now)
            self.recovered = {"finished": len(finished), "decisions_read": len(decisions), "pending": pending,
                              "storage_unavailable": 1}
            logger.warning("feedback recovery: storage unavailable (%s); restored the spool only, will retry", exc)
            return self.recovered
        finished = {**log_finished, **finished}
        decisions = log_decisions + decisions
        pending = self.joiner.restore(decisions, finished, now)
        self.recovery_pending = False
        self.recovered = {"finished": len(finished), "decisions_read": len(decisions), "pending": pending}
        return self.recovered

    def _logged_state(self, now: float) -> tuple[dict[str, str], list[DecisionRecord]]:
        cfg = self.config.join
        finished_tbl = self.log.read_events(
            since=now - cfg.window_s - cfg.remember_s - _DECISION_LOG_SLACK_S, columns=["decision_id", "join_status"]
        )
        finished = dict(zip(finished_tbl.column("decision_id").to_pylist(), finished_tbl.column("join_status").to_pylist()))
        decisions = decisions_from_table(self.log.read_decisions(since=now - cfg.window_s - _DECISION_LOG_SLACK_S))
        return finished, decisions

    def _spooled_state(self) -> tuple[dict[str, str], list[DecisionRecord]]:
        if self.spool is None:
            return {}, []
        events = self.spool.read_table(EVENTS_PREFIX, ["decision_id", "join_status"])
        finished = {} if events is None else dict(zip(events.column("decision_id").to_pylist(), events.column("join_status").to_pylist()))
        decisions_tbl = self.spool.read_table(DECISIONS_PREFIX)
        decisions = [] if decisions_tbl is None else decisions_from_table(decisions_tbl.select(DECISION_SCHEMA.names).cast(DECISION_SCHEMA))
        return finished, decisions

    def start(self) -> None:
        """Start the background loops (needs a running event loop; idempotent)."""
        if self._tasks and not all(t.done() for t in self._tasks):
            return
        self._deliver_lock = asyncio.Lock()
        self._ship_wakeup = asyncio.Event()
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._sweep_loop()), loop.create_task(self._ship_loop())]
        self._tasks.append(loop.create_task(self._drain_loop()))

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            try:
                await task
            except (asyncio.CancelledError, Exception):  # noqa: BLE001
                pass
        self._tasks = []

    # --- durable writes (run in a worker thread by the group committers) -----

    def _write_events(self, events: list[JoinedEvent]) -> str:
        return self._durable(EVENTS_PREFIX, events_to_table(events))

    def _write_decisions(self, decisions: list[DecisionRecord]) -> str:
        return self._durable(DECISIONS_PREFIX, decisions_to_table(decisions))

    def _write_late(self, rewards: list[tuple[RewardRecord, str]]) -> str:
        rows = [{"decision_id": r.decision_id, "score": float(r.score), "cost": r.cost, "time": float(r.time),
                 "finished_as": why} for r, why in rewards]
        return self._durable(LATE_PREFIX, pa.Table.from_pylist(rows, schema=LATE_SCHEMA))

    def _durable(self, prefix: str, part: pa.Table) -> str:
        """Write one part to the log, or to the local spool while storage is unavailable; returns its log key.

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
                self._note_storage_error(exc)
                logger.warning("storage unavailable; spooling %s parts locally until it returns (%s)", prefix, exc)
        self.spool.put(key, table_to_parquet_bytes(part), part.num_rows)
        return key

    def _note_storage_error(self, exc: BaseException) -> None:
        self.storage_errors += 1
        self.last_storage_error = str(exc)[:500]

    # --- spool drain -------------------------------------------------------------

    def drain_spool(self) -> int:
        """Copy spooled parts to the log, oldest first, until empty or storage fails (blocking; rows drained).

        A part leaves the spool only after its log write succeeded; a repeat
        writes the same key again (replaces the object), so no duplicates.
        """
        if self.spool is None:
            return 0
        drained = 0
        for key in self.spool.keys():
            data = self.spool.read_bytes(key)
            try:
                self.log.write_part(key, data)
            except StorageUnavailable as exc:
                self._note_storage_error(exc)
                break
            before = self.spool.drained
            self.spool.remove(key)
            drained += self.spool.drained - before
        return drained

    def finish_recovery(self) -> bool:
        """Retry the log part of an interrupted recovery (blocking); True once done."""
        if not self.recovery_pending:
            return True
        now = self.clock()
        try:
            finished, decisions = self._logged_state(now)
        except OSError as exc:  # StorageUnavailable, or a bucket/folder that is not there (yet)
            self._note_storage_error(exc)
            return False
        spooled_finished, spooled_decisions = self._spooled_state()
        pending = self.joiner.restore(decisions + spooled_decisions, {**finished, **spooled_finished}, now)
        self.recovered = {"finished": len(finished) + len(spooled_finished), "decisions_read": len(decisions) + len(spooled_decisions),
                          "pending": self.recovered.get("pending", 0) + pending, "late_recovery": 1}
        self.recovery_pending = False
        logger.info("feedback recovery finished after a storage outage: %s", self.recovered)
        return True

    async def _drain_loop(self) -> None:
        while True:
            await asyncio.sleep(self.config.spool_drain_interval_s)
            try:
                if self.recovery_pending:
                    await asyncio.to_thread(self.finish_recovery)
                if self.spool is not None and self.spool.active and not self.recovery_pending:
                    await asyncio.to_thread(self.drain_spool)
            except Exception:  # noqa: BLE001 - a broken drain must not stop future ones
                logger.exception("spool drain failed")

    # --- decisions ------------------------------------------------------------

    async def record_decisions(self, records: Sequence[DecisionRecord]) -> int:
        """Register decisions (they wait for rewards at once); returns once they are in the decision log or spool.

        Raises when they cannot be made durable (spool full: back-pressure;
        another write error): the replica then answers 503, so no client
        ever holds a decision id that a restart would forget.
        """
        self.start()
        spool = self.spool
        if spool is not None and spool.active and spool.depth + len(records) > spool.max_rows:
            spool.full_rejections += 1
            raise SpoolFull(spool.depth, spool.max_rows)  # refuse before anyone waits on these ids
        now = self.clock()
        fresh = [r for r in records if self.joiner.add_decision(r, now)]
        for r in fresh:
            waiter = self._arrivals.pop(r.decision_id, None)
            if waiter is not None:
                waiter.set()
        if fresh:
            try:
                await self._decisions.submit(fresh)
            except Exception as exc:  # noqa: BLE001 - the caller answers 503; these ids were never handed out
                logger.warning("decision log write of %d decisions failed: %s", len(fresh), exc)
                raise
        return len(fresh)

    # --- rewards --------------------------------------------------------------

    async def submit_reward(self, reward: RewardRecord) -> dict[str, Any]:
        """Join, make durable, then acknowledge. Returns {"status": ..., "decision_id": ...}."""
        self.start()
        did = reward.decision_id
        if self.recovery_pending and isinstance(did, str) and did and not self.joiner.knows(did):
            # The log that says whether this id was rewarded before the restart cannot be read yet.
            return {"status": "unavailable", "decision_id": did,
                    "error": "recovering join state: the event log's storage is unavailable; retry"}
        if isinstance(did, str) and did and not self.joiner.knows(did) and self.config.unknown_grace_s > 0:
            waiter = self._arrivals.setdefault(did, asyncio.Event())
            try:
                await asyncio.wait_for(waiter.wait(), self.config.unknown_grace_s)
            except asyncio.TimeoutError:
                pass
            finally:
                if self._arrivals.get(did) is waiter and not waiter.is_set():
                    self._arrivals.pop(did, None)
        try:
            outcome = self.joiner.submit_reward(reward, self.clock())
        except RewardValidationError as exc:
            return {"status": "invalid", "decision_id": did, "field": exc.field, "error": str(exc)}
        if outcome.status is RewardStatus.ACCEPTED:
            event = outcome.event
            assert event is not None
            future = asyncio.get_running_loop().create_future()
            self._inflight[did] = future
            try:
                key = await self._events.submit([event])
            except SpoolFull as exc:  # storage down and the local buffer full: back-pressure
                self.joiner.abort(did)
                future.set_result(False)
                return {"status": "unavailable", "decision_id": did, "error": str(exc)}
            except Exception as exc:  # noqa: BLE001
                self.joiner.abort(did)
                future.set_result(False)
                return {"status": "unavailable", "decision_id": did, "error": f"event log write failed: {exc}"}
            finally:
                self._inflight.pop(did, None)
            self.joiner.commit(did, self.clock())
            future.set_result(True)
            self._queue_for_learner([event])
            return {
                "status": "accepted",
                "decision_id": did,
                "model": event.decision.chosen_model,
                "policy_version": event.decision.policy_version,
                "cost": event.cost,
                "reward_time": event.reward_time,
                "log_part": key,
            }
        if outcome.status is RewardStatus.DUPLICATE:
            if outcome.in_flight and did in self._inflight:
                ok = await asyncio.shield(self._inflight[did])
                if not ok:
                    return {"status": "unavailable", "decision_id": did, "error": "the first reward's write failed; retry"}
            return {"status": "duplicate", "decision_id": did}
        if outcome.status is RewardStatus.LATE:
            why = outcome.finished_as.value if outcome.finished_as is not None else "defaulted"
            try:
                await self._late.submit([(reward, why)])
            except Exception as exc:  # noqa: BLE001
                return {"status": "unavailable", "decision_id": did, "error": f"late-reward log write failed: {exc}"}
            return {"status": "late", "decision_id": did, "finished_as": why}
        return {"status": "unknown", "decision_id": did, "error": f"decision_id: no decision {did!r} is known (never recorded, or forgotten)"}

    async def submit_rewards(self, rewards: Sequence[RewardRecord]) -> list[dict[str, Any]]:
        return list(await asyncio.gather(*(self.submit_reward(r) for r in rewards)))

    # --- window expiry ----------------------------------------------------------

    async def sweep(self) -> int:
        """Close expired windows now; defaulted events are logged, then queued for the learner."""
        now = self.clock()
        expired = self.joiner.expire(now)
        if expired:
            try:
                await self._events.submit(expired)
            except Exception as exc:  # noqa: BLE001
                logger.warning("event log write of %d defaulted events failed: %s", len(expired), exc)
                for e in expired:
                    self.joiner.abort(e.decision.decision_id)
                return 0
            for e in expired:
                self.joiner.commit(e.decision.decision_id, self.clock())
            self._queue_for_learner(expired)
        return len(expired)

    async def _sweep_loop(self) -> None:
        while True:
            await asyncio.sleep(self.config.sweep_interval_s)
            try:
                await self.sweep()
            except Exception:  # noqa: BLE001
                logger.exception("feedback sweep failed")

    # --- learner delivery -------------------------------------------------------

    def _queue_for_learner(self, events: Sequence[JoinedEvent]) -> None:
        if self.deliver is None:
            return
        self.batcher.add(list(events), self.clock())
        overflow = len(self.batcher) - self.config.learner_max_backlog
        if overflow > 0:
            self.batcher.take(self.clock(), force=True)  # oldest batch goes; it is in the log
            self.delivery["events_skipped_backlog"] += min(overflow, self.config.learner_max_batch)
        if self._ship_wakeup is not None:
            self._ship_wakeup.set()

    async def _deliver_batch(self, batch: list[JoinedEvent]) -> bool:
        assert self.deliver is not None
        table = events_to_table(batch)
        try:
            metrics = await self.deliver(table)
        except BatchRejected as exc:  # the learner is up but refused this batch: never retry a poison batch
            self.delivery["batches_rejected"] += 1
            self.delivery["events_rejected"] += len(batch)
            self.delivery["last_learner_error"] = repr(exc)[:500]
            logger.error("learner rejected a batch of %d events (they stay in the log): %s", len(batch), exc)
            return True
        except Exception as exc:  # noqa: BLE001 - learner missing or restarting: keep the events, retry
            self.delivery["learner_errors"] += 1
            self.delivery["last_learner_error"] = repr(exc)[:500]
            self.batcher.push_front(batch, self.clock())
            return False
        self.delivery["batches_sent"] += 1
        self.delivery["events_sent"] += len(batch)
        self.delivery["last_metrics"] = metrics
        return True

    async def _ship_loop(self) -> None:
        assert self._ship_wakeup is not None and self._deliver_lock is not None
        backoff = 0.0
        while True:
            due_at = self.batcher.due_at()
            timeout = None if due_at is None else max(0.0, due_at - self.clock())
            if timeout is None or timeout > 0:
                self._ship_wakeup.clear()
                try:
                    await asyncio.wait_for(self._ship_wakeup.wait(), timeout)
                except asyncio.TimeoutError:
                    pass
            if self.deliver is None:
                continue
            async with self._deliver_lock:
                batch = self.batcher.take(self.clock())
                if batch:
                    ok = await self._deliver_batch(batch)
                    backoff = 0.0 if ok else min(2.0, max(0.1, backoff * 2))
                    if not ok:
                        await asyncio.sleep(backoff)

    async def flush(self, timeout_s: float = 60.0) -> dict[str, Any]:
        """Deliver every queued event to the learner now (and wait for those updates)."""
        self.start()
        deadline = time.monotonic() + timeout_s
        assert self._deliver_lock is not None
        while self.deliver is not None and len(self.batcher) and time.monotonic() < deadline:
            async with self._deliver_lock:
                batch = self.batcher.take(self.clock(), force=True)
                if batch and not await self._deliver_batch(batch):
                    await asyncio.sleep(0.2)
        return self.stats()

    # --- introspection ----------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        return {
            **self.joiner.counters.as_dict(),
            "queued_for_learner": len(self.batcher),
            "event_log_writes": self._events.writes,
            "event_log_rows": self._events.items_written,
            "event_log_failures": self._events.failures,
            "decision_log_writes": self._decisions.writes,
            "decision_log_rows": self._decisions.items_written,
            "decision_log_failures": self._decisions.failures,
            **(self.spool.stats() if self.spool is not None else
               {"spooled": 0, "drained": 0, "spool_full_rejections": 0, "spool_depth": 0, "spool_parts": 0}),
            "spool_dir": str(self.spool.directory) if self.spool is not None else None,
            "recovery_pending": self.recovery_pending,
            "storage_errors": self.storage_errors,
            "last_storage_error": self.last_storage_error,
            "late_log_rows": self._late.items_written,
            **{k: v for k, v in self.delivery.items() if k != "last_metrics"},
            "last_learner_metrics": self.delivery["last_metrics"],
            "recovered": dict(self.recovered),
        }
