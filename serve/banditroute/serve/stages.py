"""Latency per stage of a request: a histogram per stage, and an OpenTelemetry span per stage when tracing is on.

Stages (``STAGES``): ``parse`` (ingress: body -> RouteRequest), ``tokenize``,
``encode`` (encoder forward), ``decide`` (policy forward + sampling + the
device->host copy), ``log`` (the decision-log append), ``upstream`` (the chat
proxy's call to the model). ``StageClock.stage(name)`` times a block and
hands the milliseconds to every observer (the Serve histogram
``banditroute_stage_latency_ms{stage}``, serve/metrics.py; tests pass a
list), and opens a span named ``banditroute.<stage>`` when OpenTelemetry's
API is importable and a tracer provider is configured (else the API's
non-recording span, which costs a few microseconds).

On a GPU the encoder forward is asynchronous: ``encode`` measures the launch
and ``decide`` absorbs the wait, because the batch's only synchronisation is
the one device->host copy at its end (a sync per stage would slow every batch).

This module must not import Ray (RouterCore uses it where Ray is absent).
"""

from __future__ import annotations

import contextlib
import time
from typing import Any, Callable, Iterator, MutableMapping

STAGES = ("parse", "tokenize", "encode", "decide", "log", "upstream")
"""Every stage a request may go through, in order."""

StageObserver = Callable[[str, float], None]
"""Receives (stage, milliseconds) once per timed block."""

try:  # opentelemetry-api is optional: without it stages are timed but never traced
    from opentelemetry import propagate as _otel_propagate
    from opentelemetry import trace as _otel_trace
except ImportError:  # pragma: no cover - the dev environment ships opentelemetry-api
    _otel_trace = None
    _otel_propagate = None


def tracer() -> Any | None:
    """OpenTelemetry's tracer for banditroute (None without the API); non-recording until a provider is set."""
    return _otel_trace.get_tracer("banditroute") if _otel_trace is not None else None


def inject_trace_context(headers: MutableMapping[str, str]) -> MutableMapping[str, str]:
    """Add the current trace context (``traceparent``, ...) to outgoing ``headers`` (no-op without the API)."""
    if _otel_propagate is not None:
        _otel_propagate.inject(headers)
    return headers


@contextlib.contextmanager
def incoming_trace_context(headers: Any) -> Iterator[None]:
    """Make the caller's trace context (its ``traceparent`` header) the parent of spans opened in the block."""
    if _otel_propagate is None or headers is None:
        yield
        return
    from opentelemetry import context as otel_context

    token = otel_context.attach(_otel_propagate.extract(dict(headers)))
    try:
        yield
    finally:
        otel_context.detach(token)


class StageClock:
    """Times stages into observers and (when configured) OpenTelemetry spans."""

    def __init__(self, *observers: StageObserver, trace: bool = True):
        self.observers: list[StageObserver] = list(observers)
        self._tracer = tracer() if trace else None

    def add(self, observer: StageObserver) -> None:
        self.observers.append(observer)

    @contextlib.contextmanager
    def stage(self, name: str, **attributes: Any) -> Iterator[None]:
        """Time the block as stage ``name`` (one of STAGES); span attributes from ``attributes``."""
        if name not in STAGES:
            raise ValueError(f"unknown stage {name!r}; stages: {list(STAGES)}")
        span_cm = self._tracer.start_as_current_span(f"banditroute.{name}", attributes=attributes or None) \
            if self._tracer is not None else contextlib.nullcontext()
        start = time.perf_counter()
        try:
            with span_cm:
                yield
        finally:
            ms = (time.perf_counter() - start) * 1000.0
            for observe in self.observers:
                observe(name, ms)


NO_STAGES = StageClock(trace=False)
"""A clock with no observers and no tracing (the default of components built without metrics)."""
