"""Shared fixtures: ONE local Ray cluster per test session, Serve on a free loopback port.

Tests that need Ray take the ``ray_cluster`` fixture (or ``serve_instance``,
which also starts Serve's HTTP proxy). Every Serve application a test deploys
is deleted after it, so tests stay independent without restarting Ray.

Time: code that measures time takes a clock, and tests hand it a
:class:`ManualClock` they advance; :func:`wait_until` only polls for what
another process brings about (a replica reporting, an actor restarting).
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import os
import socket
import time
from typing import Any, Callable

import pytest

# Before Ray is imported anywhere: local runs need no token auth, send no usage stats.
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# The decision-token secret every RouterIngress replica needs (security.token_secret_env's default name);
# tests that sign or verify tokens themselves read it from os.environ.
TOKEN_SECRET_ENV = "BANDITROUTE_TOKEN_SECRET"
os.environ.setdefault(TOKEN_SECRET_ENV, "test-secret-" + os.urandom(16).hex())
# API keys per endpoint group for apps deployed with security.*_api_keys_env naming these (test_security, test_fuzz).
TEST_API_KEYS = {"BANDITROUTE_TEST_ROUTE_KEYS": "route-key-1,route-key-2", "BANDITROUTE_TEST_FEEDBACK_KEYS": "feedback-key-1,route-key-2",
                 "BANDITROUTE_TEST_ADMIN_KEYS": "admin-key-1"}
os.environ.update(TEST_API_KEYS)


from banditroute.testkit.s3server import S3_TEST_ENV, s3_server, s3_storage_config  # noqa: E402,F401  (a real moto_server on loopback)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(predicate: Callable[[], Any], timeout_s: float = 60.0, interval_s: float = 0.2, what: str = "condition") -> Any:
    """Poll ``predicate`` until it returns something truthy (returned), failing after ``timeout_s``.

    For conditions another process brings about (a replica reporting, an actor
    restarting), not for letting time pass: code that measures time gets a clock.
    """
    deadline = time.monotonic() + timeout_s
    last = None
    while time.monotonic() < deadline:
        last = predicate()
        if last:
            return last
        time.sleep(interval_s)
    raise AssertionError(f"timed out waiting for {what} (last: {last!r})")


class ManualClock:
    """A feedback ``Clock`` that moves only when the test advances it: no test waits for time to pass.

    ``sleep`` and ``wait`` park on timers that :meth:`advance` fires in
    deadline order. Everything runs on the test's event loop, so after an
    ``await clock.advance(...)`` whatever was due has run, except work handed
    to threads (log writes), which :meth:`advance_until` waits for.
    """

    SETTLE_ROUNDS = 20  # event-loop turns that let woken coroutines run to their next wait

    def __init__(self, start: float):
        self._now = float(start)
        self._timers: list[tuple[float, int, asyncio.Future]] = []
        self._order = itertools.count()

    def now(self) -> float:
        return self._now

    async def sleep(self, seconds: float) -> None:
        if seconds <= 0:
            await asyncio.sleep(0)
            return
        fired = asyncio.get_running_loop().create_future()
        heapq.heappush(self._timers, (self._now + seconds, next(self._order), fired))
        await fired

    async def wait(self, event: asyncio.Event, timeout_s: float | None) -> bool:
        if event.is_set():
            return True
        if timeout_s is None:
            await event.wait()
            return True
        setter, timer = asyncio.ensure_future(event.wait()), asyncio.ensure_future(self.sleep(timeout_s))
        try:
            await asyncio.wait({setter, timer}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            setter.cancel()
            timer.cancel()
        return event.is_set()

    async def settle(self) -> None:
        """Let every coroutine that can run without time passing (or a thread) run."""
        for _ in range(self.SETTLE_ROUNDS):
            await asyncio.sleep(0)

    async def advance(self, seconds: float) -> None:
        """Move time forward by ``seconds``, firing every timer due by then, and let the woken coroutines run."""
        await self.settle()
        self._now += seconds
        while self._timers and self._timers[0][0] <= self._now:
            _, _, fired = heapq.heappop(self._timers)
            if not fired.done():
                fired.set_result(None)
        await self.settle()

    async def advance_until(self, predicate: Callable[[], Any], step_s: float, timeout_s: float = 10.0,
                            what: str = "condition") -> None:
        """Advance in ``step_s`` steps until ``predicate()`` holds; real time only lets worker threads finish."""
        deadline = time.monotonic() + timeout_s
        while not predicate():
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {what}")
            await self.advance(step_s)
            if not predicate():
                await asyncio.sleep(0.01)  # a log write or drain may be running in a worker thread


@pytest.fixture(scope="session")
def ray_cluster():
    """A local Ray with more logical CPUs than cores: actors in tests take fractions of them."""
    import ray

    if not ray.is_initialized():
        ray.init(
            num_cpus=8,
            include_dashboard=False,
            log_to_driver=False,
            # S3 credentials of the moto server (any value works there), so actors on S3 storage can sign requests.
            runtime_env={"env_vars": {"RAY_AUTH_MODE": "disabled", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
                                      **S3_TEST_ENV, TOKEN_SECRET_ENV: os.environ[TOKEN_SECRET_ENV], **TEST_API_KEYS}},
        )
    yield ray
    try:
        from ray import serve

        serve.shutdown()
    except Exception:
        pass
    ray.shutdown()


@pytest.fixture(scope="session")
def serve_http_port(ray_cluster) -> int:
    """Serve's HTTP proxy on 127.0.0.1:<free port>, started once per session."""
    from ray import serve

    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    return port


@pytest.fixture
def serve_instance(serve_http_port):
    """Serve running; every application deployed during the test is deleted after it."""
    from ray import serve

    yield serve_http_port
    for name in list(serve.status().applications):
        serve.delete(name)
