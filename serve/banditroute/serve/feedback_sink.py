"""The "feedback-actor" decision sink: router replicas -> the feedback actor.

Registered in ``serve.decision_sinks.DECISION_SINKS`` as ``"feedback-actor"``.
Options (``decision_sink_options``):

- ``name`` (default ``banditroute-feedback``), ``namespace`` (default
  ``banditroute``): the feedback actor to send to;
- ``timeout_s`` (default 10): how long one emit waits for the actor;
- ``wait_durable`` (default true): wait until the actor has written the
  decisions to its decision log (the sink contract: when ``emit_table``
  returns the records are durable). With false, it returns once the call is
  submitted (lower latency; decisions in flight can be lost with the actor).

The Router calls it from a worker thread once per batch, so the blocking
``ray.get`` is fine. While the actor restarts, the send is retried (bounded
by ``timeout_s``); after that, errors propagate (the Router answers 503).
"""

from __future__ import annotations

import threading
import time
from typing import Any

import pyarrow as pa

from banditroute.core.names import FEEDBACK_ACTOR_NAME
from banditroute.core.names import NAMESPACE


class FeedbackActorSink:
    def __init__(self, options: dict[str, Any] | None = None):
        options = dict(options or {})
        self.name = str(options.pop("name", FEEDBACK_ACTOR_NAME))
        self.namespace = options.pop("namespace", NAMESPACE)
        self.timeout_s = float(options.pop("timeout_s", 10.0))
        self.wait_durable = bool(options.pop("wait_durable", True))
        if options:
            raise ValueError(f"decision_sink_options: unknown option(s) for 'feedback-actor': {sorted(options)}")
        if self.timeout_s <= 0:
            raise ValueError("decision_sink_options.timeout_s must be > 0")
        self._actor = None
        self._lock = threading.Lock()
        self.rows_sent = 0

    def _handle(self):
        import ray  # lazily: the sink registry (and so RouterConfig) is imported where Ray is absent or not yet needed

        with self._lock:
            if self._actor is None:
                self._actor = ray.get_actor(self.name, namespace=self.namespace)
            return self._actor

    def emit_table(self, table: pa.Table) -> None:
        """Send a batch's decisions; retried while the actor restarts, within ``timeout_s`` in all.

        A resend is safe: the feedback actor ignores decision ids it already
        holds (also after a restart, which rebuilds them from its decision log).
        """
        if table.num_rows == 0:
            return
        import ray  # lazily, as in _handle

        deadline = time.monotonic() + self.timeout_s
        backoff = 0.05
        while True:
            try:
                ref = self._handle().record_decisions_table.remote(table)
                if self.wait_durable:
                    ray.get(ref, timeout=max(0.001, deadline - time.monotonic()))
                break
            except (ray.exceptions.ActorUnavailableError, ray.exceptions.ActorDiedError, ValueError) as exc:
                # Restarting (unavailable), just died (a new incarnation is coming) or not registered yet
                # (ValueError from get_actor): look it up again, until the deadline.
                with self._lock:
                    self._actor = None
                if time.monotonic() + backoff >= deadline:
                    raise RuntimeError(f"feedback actor {self.name!r} unavailable for {self.timeout_s:g}s: {exc}") from None
                time.sleep(backoff)
                backoff = min(backoff * 2, 0.5)
            except Exception:
                with self._lock:
                    self._actor = None  # find it again next time
                raise
        self.rows_sent += table.num_rows

    def close(self) -> None:
        self._actor = None
