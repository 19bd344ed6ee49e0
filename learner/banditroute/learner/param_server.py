"""Parameter server: holds the newest (version, weights); replicas long-poll it.

Serve cannot broadcast to its replicas, and pushes can be dropped under
back-pressure, so replicas PULL: each one calls ``wait_for_newer(v)`` with
the version it serves and gets an answer as soon as something newer is
published (or None after the timeout, then asks again). A replica that
starts late asks with v = -1 and gets the newest weights at once. Versions
only move forward: an older snapshot is refused.

Restart: the actor is detached with ``max_restarts=-1``; when it comes back
it reloads the newest complete checkpoint whose weights were SERVED
(manifest ``promoted``; a candidate the promotion gate held back is never
served this way) from storage (if it was given a ``checkpoint_storage``), so
replicas that ask again get weights at least as new as the last served
checkpoint, and the learner (which republishes its serving version when the
server is behind) moves it forward again.

It also remembers the highest version number the learner has handed out
(``reserve_version``; candidates that were not published included), so a
restarted learner counts above every number it ever used.

For freshness measurements it keeps a bounded history of publishes and of
replica reports (``history()``).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from typing import Any

from banditroute.core.names import NAMESPACE, PARAMETER_SERVER_NAME
from banditroute.core.records import WeightsSnapshot


_HISTORY = 10_000
logger = logging.getLogger(__name__)


class ParameterServerState:
    """The logic, without Ray (unit-tested directly)."""

    def __init__(self) -> None:
        self.latest: WeightsSnapshot | None = None
        self._changed = asyncio.Event()
        self.replica_versions: dict[str, tuple[int, float]] = {}
        self.publishes: deque[tuple[int, float, float, float]] = deque(maxlen=_HISTORY)
        self.reports: deque[tuple[str, int, float]] = deque(maxlen=_HISTORY)
        self.reserved = -1

    def publish(self, snapshot: WeightsSnapshot) -> int:
        snapshot.check_finite()  # refused here, replicas never see them; the publisher counts the error
        if self.latest is not None and snapshot.policy_version <= self.latest.policy_version:
            raise ValueError(
                f"policy_version {snapshot.policy_version} is not newer than {self.latest.policy_version}"
            )
        self.latest = snapshot
        self.publishes.append((snapshot.policy_version, snapshot.created_at, snapshot.trained_through, time.time()))
        # Wake every waiter, then arm a fresh event for the next publish.
        self._changed.set()
        self._changed = asyncio.Event()
        return snapshot.policy_version

    async def wait_for_newer(self, known_version: int, timeout_s: float) -> WeightsSnapshot | None:
        deadline = time.monotonic() + timeout_s
        while self.latest is None or self.latest.policy_version <= known_version:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return None
            event = self._changed
            try:
                await asyncio.wait_for(event.wait(), remaining)
            except asyncio.TimeoutError:
                return None
        return self.latest

    def report_replica(self, replica_id: str, policy_version: int, at: float | None = None) -> None:
        at = time.time() if at is None else float(at)
        previous = self.replica_versions.get(replica_id)
        if previous is None or previous[0] != int(policy_version):
            self.reports.append((replica_id, int(policy_version), at))
        self.replica_versions[replica_id] = (int(policy_version), at)

    def forget_replica(self, replica_id: str) -> None:
        self.replica_versions.pop(replica_id, None)

    def latest_version(self) -> int:
        return -1 if self.latest is None else self.latest.policy_version

    def reserve_version(self, version: int) -> int:
        """Note that ``version`` was used (not published); returns the newest PUBLISHED version (-1: none),
        so the learner sees in the same round trip whether a restarted server is behind."""
        self.reserved = max(self.reserved, int(version))
        return self.latest_version()

    def reserved_version(self) -> int:
        """The highest version number published or reserved (-1: none)."""
        return max(self.reserved, self.latest_version())


class ParameterServer:
    """Ray actor shell around ParameterServerState (create with ``.options(name=..., max_concurrency=...)``).

    Make it an async actor (the methods are coroutines) so thousands of
    long-polls wait without a thread each.
    """

    def __init__(self, checkpoint_storage: Any = None, checkpoint_prefix: str = "checkpoints") -> None:
        self.state = ParameterServerState()
        self.recovered_from: str | None = None
        if checkpoint_storage is not None:
            self._recover(checkpoint_storage, checkpoint_prefix)

    def _recover(self, storage_config: Any, prefix: str) -> None:
        """Load the newest complete checkpoint (best effort: a storage outage must not stop serving)."""
        try:
            from banditroute.learner.checkpoint import checkpoint_dir, load_latest_checkpoint
            from banditroute.core.storage import open_storage

            storage = open_storage(storage_config).child(prefix)
            found = load_latest_checkpoint(storage, promoted_only=True)
        except Exception as exc:  # noqa: BLE001
            logger.warning("parameter server: could not recover a checkpoint: %s", exc)
            return
        if found is None:
            return
        policy, _, manifest = found
        self.state.publish(policy.snapshot(trained_through=float(manifest.get("trained_through", 0.0)),
                                           created_at=manifest.get("created_at")))
        self.recovered_from = storage.uri_for(checkpoint_dir(policy.policy_version))

    async def publish(self, snapshot: WeightsSnapshot) -> int:
        return self.state.publish(snapshot)

    async def wait_for_newer(self, known_version: int, timeout_s: float = 10.0) -> WeightsSnapshot | None:
        return await self.state.wait_for_newer(known_version, timeout_s)

    async def latest(self) -> WeightsSnapshot | None:
        return self.state.latest

    async def latest_version(self) -> int:
        return self.state.latest_version()

    async def reserve_version(self, version: int) -> int:
        return self.state.reserve_version(version)

    async def reserved_version(self) -> int:
        return self.state.reserved_version()

    async def report_replica(self, replica_id: str, policy_version: int, at: float | None = None) -> None:
        """A replica serves ``policy_version`` since ``at`` (its own time.time(); default: now)."""
        self.state.report_replica(replica_id, policy_version, at)

    async def forget_replica(self, replica_id: str) -> None:
        self.state.forget_replica(replica_id)

    async def replica_versions(self, max_age_s: float | None = None) -> dict[str, int]:
        """Version each replica reported last; with ``max_age_s``, only replicas heard from that recently."""
        now = time.time()
        return {
            k: v for k, (v, at) in self.state.replica_versions.items() if max_age_s is None or now - at <= max_age_s
        }

    async def history(self) -> dict[str, Any]:
        """Publishes (version, created_at, trained_through, published_at) and replica reports (id, version, at)."""
        return {
            "publishes": list(self.state.publishes),
            "reports": list(self.state.reports),
            "recovered_from": self.recovered_from,
        }


def get_or_create_parameter_server(
    name: str = PARAMETER_SERVER_NAME,
    namespace: str | None = NAMESPACE,
    checkpoint_storage: Any = None,
    checkpoint_prefix: str = "checkpoints",
) -> Any:
    """The named, detached, restartable parameter-server actor (created if missing).

    ``checkpoint_storage`` (a StorageConfig) lets a restarted actor reload
    the newest checkpoint under ``checkpoint_prefix``.
    """
    from banditroute.core.actors import get_or_create_detached_actor

    return get_or_create_detached_actor(
        ParameterServer, name, namespace, checkpoint_storage, checkpoint_prefix, max_concurrency=10_000, num_cpus=0
    )


def get_parameter_server(name: str = PARAMETER_SERVER_NAME, namespace: str | None = NAMESPACE) -> Any:
    """Handle of the running parameter server (ValueError if there is none)."""
    import ray

    return ray.get_actor(name, namespace=namespace)
