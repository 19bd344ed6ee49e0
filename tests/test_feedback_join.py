"""The join of rewards to decisions, without Ray: window, first reward wins, duplicates, late, unknown."""

from __future__ import annotations

import pytest

from banditroute.feedback.batching import MicroBatcher
from banditroute.feedback.join import (
    Finished,
    JoinConfig,
    RewardJoiner,
    RewardStatus,
    RewardValidationError,
)
from banditroute.core.records import DecisionRecord, RewardRecord


def decision(did: str, t: float = 100.0, upstream_cost: float | None = None) -> DecisionRecord:
    return DecisionRecord(
        decision_id=did, time=t, embedding=[0.1, 0.2], w_cost=0.3, candidates=["a", "b"], chosen_model="a",
        probability=0.6, policy_version=3, upstream_cost=upstream_cost,
    )


def reward(did: str, score: float = 1.0, cost: float | None = 0.01, t: float = 101.0) -> RewardRecord:
    return RewardRecord(decision_id=did, score=score, cost=cost, time=t)


def test_first_reward_wins_and_duplicates_are_counted():
    j = RewardJoiner(JoinConfig(window_s=10))
    j.add_decision(decision("d1"))
    first = j.submit_reward(reward("d1", score=1.0), now=101)
    assert first.status is RewardStatus.ACCEPTED and first.event.score == 1.0
    # While the first is being written, a second is a duplicate "in flight".
    dup_inflight = j.submit_reward(reward("d1", score=0.0), now=101.5)
    assert dup_inflight.status is RewardStatus.DUPLICATE and dup_inflight.in_flight
    j.commit("d1", now=102)
    dup = j.submit_reward(reward("d1", score=0.0), now=103)
    assert dup.status is RewardStatus.DUPLICATE and dup.finished_as is Finished.REWARDED
    c = j.counters
    assert (c.rewards_received, c.rewards_accepted, c.rewards_duplicate, c.events_committed) == (3, 1, 2, 1)
    assert c.pending == 0 and c.committing == 0


def test_cost_defaults_to_upstream_cost_then_zero():
    j = RewardJoiner(JoinConfig(window_s=10))
    j.add_decision(decision("proxied", upstream_cost=0.004))
    j.add_decision(decision("routed"))
    assert j.submit_reward(reward("proxied", cost=None), now=101).event.cost == 0.004
    assert j.submit_reward(reward("routed", cost=None), now=101).event.cost == 0.0
    j.add_decision(decision("explicit", upstream_cost=0.004))
    assert j.submit_reward(reward("explicit", cost=0.5), now=101).event.cost == 0.5


def test_unknown_ids_and_duplicate_decisions():
    j = RewardJoiner(JoinConfig(window_s=10))
    assert j.submit_reward(reward("nope"), now=101).status is RewardStatus.UNKNOWN
    assert j.add_decision(decision("d1")) is True
    assert j.add_decision(decision("d1")) is False
    assert j.counters.rewards_unknown == 1 and j.counters.decisions_duplicate == 1


@pytest.mark.parametrize("on_expiry", ["default", "drop"])
def test_window_expiry_default_or_drop_then_late(on_expiry):
    j = RewardJoiner(JoinConfig(window_s=10, on_expiry=on_expiry, default_score=0.25))
    j.add_decision(decision("old", t=100, upstream_cost=0.002))
    j.add_decision(decision("new", t=108))
    expired = j.expire(now=111)  # "old" closed at 110; "new" is open until 118
    if on_expiry == "default":
        assert [e.decision.decision_id for e in expired] == ["old"]
        assert expired[0].join_status == "defaulted" and expired[0].score == 0.25 and expired[0].cost == 0.002
        j.commit("old", now=111)
        assert j.counters.expired_defaulted == 1
    else:
        assert expired == [] and j.counters.expired_dropped == 1
    late = j.submit_reward(reward("old"), now=112)
    assert late.status is RewardStatus.LATE
    assert late.finished_as is (Finished.DEFAULTED if on_expiry == "default" else Finished.DROPPED)
    assert j.counters.rewards_late == 1
    assert j.submit_reward(reward("new"), now=112).status is RewardStatus.ACCEPTED


def test_reward_after_deadline_is_late_even_before_the_sweep():
    j = RewardJoiner(JoinConfig(window_s=10, on_expiry="drop"))
    j.add_decision(decision("d", t=100))
    assert j.submit_reward(reward("d"), now=110.5).status is RewardStatus.LATE
    assert j.counters.expired_dropped == 1 and j.counters.rewards_accepted == 0


def test_abort_puts_the_decision_back_so_a_retry_can_succeed():
    j = RewardJoiner(JoinConfig(window_s=10))
    j.add_decision(decision("d"))
    assert j.submit_reward(reward("d"), now=101).status is RewardStatus.ACCEPTED
    j.abort("d")
    assert j.counters.commit_failures == 1 and j.is_pending("d")
    assert j.submit_reward(reward("d"), now=102).status is RewardStatus.ACCEPTED


def test_finished_ids_are_forgotten_after_remember_s():
    j = RewardJoiner(JoinConfig(window_s=10, remember_s=50))
    j.add_decision(decision("d"))
    j.submit_reward(reward("d"), now=101)
    j.commit("d", now=101)
    j.expire(now=140)
    assert j.submit_reward(reward("d"), now=140).status is RewardStatus.DUPLICATE
    j.expire(now=200)
    assert j.submit_reward(reward("d"), now=200).status is RewardStatus.UNKNOWN


def test_max_pending_expires_the_oldest():
    j = RewardJoiner(JoinConfig(window_s=10, max_pending=2))
    for i, t in enumerate([100, 101, 102]):
        j.add_decision(decision(f"d{i}", t=t), now=t)
    assert j.counters.pending == 2 and j.counters.pending_overflow == 1
    assert j.submit_reward(reward("d0"), now=103).status is RewardStatus.LATE


@pytest.mark.parametrize(
    "bad, field",
    [
        (RewardRecord("", 0.5), "decision_id"),
        (RewardRecord("d", 1.5), "score"),
        (RewardRecord("d", -0.1), "score"),
        (RewardRecord("d", float("nan")), "score"),
        (RewardRecord("d", True), "score"),
        (RewardRecord("d", 0.5, cost=-1.0), "cost"),
    ],
)
def test_invalid_rewards_name_the_field(bad, field):
    j = RewardJoiner()
    with pytest.raises(RewardValidationError) as err:
        j.submit_reward(bad, now=0)
    assert err.value.field == field
    assert j.counters.rewards_invalid == 1


def test_restore_from_logs():
    j = RewardJoiner(JoinConfig(window_s=10, on_expiry="default"))
    restored = j.restore(
        [decision("done", t=100), decision("waiting", t=105), decision("expired", t=80)],
        {"done": "rewarded"},
        now=106,
    )
    assert restored == 2
    assert j.submit_reward(reward("done"), now=106).status is RewardStatus.DUPLICATE
    assert j.submit_reward(reward("waiting"), now=106).status is RewardStatus.ACCEPTED
    assert [e.decision.decision_id for e in j.expire(now=106)] == ["expired"]


def test_micro_batcher_size_and_delay():
    b = MicroBatcher(batch_size=3, max_delay_s=0.5, max_batch=4)
    b.add([1, 2], now=0.0)
    assert not b.is_due(0.1) and b.take(0.1) == []
    assert b.is_due(0.5) and b.take(0.5) == [1, 2]
    b.add([1, 2, 3, 4, 5, 6], now=1.0)
    assert b.take(1.0) == [1, 2, 3, 4]  # capped at max_batch
    assert b.take(1.0) == []  # 2 left, not due yet (their clock restarted at the split)
    assert b.take(1.0, force=True) == [5, 6]
