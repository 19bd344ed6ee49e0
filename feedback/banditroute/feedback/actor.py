"""The feedback actor: a named, detached, restartable async Ray actor around FeedbackService.

Name ``banditroute-feedback`` in namespace ``banditroute`` (see
``learner.param_server.NAMESPACE``); ``max_restarts=-1``, so Ray brings it
back after a crash, and it rebuilds its join state from the durable logs
(``FeedbackService.recover``).

Methods (all async; call with ``.remote()``):

- ``record_decisions(list[DecisionRecord]) -> int`` and
  ``record_decisions_table(pyarrow.Table) -> int``: from router replicas
  (via the "feedback-actor" decision sink); return once the decisions are in
  the decision log.
- ``submit_reward(RewardRecord) -> dict``: ``{"status": "accepted" |
  "duplicate" | "late" | "unknown" | "invalid" | "unavailable", ...}``;
  "accepted" only once the joined event is durable.
- ``submit_rewards(list[RewardRecord]) -> list[dict]``: many at once.
- ``stats() -> dict``: join counters, log writes, learner delivery, and the
  storage-outage spool (``spooled``, ``drained``, ``spool_full_rejections``,
  ``spool_depth``, ``recovery_pending``).
- ``flush(timeout_s) -> dict``: hand every queued event to the learner now.
- ``events_in_log() -> int``: rows in the durable event log.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, Sequence

import numpy as np
import pyarrow as pa

from banditroute.core.config import from_dict
from banditroute.feedback.config import FeedbackConfig
from banditroute.feedback.delivery import BatchRejected
from banditroute.feedback.delivery_metrics import FeedbackMetrics
from banditroute.feedback.log import EventLog
from banditroute.feedback.service import FeedbackService
from banditroute.core.names import FEEDBACK_ACTOR_NAME, LEARNER_ACTOR_NAME, NAMESPACE
from banditroute.core.records import DecisionRecord, RewardRecord, decisions_from_table
from banditroute.core.storage import StorageConfig, open_storage


logger = logging.getLogger(__name__)


def _compact(record: DecisionRecord) -> DecisionRecord:
    """Embeddings as float32 arrays while pending (a list of Python floats is ~7x bigger)."""
    if not isinstance(record.embedding, np.ndarray):
        record.embedding = np.asarray(record.embedding, dtype=np.float32)
    return record


class FeedbackActor:
    def __init__(
        self,
        config: FeedbackConfig | dict | None,
        storage: StorageConfig | dict | str,
        learner_name: str = LEARNER_ACTOR_NAME,
        namespace: str | None = NAMESPACE,
    ):
        if not isinstance(config, FeedbackConfig):
            config = from_dict(FeedbackConfig, config or {}, prefix="feedback")
        if isinstance(storage, dict):
            storage = from_dict(StorageConfig, storage, prefix="storage")
        self.learner_name, self.namespace = learner_name, namespace
        self._learner = None
        self.metrics = FeedbackMetrics()  # delivery lag, learner queue, spend (feedback/delivery_metrics.py)
        deliver = self.metrics.wrap(self._deliver, lambda: len(self.service.delivery.batcher))
        self.service = FeedbackService(config, EventLog(open_storage(storage)), deliver=deliver)
        if config.recover_on_start:
            try:
                recovered = self.service.recover()
            except Exception as exc:  # noqa: BLE001 - raising here would crash-loop the restarts
                # Stay up: rewards for ids only the log knows answer 'unavailable'
                # until the drain loop's retry of the recovery succeeds.
                logger.error("feedback actor recovery failed (%s); retrying in the background", exc)
                self.service.recovery.pending = True
                recovered = {"failed": 1}
            logger.info("feedback actor recovered %s", recovered)

    async def _deliver(self, table: pa.Table) -> Any:
        import ray

        if self._learner is None:
            self._learner = await asyncio.to_thread(ray.get_actor, self.learner_name, self.namespace)
        try:
            return await self._learner.update.remote(table)
        except ray.exceptions.RayTaskError as exc:  # update() itself raised: the batch, not the actor
            raise BatchRejected(str(exc)[:500]) from None
        except Exception:
            self._learner = None  # look it up again next time (it may have restarted)
            raise

    async def ping(self) -> str:
        self.service.start()
        return "ok"

    async def record_decisions(self, records: Sequence[DecisionRecord]) -> int:
        return await self.service.record_decisions([_compact(r) for r in records])

    async def record_decisions_table(self, table: pa.Table) -> int:
        return await self.service.record_decisions([_compact(r) for r in decisions_from_table(table)])

    async def submit_reward(self, reward: RewardRecord) -> dict[str, Any]:
        return self.metrics.rewarded(await self.service.submit_reward(reward))

    async def submit_rewards(self, rewards: Sequence[RewardRecord]) -> list[dict[str, Any]]:
        return [self.metrics.rewarded(a) for a in await self.service.submit_rewards(rewards)]

    async def sweep(self) -> int:
        return await self.service.sweep()

    async def stats(self) -> dict[str, Any]:
        return self.service.stats()

    async def flush(self, timeout_s: float = 60.0) -> dict[str, Any]:
        return await self.service.flush(timeout_s)

    async def events_in_log(self) -> int:
        return await asyncio.to_thread(self.service.log.count_rows)

    async def log_uri(self) -> str:
        return self.service.log.storage.uri_for()

    async def log_storage(self) -> dict[str, Any]:
        """The log's StorageConfig (endpoint, region, the NAMES of the key env vars) with its root URI, so a reader
        elsewhere (GET /v1/admin/experiments) opens it as this actor does."""
        import dataclasses

        return dict(dataclasses.asdict(self.service.log.storage.config), uri=self.service.log.storage.uri_for())


def get_or_create_feedback_actor(
    config: FeedbackConfig | dict | None,
    storage: StorageConfig | dict | str,
    name: str = FEEDBACK_ACTOR_NAME,
    namespace: str | None = NAMESPACE,
    learner_name: str = LEARNER_ACTOR_NAME,
    num_cpus: float = 0.0,
) -> Any:
    """The named, detached, restartable feedback actor (created if missing)."""
    from banditroute.core.actors import get_or_create_detached_actor

    return get_or_create_detached_actor(
        FeedbackActor, name, namespace, config, storage, learner_name, namespace,
        max_concurrency=10_000, num_cpus=num_cpus, max_task_retries=0,
    )


def get_feedback_actor(name: str = FEEDBACK_ACTOR_NAME, namespace: str | None = NAMESPACE) -> Any:
    import ray

    return ray.get_actor(name, namespace=namespace)
