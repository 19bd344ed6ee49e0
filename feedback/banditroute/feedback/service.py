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
3. Committed events go to the learner in size/max-delay micro-batches,
   one call in flight at a time (``delivery.py``; backpressure: while the
   learner is busy, the next batch grows).
4. A sweep closes expired windows (default reward or drop) every
   ``sweep_interval_s``.
5. Storage outages: a write that storage refuses (``StorageUnavailable``)
   goes to a bounded spool on shared storage (``durable.py``, ``spool.py``;
   any node's actor sees it) and is acknowledged from there; a background loop drains
   the spool to the log in order when storage answers again. A full spool
   is back-pressure: rewards answer 'unavailable' ("event buffer full ...")
   and decision batches raise (the replicas answer 503).

Recovery (``recover()``, at start; ``recovery.py``) rebuilds the join state
from the logs and the spool. Acknowledged events are in the log by
construction; events acknowledged but not yet delivered to the learner when
the process died are NOT re-sent by this service (at-most-once push, exactly
once in the log); the learner's cursor over the committed log trains on
them (learner/log_cursor.py).

All timing (windows, batch delay, grace, back-off, loop intervals) reads
the injected :class:`~banditroute.feedback.clock.Clock`.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, Sequence

import pyarrow as pa

from banditroute.core.records import DecisionRecord, JoinedEvent, RewardRecord, decisions_to_table, events_to_table
from banditroute.feedback.batching import GroupCommitter
from banditroute.feedback.clock import Clock, SystemClock
from banditroute.feedback.config import FeedbackConfig
from banditroute.feedback.delivery import Deliver, LearnerDelivery
from banditroute.feedback.durable import SpoolingWriter
from banditroute.feedback.join import RewardJoiner, RewardStatus, RewardValidationError
from banditroute.feedback.log import DECISIONS_PREFIX, EVENTS_PREFIX, LATE_PREFIX, LATE_SCHEMA, EventLog
from banditroute.feedback.recovery import JoinRecovery
from banditroute.feedback.late import LateLedger
from banditroute.feedback.spool import Spool, SpoolFull, open_spool

logger = logging.getLogger(__name__)


class FeedbackService:
    """Join + durable log + learner delivery for one feedback actor (see the module docstring)."""

    def __init__(
        self,
        config: FeedbackConfig,
        log: EventLog,
        deliver: Deliver | None = None,
        clock: Clock | None = None,
    ):
        config.validate()
        self.config = config
        self.log = log
        self.clock: Clock = clock or SystemClock()
        self.joiner = RewardJoiner(config.join)
        self.writer = SpoolingWriter(log, open_spool(config, log.storage))
        # One late row per decision: replays of a late reward are answered, not logged again.
        self.late = LateLedger(config.join.remember_s + config.join.window_s, config.join.max_remembered)
        self.recovery = JoinRecovery(self.joiner, config.join, self.writer, self.late)
        self.delivery = LearnerDelivery(config, deliver if config.send_to_learner else None, self.clock)
        self._events = GroupCommitter(self._write_events, config.event_flush_wait_s, config.max_rows_per_part, sleep=self.clock.sleep)
        self._decisions = GroupCommitter(self._write_decisions, config.decision_flush_wait_s, config.max_rows_per_part,
                                         sleep=self.clock.sleep)
        self._late = GroupCommitter(self._write_late, config.event_flush_wait_s, config.max_rows_per_part, sleep=self.clock.sleep)
        self._arrivals: dict[str, asyncio.Event] = {}
        self._inflight: dict[str, asyncio.Future] = {}
        self._tasks: list[asyncio.Task] = []

    @property
    def spool(self) -> Spool | None:
        return self.writer.spool

    # --- lifecycle ------------------------------------------------------------

    def recover(self) -> dict[str, int]:
        """Rebuild join state from the logs and the spool (synchronous; call before serving); see recovery.py."""
        return self.recovery.recover(self.clock.now())

    def start(self) -> None:
        """Start the background loops (needs a running event loop; idempotent)."""
        if self._tasks and not all(t.done() for t in self._tasks):
            return
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._sweep_loop()), loop.create_task(self._drain_loop())]
        ship = self.delivery.start()
        if ship is not None:
            self._tasks.append(ship)

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
        return self.writer.write(EVENTS_PREFIX, events_to_table(events))

    def _write_decisions(self, decisions: list[DecisionRecord]) -> str:
        return self.writer.write(DECISIONS_PREFIX, decisions_to_table(decisions))

    def _write_late(self, rewards: list[tuple[RewardRecord, str]]) -> str:
        rows = [{"decision_id": r.decision_id, "score": float(r.score), "cost": r.cost, "time": float(r.time),
                 "finished_as": why} for r, why in rewards]
        return self.writer.write(LATE_PREFIX, pa.Table.from_pylist(rows, schema=LATE_SCHEMA))

    # --- storage outages: spool drain and late recovery ----------------------------

    def drain_spool(self) -> int:
        """Copy spooled parts to the log, oldest first (blocking; rows drained); see SpoolingWriter.drain."""
        return self.writer.drain()

    def finish_recovery(self) -> bool:
        """Retry the log part of an interrupted recovery (blocking); True once done."""
        return self.recovery.finish(self.clock.now())

    async def _drain_loop(self) -> None:
        while True:
            await self.clock.sleep(self.config.spool_drain_interval_s)
            try:
                if self.recovery.pending:
                    await asyncio.to_thread(self.finish_recovery)
                if self.spool is not None and self.spool.active and not self.recovery.pending:
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
        now = self.clock.now()
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
        if self.recovery.blocks_all and isinstance(did, str) and did:
            return {"status": "unavailable", "decision_id": did,
                    "error": "recovering join state: the spool's storage is unavailable; retry"}
        if self.recovery.pending and isinstance(did, str) and did and not self.joiner.knows(did):
            # The log that says whether this id was rewarded before the restart cannot be read yet.
            return {"status": "unavailable", "decision_id": did,
                    "error": "recovering join state: the event log's storage is unavailable; retry"}
        if isinstance(did, str) and did and not self.joiner.knows(did) and self.config.unknown_grace_s > 0:
            waiter = self._arrivals.setdefault(did, asyncio.Event())
            try:
                await self.clock.wait(waiter, self.config.unknown_grace_s)
            finally:
                if self._arrivals.get(did) is waiter and not waiter.is_set():
                    self._arrivals.pop(did, None)
        try:
            outcome = self.joiner.submit_reward(reward, self.clock.now())
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
            self.joiner.commit(did, self.clock.now())
            future.set_result(True)
            self.delivery.queue([event])
            return {
                "status": "accepted",
                "decision_id": did,
                "model": event.decision.chosen_model,
                "policy_version": event.decision.policy_version,
                "cost": event.cost,
                "tenant": event.decision.tenant,
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
            if not self.late.claim(did, self.clock.now()):
                return {"status": "late", "decision_id": did, "finished_as": why, "already_logged": True}
            try:
                await self._late.submit([(reward, why)])
            except Exception as exc:  # noqa: BLE001
                self.late.release(did)
                return {"status": "unavailable", "decision_id": did, "error": f"late-reward log write failed: {exc}"}
            return {"status": "late", "decision_id": did, "finished_as": why}
        return {"status": "unknown", "decision_id": did, "error": f"decision_id: no decision {did!r} is known (never recorded, or forgotten)"}

    async def submit_rewards(self, rewards: Sequence[RewardRecord]) -> list[dict[str, Any]]:
        return list(await asyncio.gather(*(self.submit_reward(r) for r in rewards)))

    # --- window expiry ----------------------------------------------------------

    async def sweep(self) -> int:
        """Close expired windows now; defaulted events are logged, then queued for the learner."""
        now = self.clock.now()
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
                self.joiner.commit(e.decision.decision_id, self.clock.now())
            self.delivery.queue(expired)
        return len(expired)

    async def _sweep_loop(self) -> None:
        while True:
            await self.clock.sleep(self.config.sweep_interval_s)
            try:
                await self.sweep()
            except Exception:  # noqa: BLE001
                logger.exception("feedback sweep failed")

    # --- learner delivery -------------------------------------------------------

    async def flush(self, timeout_s: float = 60.0) -> dict[str, Any]:
        """Deliver every queued event to the learner now (and wait for those updates)."""
        self.start()
        await self.delivery.flush(timeout_s)
        return self.stats()

    # --- introspection ----------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        return {
            **self.joiner.counters.as_dict(),
            "event_log_writes": self._events.writes,
            "event_log_rows": self._events.items_written,
            "event_log_failures": self._events.failures,
            "decision_log_writes": self._decisions.writes,
            "decision_log_rows": self._decisions.items_written,
            "decision_log_failures": self._decisions.failures,
            **self.writer.stats(),
            "recovery_pending": self.recovery.pending,
            "late_log_rows": self._late.items_written,
            "late_repeats_not_logged": self.late.repeats,
            **self.delivery.stats(),
            "recovered": dict(self.recovery.recovered),
        }
