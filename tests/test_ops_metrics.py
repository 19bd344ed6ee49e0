"""The learner's and the feedback actor's metrics (issue 16): gate state, held-since, last update, delivery lag, spend."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pyarrow as pa
import pytest

from banditroute.feedback.delivery import BatchRejected
from banditroute.feedback.delivery_metrics import FeedbackMetrics, batch_lag_s
from banditroute.learner.gate_metrics import GATE_STATES, LearnerMetrics, gate_state, observe_update


class Recorder:
    """Stands in for a Ray metric: keeps the last value per tag set, and sums of inc()."""

    def __init__(self):
        self.values: dict[tuple, float] = {}
        self.observed: list[float] = []

    def set(self, value, tags=None):
        self.values[tuple(sorted((tags or {}).items()))] = value

    def inc(self, value=1.0, tags=None):
        key = tuple(sorted((tags or {}).items()))
        self.values[key] = self.values.get(key, 0.0) + value

    def observe(self, value, tags=None):
        self.observed.append(value)

    def __getitem__(self, tags):
        return self.values[tuple(sorted(tags.items()))]


def recorded(obj):
    for name in [n for n in vars(obj) if n.startswith("m_")]:
        setattr(obj, name, Recorder())
    return obj


def test_gate_state():
    assert gate_state(True, True, False) == "pinned" and gate_state(False, False, None) == "off"
    assert gate_state(True, False, None) == "waiting"
    assert gate_state(True, False, True) == "promoted" and gate_state(True, False, False) == "holding"


def test_learner_metrics_track_holds_promotions_pins_and_updates():
    now = [1000.0]
    lm = recorded(LearnerMetrics(started_at=900.0, serving_version=3, clock=lambda: now[0]))
    common = dict(enabled=True, pinned=False)
    assert lm.observe(**common, serving_version=3, candidate_version=4, update={"updated": True}) == "waiting"
    assert lm.m_last_update[{}] == 1000.0 and lm.m_last_promotion[{}] == 900.0 and lm.m_held_since[{}] == 0.0
    now[0] = 1100.0
    hold = {"updated": True, "promotion": {"promote": False, "reason": "ci overlaps"}}
    assert lm.observe(**common, serving_version=3, candidate_version=5, update=hold) == "holding"
    now[0] = 1200.0
    lm.observe(**common, serving_version=3, candidate_version=6, update=hold)
    assert lm.m_held_since[{}] == 1100.0  # since the FIRST hold after the last promotion
    assert lm.m_decisions[{"decision": "hold"}] == 2
    assert [lm.m_state[{"state": s}] for s in GATE_STATES] == [0, 0, 0, 0, 1]
    now[0] = 1300.0
    lm.observe(**common, serving_version=7, candidate_version=7, update={"updated": True, "promotion": {"promote": True}})
    assert lm.m_last_promotion[{}] == 1300.0 and lm.m_held_since[{}] == 0.0 and lm.m_serving[{}] == 7
    now[0] = 1400.0  # a pin between updates: the served version moved without a gate check
    assert lm.observe(enabled=True, pinned=True, serving_version=9, candidate_version=10, update={"updated": False}) == "pinned"
    assert lm.m_last_promotion[{}] == 1400.0 and lm.m_last_update[{}] == 1300.0  # no update at 1400


def test_observe_update_keeps_one_metrics_object_per_actor_and_returns_the_update():
    actor = SimpleNamespace(started_at=5.0, serving_version=1, pinned=False, gate=SimpleNamespace(enabled=False),
                            learner=SimpleNamespace(policy_version=1))
    update = {"updated": True, "events": 3}
    assert observe_update(actor, update) is update
    first = actor._gate_metrics
    observe_update(actor, {"updated": False})
    assert actor._gate_metrics is first and first.last_update_at > 0


def test_delivery_lag_queue_errors_and_spend():
    now = [200.0]
    fm = recorded(FeedbackMetrics(clock=lambda: now[0]))
    table = pa.table({"decision_id": ["a", "b"], "reward_time": [150.0, 190.0]})
    assert batch_lag_s(table, 200.0) == 50.0 and batch_lag_s(table.slice(0, 0), 200.0) is None

    outcomes = iter(["ok", ConnectionError("gone"), BatchRejected("bad")])

    async def deliver(t):
        out = next(outcomes)
        if isinstance(out, Exception):
            raise out
        return {"updated": True}

    measured = fm.wrap(deliver, lambda: 7)
    assert asyncio.run(measured(table)) == {"updated": True}
    assert fm.m_lag.observed == [50.0] and fm.m_last_delivery[{}] == 200.0 and fm.m_queue[{}] == 7
    for exc in (ConnectionError, BatchRejected):
        with pytest.raises(exc):
            asyncio.run(measured(table))
    assert fm.m_errors[{"kind": "unavailable"}] == 1 and fm.m_errors[{"kind": "rejected"}] == 1
    assert fm.m_lag.observed == [50.0]  # failures observe no lag

    for answer in ({"status": "accepted", "cost": 0.25, "tenant": "acme"}, {"status": "accepted", "cost": 0.5, "tenant": "acme"},
                   {"status": "accepted", "cost": 0.1, "tenant": ""}, {"status": "duplicate", "cost": 9.0, "tenant": "acme"},
                   {"status": "accepted", "cost": None, "tenant": "acme"}):
        assert fm.rewarded(answer) is answer
    assert fm.m_spend[{"tenant": "acme"}] == 0.75 and fm.m_spend[{"tenant": ""}] == 0.1


def test_the_feedback_service_reports_the_tenant_of_an_accepted_reward(tmp_path):
    from banditroute.core.records import DecisionRecord, RewardRecord
    from banditroute.core.storage import open_storage
    from banditroute.feedback.config import FeedbackConfig
    from banditroute.feedback.log import EventLog
    from banditroute.feedback.service import FeedbackService
    import numpy as np
    import time

    async def run():
        svc = FeedbackService(FeedbackConfig(send_to_learner=False, unknown_grace_s=0.0), EventLog(open_storage(str(tmp_path))))
        d = DecisionRecord(decision_id="d1", time=time.time(), embedding=np.zeros(4, np.float32), w_cost=0.3, candidates=["m"],
                           chosen_model="m", probability=1.0, policy_version=0, mode="greedy", tenant="acme")
        await svc.record_decisions([d])
        out = await svc.submit_reward(RewardRecord("d1", 1.0, 0.02, time.time()))
        await svc.stop()
        return out

    out = asyncio.run(run())
    assert out["status"] == "accepted" and out["tenant"] == "acme" and out["cost"] == 0.02
