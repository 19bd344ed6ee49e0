"""The documented client retry policy, and a small async client for /v1/route and /v1/feedback.

Retrying is safe on both endpoints:

- ``POST /v1/route``: a retried request is a new decision; a decision whose
  answer was lost is never rewarded and closes with its window.
- ``POST /v1/feedback``: the first reward for a decision wins; a repeat
  answers ``200 {"status": "duplicate"}`` (or ``409`` "duplicate" on servers
  that sign decision ids), which this client reports as already recorded.

The policy (:class:`RetryPolicy`): up to ``attempts`` tries; connection
errors, timeouts and 502/503/504 are retried, never another 4xx/5xx;
between tries the client waits ``min(max_backoff_s, backoff_s *
multiplier**n)`` scaled by a random factor in ``[1 - jitter, 1]`` (so many
clients do not retry in step), or the server's ``Retry-After`` when that is
longer (capped at ``max_retry_after_s``).
"""

from __future__ import annotations

import asyncio
import random
import time
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from typing import Any

import httpx

RETRY_STATUSES = (502, 503, 504)


@dataclass
class RetryPolicy:
    """How a client retries the router's HTTP API (connection errors and 502/503/504 only)."""

    attempts: int = 10
    """Tries per request, the first included (1 = no retry); the defaults ride out ~10-20 s of unavailability."""
    backoff_s: float = 0.1
    """Wait before the first retry (seconds), before jitter."""
    multiplier: float = 2.0
    """Each further retry waits this many times longer ..."""
    max_backoff_s: float = 4.0
    """... but never longer than this (seconds), before jitter."""
    jitter: float = 0.5
    """Each wait is scaled by a random factor in [1 - jitter, 1] (0 = none, 1 = full jitter)."""
    max_retry_after_s: float = 30.0
    """A server's Retry-After longer than this is capped to it (seconds)."""

    def validate(self) -> None:
        if self.attempts < 1:
            raise ValueError("retry.attempts must be >= 1")
        if self.backoff_s < 0 or self.max_backoff_s < 0 or self.max_retry_after_s < 0:
            raise ValueError("retry.backoff_s, retry.max_backoff_s and retry.max_retry_after_s must be >= 0")
        if self.multiplier < 1:
            raise ValueError("retry.multiplier must be >= 1")
        if not 0 <= self.jitter <= 1:
            raise ValueError("retry.jitter must be in [0, 1]")

    @staticmethod
    def retryable_status(status: int) -> bool:
        """502/503/504 are retried; every other status (4xx included) is final."""
        return status in RETRY_STATUSES

    def delay(self, retry: int, retry_after_s: float | None = None, rng: random.Random | None = None) -> float:
        """Seconds to wait before retry number ``retry`` (0-based)."""
        base = min(self.max_backoff_s, self.backoff_s * self.multiplier**retry)
        wait = base * (1.0 - self.jitter * (rng or random).random())
        if retry_after_s is not None:
            wait = max(wait, min(retry_after_s, self.max_retry_after_s))
        return wait


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """Retry-After as seconds (delta-seconds or an HTTP date); None if absent or unreadable."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = parsedate_to_datetime(value).timestamp()
    except (TypeError, ValueError, IndexError):
        return None
    return max(0.0, when - (time.time() if now is None else now))


class RequestFailed(Exception):
    """A request failed for good: a final status, or retries exhausted (``status`` None: no HTTP answer)."""

    def __init__(self, message: str, status: int | None = None, body: Any = None, attempts: int = 0):
        super().__init__(message)
        self.status, self.body, self.attempts = status, body, attempts


@dataclass
class FeedbackOutcome:
    """What happened to one reward: 'accepted', 'duplicate' (already recorded) or 'late'."""

    status: str
    decision_id: str
    attempts: int
    body: dict[str, Any]

    @property
    def recorded(self) -> bool:
        """The reward (or an earlier one for this decision) is in the durable log."""
        return self.status in ("accepted", "duplicate", "late")


class RouterClient:
    """Async client for /v1/route and /v1/feedback that applies a :class:`RetryPolicy`.

    ``async with RouterClient(base_url) as client: d = await client.route({...})``.
    Counters: ``requests``, ``retries``, ``failures`` (requests that failed for good).
    """

    def __init__(self, base_url: str, policy: RetryPolicy | None = None, timeout_s: float = 30.0,
                 client: httpx.AsyncClient | None = None, seed: int | None = None, max_connections: int = 100):
        self.policy = policy or RetryPolicy()
        self.policy.validate()
        self._own = client is None
        self._client = client or httpx.AsyncClient(
            base_url=base_url, timeout=timeout_s, trust_env=False,
            limits=httpx.Limits(max_connections=max_connections, max_keepalive_connections=max_connections),
        )
        self._rng = random.Random(seed)
        self.requests = 0
        self.retries = 0
        self.failures = 0

    async def __aenter__(self) -> "RouterClient":
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        if self._own:
            await self._client.aclose()

    async def post(self, path: str, body: dict[str, Any], final_ok: tuple[int, ...] = ()) -> tuple[int, Any, int]:
        """POST with retries; (status, JSON body, attempts) for a 2xx or a status in ``final_ok``."""
        self.requests += 1
        last: str = ""
        for attempt in range(self.policy.attempts):
            if attempt:
                self.retries += 1
            retry_after = None
            try:
                resp = await self._client.post(path, json=body)
            except httpx.TransportError as exc:  # refused, reset, timed out: nothing or something happened; both retry-safe
                last = f"{type(exc).__name__}: {exc}"
            else:
                try:
                    payload = resp.json()
                except ValueError:
                    payload = resp.text
                if resp.is_success or resp.status_code in final_ok:
                    return resp.status_code, payload, attempt + 1
                if not self.policy.retryable_status(resp.status_code):
                    self.failures += 1
                    raise RequestFailed(f"POST {path}: HTTP {resp.status_code}: {str(payload)[:300]}", resp.status_code, payload, attempt + 1)
                last = f"HTTP {resp.status_code}: {str(payload)[:300]}"
                retry_after = parse_retry_after(resp.headers.get("retry-after"))
            if attempt + 1 < self.policy.attempts:
                await asyncio.sleep(self.policy.delay(attempt, retry_after, self._rng))
        self.failures += 1
        raise RequestFailed(f"POST {path}: gave up after {self.policy.attempts} attempts ({last})", None, None, self.policy.attempts)

    async def route(self, body: dict[str, Any]) -> dict[str, Any]:
        """POST /v1/route; the decision (``decision_id``, ``model``, ...)."""
        _, payload, _ = await self.post("/v1/route", body)
        return payload

    async def feedback(self, decision_id: str, score: float, cost: float | None = None) -> FeedbackOutcome:
        """POST /v1/feedback; 'accepted', or 'duplicate' when this decision already has a reward (200 or 409)."""
        body: dict[str, Any] = {"decision_id": decision_id, "score": score}
        if cost is not None:
            body["cost"] = cost
        status, payload, attempts = await self.post("/v1/feedback", body, final_ok=(409,))
        if status == 409:
            if not (isinstance(payload, dict) and "duplicate" in str(payload).lower()):
                self.failures += 1
                raise RequestFailed(f"POST /v1/feedback: HTTP 409: {str(payload)[:300]}", 409, payload, attempts)
            return FeedbackOutcome("duplicate", decision_id, attempts, payload)
        return FeedbackOutcome(str(payload.get("status")), decision_id, attempts, payload)
