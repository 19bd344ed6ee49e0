"""Handing committed events to the learner: micro-batches, one call in flight, back-off on failure.

Events are queued only after they are durable in the log, so everything
here is best effort: a backlog beyond ``max_backlog`` skips its oldest
batch, a batch the learner rejects (:class:`BatchRejected`) is dropped, and
events not yet delivered when the process dies are not re-sent (OPE and
offline retraining read the log). A learner that is missing or restarting
keeps its batch at the front of the queue for a retry after a back-off.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, Awaitable, Callable, Sequence

import pyarrow as pa

from banditroute.core.records import JoinedEvent, events_to_table
from banditroute.feedback.batching import MicroBatcher
from banditroute.feedback.clock import Clock
from banditroute.feedback.config import FeedbackConfig

logger = logging.getLogger(__name__)

Deliver = Callable[[pa.Table], Awaitable[Any]]

# Seconds between retries of a failed delivery: doubles from the first to the last.
FIRST_BACKOFF_S = 0.1
MAX_BACKOFF_S = 2.0
# Seconds flush() waits before retrying a failed delivery.
FLUSH_RETRY_S = 0.2


class BatchRejected(Exception):
    """Raised by a ``deliver`` callback when the learner is reachable but failed on this batch (not retried)."""


def next_backoff(previous_s: float) -> float:
    """Back-off after one more failed delivery in a row (``previous_s`` 0: the first failure)."""
    return min(MAX_BACKOFF_S, max(FIRST_BACKOFF_S, previous_s * 2))


class LearnerDelivery:
    """Committed events -> size/max-delay batches -> ``deliver`` (None: events are not sent anywhere)."""

    def __init__(self, config: FeedbackConfig, deliver: Deliver | None, clock: Clock):
        self.deliver = deliver
        self.clock = clock
        self.max_backlog = config.learner_max_backlog
        self.max_batch = config.learner_max_batch
        self.batcher: MicroBatcher[JoinedEvent] = MicroBatcher(
            config.learner_batch_size, config.learner_max_delay_s, config.learner_max_batch
        )
        self.counters: dict[str, Any] = {
            "batches_sent": 0, "events_sent": 0, "learner_errors": 0, "events_skipped_backlog": 0,
            "batches_rejected": 0, "events_rejected": 0,
            "last_learner_error": None, "last_metrics": None,
        }
        self._lock: asyncio.Lock | None = None
        self._wakeup: asyncio.Event | None = None

    def start(self) -> asyncio.Task | None:
        """The ship loop's task (needs a running event loop; None when there is no learner to ship to)."""
        # Made here, not in __init__: a service restarted in another event loop gets fresh ones.
        self._lock = asyncio.Lock()
        self._wakeup = asyncio.Event()
        if self.deliver is None:
            return None
        return asyncio.get_running_loop().create_task(self._ship_loop())

    def queue(self, events: Sequence[JoinedEvent]) -> None:
        if self.deliver is None:
            return
        now = self.clock.now()
        self.batcher.add(list(events), now)
        overflow = len(self.batcher) - self.max_backlog
        if overflow > 0:
            self.batcher.take(now, force=True)  # oldest batch goes; it is in the log
            self.counters["events_skipped_backlog"] += min(overflow, self.max_batch)
        if self._wakeup is not None:
            self._wakeup.set()

    async def _deliver_batch(self, batch: list[JoinedEvent]) -> bool:
        """True when the batch is done with (delivered or rejected); False: it is back in the queue."""
        assert self.deliver is not None
        try:
            metrics = await self.deliver(events_to_table(batch))
        except BatchRejected as exc:  # the learner is up but refused this batch: never retry a poison batch
            self.counters["batches_rejected"] += 1
            self.counters["events_rejected"] += len(batch)
            self.counters["last_learner_error"] = repr(exc)[:500]
            logger.error("learner rejected a batch of %d events (they stay in the log): %s", len(batch), exc)
            return True
        except Exception as exc:  # noqa: BLE001 - learner missing or restarting: keep the events, retry
            self.counters["learner_errors"] += 1
            self.counters["last_learner_error"] = repr(exc)[:500]
            self.batcher.push_front(batch, self.clock.now())
            return False
        self.counters["batches_sent"] += 1
        self.counters["events_sent"] += len(batch)
        self.counters["last_metrics"] = metrics
        return True

    async def _ship_loop(self) -> None:
        assert self._wakeup is not None and self._lock is not None
        backoff = 0.0
        while True:
            due_at = self.batcher.due_at()
            timeout = None if due_at is None else max(0.0, due_at - self.clock.now())
            if timeout is None or timeout > 0:
                self._wakeup.clear()
                await self.clock.wait(self._wakeup, timeout)
            async with self._lock:
                batch = self.batcher.take(self.clock.now())
                if batch:
                    ok = await self._deliver_batch(batch)
                    backoff = 0.0 if ok else next_backoff(backoff)
                    if not ok:
                        await self.clock.sleep(backoff)

    async def flush(self, timeout_s: float) -> None:
        """Deliver every queued event now (and wait for those updates), retrying failures until ``timeout_s``."""
        assert self._lock is not None, "start() first"
        deadline = self.clock.now() + timeout_s
        while self.deliver is not None and len(self.batcher) and self.clock.now() < deadline:
            async with self._lock:
                batch = self.batcher.take(self.clock.now(), force=True)
                if batch and not await self._deliver_batch(batch):
                    await self.clock.sleep(FLUSH_RETRY_S)

    def stats(self) -> dict[str, Any]:
        return {
            "queued_for_learner": len(self.batcher),
            **{k: v for k, v in self.counters.items() if k != "last_metrics"},
            "last_learner_metrics": self.counters["last_metrics"],
        }
