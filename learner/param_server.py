"""Parameter server: holds the newest (version, weights); replicas long-poll it.

Serve cannot broadcast to its replicas, and pushes can be dropped under
back-pressure, so replicas PULL: each one calls ``wait_for_newer(v)`` with
the version it serves and gets an answer as soon as something newer is
published (or None after the timeout, then asks again). A replica that
starts late asks with v = -1 and gets the newest weights at once. Versions
only move forward: an older snapshot is refused.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from banditroute.records import WeightsSnapshot

PARAMETER_SERVER_NAME = "banditroute-parameter-server"


class ParameterServerState:
    """The logic, without Ray (unit-tested directly)."""

    def __init__(self) -> None:
        self.latest: WeightsSnapshot | None = None
        self._changed = asyncio.Event()
        self.replica_versions: dict[str, tuple[int, float]] = {}

    def publish(self, snapshot: WeightsSnapshot) -> int:
        if self.latest is not None and snapshot.policy_version <= self.latest.policy_version:
            raise ValueError(
                f"policy_version {snapshot.policy_version} is not newer than {self.latest.policy_version}"
            )
        self.latest = snapshot
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

    def report_replica(self, replica_id: str, policy_version: int) -> None:
        self.replica_versions[replica_id] = (int(policy_version), time.time())

    def latest_version(self) -> int:
        return -1 if self.latest is None else self.latest.policy_version


class ParameterServer:
    """Ray actor shell around ParameterServerState (create with ``.options(name=..., max_concurrency=...)``).

    Make it an async actor (the methods are coroutines) so thousands of
    long-polls wait without a thread each.
    """

    def __init__(self) -> None:
        self.state = ParameterServerState()

    async def publish(self, snapshot: WeightsSnapshot) -> int:
        return self.state.publish(snapshot)

    async def wait_for_newer(self, known_version: int, timeout_s: float = 10.0) -> WeightsSnapshot | None:
        return await self.state.wait_for_newer(known_version, timeout_s)

    async def latest_version(self) -> int:
        return self.state.latest_version()

    async def report_replica(self, replica_id: str, policy_version: int) -> None:
        self.state.report_replica(replica_id, policy_version)

    async def replica_versions(self) -> dict[str, int]:
        return {k: v for k, (v, _) in self.state.replica_versions.items()}


def get_or_create_parameter_server(name: str = PARAMETER_SERVER_NAME, namespace: str | None = None) -> Any:
    """The named, detached, restartable parameter-server actor (created if missing)."""
    import ray

    actor_cls = ray.remote(ParameterServer)
    return actor_cls.options(
        name=name,
        namespace=namespace,
        get_if_exists=True,
        lifetime="detached",
        max_restarts=-1,
        max_concurrency=10_000,
        num_cpus=0,
    ).remote()
