"""Metrics of the long-lived Ray actors (learner, feedback), in the style of serve/metrics.py.

``metric(kind, name, description, tag_keys, boundaries)`` is a
``ray.util.metrics`` Counter, Gauge or Histogram exported on the node's Ray
metrics port (Prometheus sees ``ray_<name>``), or a no-op outside a Ray
worker (unit tests, plain Python), so the actors' logic runs unchanged there.
docs/serving.md lists every metric.
"""

from __future__ import annotations

import logging
from typing import Any

logger = logging.getLogger(__name__)


class NoMetric:
    """Stands in for a metric where Ray's metrics are unavailable."""

    def inc(self, *a: Any, **k: Any) -> None:
        pass

    def observe(self, *a: Any, **k: Any) -> None:
        pass

    def set(self, *a: Any, **k: Any) -> None:
        pass


def make_metric(classes: Any, kind: str, name: str, description: str, tag_keys: tuple[str, ...] = (),
                boundaries: list[float] | None = None):
    """A ``counter``, ``gauge`` or ``histogram`` (with ``boundaries``) from ``classes``: ``ray.util.metrics``, or
    ``ray.serve.metrics`` (the same classes plus the replica's tags)."""
    if kind == "counter":
        return classes.Counter(name, description=description, tag_keys=tag_keys)
    if kind == "gauge":
        return classes.Gauge(name, description=description, tag_keys=tag_keys)
    return classes.Histogram(name, description=description, boundaries=boundaries, tag_keys=tag_keys)


def metric(kind: str, name: str, description: str, tag_keys: tuple[str, ...] = (), boundaries: list[float] | None = None):
    """A ``counter``, ``gauge`` or ``histogram`` (with ``boundaries``) of this Ray worker, or a NoMetric outside one."""
    try:
        import ray
        from ray.util import metrics

        if not ray.is_initialized():
            return NoMetric()
        return make_metric(metrics, kind, name, description, tag_keys, boundaries)
    except Exception as exc:  # noqa: BLE001 - metrics must never stop an actor
        logger.debug("metric %s disabled: %s", name, exc)
        return NoMetric()
