"""Metrics of the learner actor: gate state, last promotion, how long the gate has held, last update.

What the alerts in k8s/overlays/prod/prometheus-rules.yaml read (Prometheus
sees ``ray_<name>``):

- ``banditroute_learner_last_update_timestamp_seconds``: wall time of the
  last update that changed the candidate (learner stalled: ``time() -`` it);
- ``banditroute_gate_last_promotion_timestamp_seconds``: when the served
  weights last changed (a promotion, a pin, or the actor's start);
- ``banditroute_gate_held_since_timestamp_seconds``: when the gate first held
  since the last promotion (0 while it is not holding): ``time() -`` it is
  how long replicas have been kept on old weights;
- ``banditroute_gate_state{state}``: 1 for the current state of
  :data:`GATE_STATES`, 0 for the others;
- ``banditroute_gate_decisions_total{decision}``: gate checks, promote/hold;
- ``banditroute_learner_serving_version`` / ``banditroute_learner_candidate_version``.

The state is pure (:class:`GateTimes`, :func:`gate_state`); the actor calls
:func:`observe_update` once per update, which is the only line it needs
(learner/actor.py stays a thin shell).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable

from banditroute.core.actor_metrics import metric

GATE_STATES = ("off", "pinned", "waiting", "promoted", "holding")
"""off: no gate (every update served); pinned: an operator pinned weights; waiting: no check yet;
promoted / holding: the last check's outcome."""


def gate_state(enabled: bool, pinned: bool, last_promote: bool | None) -> str:
    """The gate's state from its settings and the last check's outcome (None: no check yet)."""
    if pinned:
        return "pinned"
    if not enabled:
        return "off"
    if last_promote is None:
        return "waiting"
    return "promoted" if last_promote else "holding"


@dataclass
class GateTimes:
    """When the served weights last changed, and since when the gate has held them (None: not holding)."""

    last_promotion_at: float
    held_since: float | None = None
    last_promote: bool | None = None

    def served_changed(self, now: float) -> None:
        """New served weights (a promotion or a pin): nothing is held any more."""
        self.last_promotion_at, self.held_since = now, None

    def checked(self, promote: bool, now: float) -> None:
        """One gate check: a promotion resets the hold; the first hold after it starts the clock."""
        self.last_promote = promote
        if promote:
            self.served_changed(now)
        elif self.held_since is None:
            self.held_since = now


class LearnerMetrics:
    """The learner actor's gauges and counters (no-ops outside a Ray worker)."""

    def __init__(self, started_at: float, serving_version: int, clock: Callable[[], float] = time.time):
        self.clock = clock
        self.times = GateTimes(started_at)
        self.serving_version = serving_version
        self.last_update_at = 0.0
        self.m_last_update = metric("gauge", "banditroute_learner_last_update_timestamp_seconds",
                                    "Wall time of the learner's last update that changed the candidate (0: none yet).")
        self.m_last_promotion = metric("gauge", "banditroute_gate_last_promotion_timestamp_seconds",
                                       "Wall time the served weights last changed (promotion, pin, or learner start).")
        self.m_held_since = metric("gauge", "banditroute_gate_held_since_timestamp_seconds",
                                   "Wall time the promotion gate first held since the last promotion (0: not holding).")
        self.m_state = metric("gauge", "banditroute_gate_state", "1 for the promotion gate's current state.", ("state",))
        self.m_decisions = metric("counter", "banditroute_gate_decisions_total", "Promotion gate checks by decision.", ("decision",))
        self.m_serving = metric("gauge", "banditroute_learner_serving_version", "Version the learner tells replicas to serve.")
        self.m_candidate = metric("gauge", "banditroute_learner_candidate_version", "Version of the candidate the learner trains.")

    def observe(self, *, enabled: bool, pinned: bool, serving_version: int, candidate_version: int,
                update: dict[str, Any] | None = None) -> str:
        """Record one update's outcome (``update``: the learner's metrics dict) and export; returns the gate state."""
        now = self.clock()
        update = update or {}
        if update.get("updated"):
            self.last_update_at = now
        promotion = update.get("promotion")
        if promotion is not None:
            promote = bool(promotion.get("promote"))
            self.times.checked(promote, now)
            self.m_decisions.inc(tags={"decision": "promote" if promote else "hold"})
        elif serving_version != self.serving_version:  # a pin, or weights served without the gate
            self.times.served_changed(now)
        self.serving_version = serving_version
        state = gate_state(enabled, pinned, self.times.last_promote)
        if state != "holding":
            self.times.held_since = None
        self.m_last_update.set(self.last_update_at)
        self.m_last_promotion.set(self.times.last_promotion_at)
        self.m_held_since.set(self.times.held_since or 0.0)
        for s in GATE_STATES:
            self.m_state.set(1.0 if s == state else 0.0, tags={"state": s})
        self.m_serving.set(serving_version)
        self.m_candidate.set(candidate_version)
        return state


def observe_update(actor: Any, update: dict[str, Any]) -> dict[str, Any]:
    """Export the learner actor's state after one update; returns ``update`` unchanged.

    The LearnerMetrics lives on the actor, made at its first update (so the
    actor's constructor needs no extra line)."""
    lm = actor.__dict__.get("_gate_metrics")
    if lm is None:
        lm = actor.__dict__["_gate_metrics"] = LearnerMetrics(actor.started_at, actor.serving_version)
    lm.observe(enabled=actor.gate.enabled, pinned=actor.pinned, serving_version=actor.serving_version,
               candidate_version=actor.learner.policy_version, update=update)
    return update
