"""Metrics of the feedback actor: feedback-to-learner delivery lag, the learner queue, spend per tenant.

What the alerts in k8s/overlays/prod/prometheus-rules.yaml read (Prometheus
sees ``ray_<name>``):

- ``banditroute_feedback_delivery_lag_s`` (histogram): per batch handed to
  the learner, seconds from its oldest event's reward (or window close) to
  the learner's answer: how stale the learner's input is;
- ``banditroute_feedback_last_delivery_timestamp_seconds``: wall time of the
  last batch the learner took;
- ``banditroute_feedback_learner_queue_events``: committed events waiting for
  the learner (set at each delivery attempt: a missing learner is retried
  every few seconds, so it keeps moving while the learner is away);
- ``banditroute_feedback_delivery_errors_total{kind}``: ``unavailable``
  (learner missing/restarting, retried) or ``rejected`` (a poison batch);
- ``banditroute_spend_usd_total{tenant}``: USD cost of the accepted rewards,
  counted once per decision after it is durable (the ingress's
  ``banditroute_feedback_cost_usd_total`` counts per replica, without tenants).

:meth:`FeedbackMetrics.wrap` wraps the actor's deliver callback; the lag
arithmetic is the pure :func:`batch_lag_s`.
"""

from __future__ import annotations

import time
from typing import Any, Awaitable, Callable

import pyarrow as pa
import pyarrow.compute as pc

from banditroute.core.actor_metrics import metric
from banditroute.feedback.delivery import BatchRejected

LAG_BOUNDARIES_S = [0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600, 1800, 3600]


def batch_lag_s(table: pa.Table, now: float) -> float | None:
    """Seconds from the oldest ``reward_time`` in a batch of joined events to ``now`` (None: empty or no column)."""
    if len(table) == 0 or "reward_time" not in table.column_names:
        return None
    oldest = pc.min(table.column("reward_time")).as_py()
    return None if oldest is None else max(0.0, now - float(oldest))


class FeedbackMetrics:
    """The feedback actor's metrics (no-ops outside a Ray worker)."""

    def __init__(self, clock: Callable[[], float] = time.time):
        self.clock = clock
        self.m_lag = metric("histogram", "banditroute_feedback_delivery_lag_s",
                            "Seconds from a delivered batch's oldest reward to the learner taking it.", (), LAG_BOUNDARIES_S)
        self.m_last_delivery = metric("gauge", "banditroute_feedback_last_delivery_timestamp_seconds",
                                      "Wall time the learner last took a batch of events.")
        self.m_queue = metric("gauge", "banditroute_feedback_learner_queue_events", "Committed events waiting for the learner.")
        self.m_errors = metric("counter", "banditroute_feedback_delivery_errors_total",
                               "Failed deliveries to the learner: unavailable (retried) or rejected (dropped; in the log).",
                               ("kind",))
        self.m_spend = metric("counter", "banditroute_spend_usd_total",
                              "USD cost of accepted rewards (once per decision, after it is durable), by tenant.", ("tenant",))

    def wrap(self, deliver: Callable[[pa.Table], Awaitable[Any]], queued: Callable[[], int]) -> Callable[[pa.Table], Awaitable[Any]]:
        """``deliver`` with its outcome measured; ``queued()``: events still waiting (read at each attempt)."""

        async def measured(table: pa.Table) -> Any:
            self.m_queue.set(float(queued()))
            try:
                out = await deliver(table)
            except BatchRejected:
                self.m_errors.inc(tags={"kind": "rejected"})
                raise
            except Exception:
                self.m_errors.inc(tags={"kind": "unavailable"})
                raise
            now = self.clock()
            lag = batch_lag_s(table, now)
            if lag is not None:
                self.m_lag.observe(lag)
            self.m_last_delivery.set(now)
            return out

        return measured

    def rewarded(self, answer: dict[str, Any]) -> dict[str, Any]:
        """Count an accepted reward's cost by tenant; returns the service's answer unchanged."""
        cost = answer.get("cost")
        if answer.get("status") == "accepted" and isinstance(cost, (int, float)) and cost > 0:
            self.m_spend.inc(float(cost), tags={"tenant": answer.get("tenant") or ""})
        return answer
