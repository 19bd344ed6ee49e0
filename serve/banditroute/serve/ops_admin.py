"""``GET /v1/admin/experiments``: the experiments report, read from the loop's decision and event logs.

The logs' location AND storage settings (S3 endpoint, region, the names of
the key env vars) come from the feedback actor the replicas send decisions
to (``log_storage``, found by name as /v1/feedback finds it; an actor
started before that method existed answers ``log_uri`` only); the rows are read
in a thread (core/event_log.py) and reported by the pure
``policy.experiments.experiment_report`` with the served policy's tau. A
frozen router (no feedback actor) has no log: 404. The query parameter
``since_hours`` limits the look-back (default: the whole log).
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from banditroute.core.config import from_dict
from banditroute.core.storage import StorageConfig
from banditroute.policy.experiments import experiment_report
from banditroute.serve.config import RouterConfig
from banditroute.serve.experiments import read_experiment_rows
from banditroute.serve.feedback_endpoint import feedback_target
from banditroute.serve.protocol import RETRY_AFTER, RequestError

LOG_TIMEOUT_S = 30.0


class ExperimentsAdmin:
    """The experiments report of one ingress replica (the config's experiments, the loop's logs)."""

    def __init__(self, cfg: RouterConfig):
        self.cfg = cfg

    async def _log_storage(self) -> StorageConfig | str:
        target = feedback_target(self.cfg)
        if target["name"] is None:
            raise RequestError(404, None, "no decision log behind this router (frozen: online.enabled is false)")
        import ray

        try:
            actor = await asyncio.to_thread(ray.get_actor, target["name"], target["namespace"])
            try:
                found = await asyncio.wait_for(actor.log_storage.remote(), timeout=LOG_TIMEOUT_S)
            except AttributeError:  # an actor from before log_storage: its URI with default settings
                return await asyncio.wait_for(actor.log_uri.remote(), timeout=LOG_TIMEOUT_S)
            return from_dict(StorageConfig, found, prefix="storage")
        except Exception as exc:  # noqa: BLE001 - restarting actor
            raise RequestError(503, None, f"the feedback actor is unavailable: {type(exc).__name__}", headers=RETRY_AFTER) from None

    async def report(self, router_info: dict[str, Any], since_hours: float | None = None) -> dict[str, Any]:
        """``{"experiments": [...]}`` (policy.experiments.experiment_report) plus the tau it used."""
        tau = router_info.get("tau")
        if tau is None:
            raise RequestError(503, None, "the deciding replica did not report its policy's tau; retry", headers=RETRY_AFTER)
        storage = await self._log_storage()
        since = None if since_hours is None else time.time() - 3600.0 * since_hours
        decisions, events = await asyncio.to_thread(read_experiment_rows, storage, since)
        return dict(experiment_report(self.cfg.experiments, decisions, events, float(tau)), tau=float(tau))
