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
import logging
import math
import time
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
from banditroute.feedback.log import EventLog
from banditroute.records import DecisionRecord, JoinedEvent, RewardRecord, decisions_from_table, events_to_table

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
    """Seconds between window-expiry sweeps (and retries of failed decision-log writes)."""
    recover_on_start: bool = True
    """Rebuild pending/finished decisions from the logs when the actor starts."""

    def validate(self) -> None:
        self.join.validate()
        for name in ("event_flush_wait_s", "decision_flush_wait_s", "learner_max_delay_s", "unknown_grace_s"):
            value = getattr(self, name)
            if not (value >= 0 and math.isfinite(value)):
                raise ValueError(f"feedback.{name} must be >= 0")
        if self.sweep_interval_s <= 0:
            raise ValueError("feedback.sweep_interval_s must be > 0")
        for name in ("max_rows_per_part", "learner_batch_size", "learner_max_batch", "learner_max_backlog"):
            if getattr(self, name) < 1:
                raise ValueError(f"feedback.{name} must be >= 1")


Deliver = Callable[[pa.Table], Awaitable[Any]]


class BatchRejected(Exception):
    """Raised by a ``deliver`` callback when the learner is reachable but failed on this batch (not retried)."""


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
        self._decision_retry: list[DecisionRecord] = []
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
        """Rebuild join state from the logs (synchronous; call before serving)."""
        now = self.clock()
        cfg = self.config.join
        finished_tbl = self.log.read_events(
            since=now - cfg.window_s - cfg.remember_s - _DECISION_LOG_SLACK_S, columns=["decision_id", "join_status"]
        )
        finished = dict(zip(finished_tbl.column("decision_id").to_pylist(), finished_tbl.column("join_status").to_pylist()))
        decisions = decisions_from_table(self.log.read_decisions(since=now - cfg.window_s - _DECISION_LOG_SLACK_S))
        pending = self.joiner.restore(decisions, finished, now)
        self.recovered = {"finished": len(finished), "decisions_read": len(decisions), "pending": pending}
        return self.recovered

    def start(self) -> None:
        """Start the background loops (needs a running event loop; idempotent)."""
        if self._tasks and not all(t.done() for t in self._tasks):
            return
        self._deliver_lock = asyncio.Lock()
        self._ship_wakeup = asyncio.Event()
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._sweep_loop()), loop.create_task(self._ship_loop())]

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
        return self.log.append_events(events)

    def _write_decisions(self, decisions: list[DecisionRecord]) -> str:
        return self.log.append_decisions(decisions)

    def _write_late(self, rewards: list[tuple[RewardRecord, str]]) -> str:
        return self.log.append_late(rewards)

    # --- decisions ------------------------------------------------------------

    async def record_decisions(self, records: Sequence[DecisionRecord]) -> int:
        """Register decisions (they wait for rewards at once); returns once they are in the decision log."""
        self.start()
        now = self.clock()
        fresh = [r for r in records if self.joiner.add_decision(r, now)]
        for r in fresh:
            waiter = self._arrivals.pop(r.decision_id, None)
            if waiter is not None:
                waiter.set()
        if fresh:
            try:
                await self._decisions.submit(fresh)
            except Exception as exc:  # noqa: BLE001 - keep them, retry at the next sweep
                logger.warning("decision log write failed (%s); %d decisions will be retried", exc, len(fresh))
                self._decision_retry.extend(fresh)
        return len(fresh)

    # --- rewards --------------------------------------------------------------

    async def submit_reward(self, reward: RewardRecord) -> dict[str, Any]:
        """Join, make durable, then acknowledge. Returns {"status": ..., "decision_id": ...}."""
        self.start()
        did = reward.decision_id
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
        if self._decision_retry:
            retry, self._decision_retry = self._decision_retry, []
            try:
                await self._decisions.submit(retry)
            except Exception:  # noqa: BLE001
                self._decision_retry = retry + self._decision_retry
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
            "decisions_awaiting_retry": len(self._decision_retry),
            "late_log_rows": self._late.items_written,
            **{k: v for k, v in self.delivery.items() if k != "last_metrics"},
            "last_learner_metrics": self.delivery["last_metrics"],
            "recovered": dict(self.recovered),
        }
