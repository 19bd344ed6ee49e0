"""Metrics and replica identity of the Serve deployments.

Metrics are ``ray.serve.metrics`` (exported on each node's Ray metrics port;
docs/serving.md lists them). Outside a real replica (Serve's local testing
mode, plain Python) every metric is a no-op, so the deployments run there
unchanged.
"""

from __future__ import annotations

import logging
import os
import uuid

from banditroute.core.actor_metrics import NoMetric, make_metric
from ray import serve
from ray.serve import metrics as serve_metrics

logger = logging.getLogger("banditroute.serve")

LATENCY_BOUNDARIES_MS = [1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 30000]
BATCH_BOUNDARIES = [1, 2, 4, 8, 16, 32, 64, 128, 256, 512]


def metric(kind: str, name: str, description: str, tag_keys: tuple[str, ...] = (), boundaries: list[float] | None = None):
    """A ``counter``, ``gauge`` or ``histogram`` (with ``boundaries``), or a NoMetric outside a replica."""
    try:
        serve.get_replica_context()  # raises outside a real replica (local testing mode)
        return make_metric(serve_metrics, kind, name, description, tag_keys, boundaries)
    except Exception as exc:  # noqa: BLE001 - e.g. local testing mode without a Ray worker
        logger.debug("metric %s disabled: %s", name, exc)
        return NoMetric()


STAGE_LATENCY_METRIC = "banditroute_stage_latency_ms"
"""Histogram of each stage's latency (serve/stages.py STAGES), tag ``stage``."""


def stage_histogram():
    """The per-stage latency histogram as a serve/stages.py observer ``(stage, ms) -> None``."""
    hist = metric("histogram", STAGE_LATENCY_METRIC, "Latency of each stage of a request (ms): parse, tokenize, "
                  "encode, decide (per batch), log (per batch), upstream.", ("stage",), LATENCY_BOUNDARIES_MS)

    def observe(stage: str, ms: float) -> None:
        hist.observe(ms, tags={"stage": stage})

    return observe


def replica_id() -> str:
    """This Serve replica's id (answers and metrics carry it), or a unique local name outside Serve."""
    try:
        ctx = serve.get_replica_context()
        return str(getattr(ctx.replica_id, "unique_id", None) or ctx.replica_tag)
    except Exception:  # noqa: BLE001 - local testing mode
        return f"local-{os.getpid()}-{uuid.uuid4().hex[:6]}"
