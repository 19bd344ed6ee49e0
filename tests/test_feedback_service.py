"""FeedbackService without Ray: ack only after the durable write, recovery, batching to the learner.

Time-driven behaviour (grace period, batch delay, back-off, window expiry) runs on a ManualClock
that the test advances; no test sleeps for time to pass.
"""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from conftest import ManualClock

from banditroute.serve.feedback_endpoint import ack_to_http, parse_feedback_body
from banditroute.serve.protocol import RequestError as FeedbackError
from banditroute.feedback.join import JoinConfig
from banditroute.feedback.log import EventLog
from banditroute.feedback.clock import SystemClock
from banditroute.feedback.config import FeedbackConfig
from banditroute.feedback.delivery import FIRST_BACKOFF_S, MAX_BACKOFF_S, BatchRejected, next_backoff
from banditroute.feedback.service import FeedbackService
from banditroute.core.records import DecisionRecord, RewardRecord
from banditroute.core.storage import open_storage


def decision(did: str, t: float | None = None) -> DecisionRecord:
    return DecisionRecord(
        decision_id=did, time=time.time() if t is None else t, embedding=[0.5, -0.5, 0.25], w_cost=0.2,
        candidates=["a", "b"], chosen_model="b", probability=0.4, policy_version=7, encoder_id="enc",
    )


class GatedLog(EventLog):
    """An EventLog whose event writes wait for a gate (and can be made to fail)."""

    def __init__(self, storage):
        super().__init__(storage)
        self.gate = threading.Event()
        self.gate.set()
        self.entered = threading.Event()  # an event write has reached the gate
        self.fail = False

    def write_table(self, key, table):
        if key.startswith("events/"):
            self.entered.set()
            assert self.gate.wait(10)
            if self.fail:
                raise OSError("storage down")
        return super().write_table(key, table)


def run(coro):
    return asyncio.run(coro)


def test_ack_only_after_the_event_is_durable(tmp_path):
    async def scenario():
        log = GatedLog(open_storage(str(tmp_path)))
        svc = FeedbackService(FeedbackConfig(send_to_learner=False), log)
        await svc.record_decisions([decision("d1")])
        log.gate.clear()
        task = asyncio.create_task(svc.submit_reward(RewardRecord("d1", 0.9, 0.001)))
        assert await asyncio.to_thread(log.entered.wait, 10), "the event write never started"
        for _ in range(20):  # whatever could run without the write finishing has run
            await asyncio.sleep(0)
        assert not task.done(), "acknowledged before the write completed"
        assert log.read_events().num_rows == 0
        log.gate.set()
        ack = await asyncio.wait_for(task, 5)
        assert ack["status"] == "accepted" and ack["policy_version"] == 7
        table = log.read_events()
        assert table.column("decision_id").to_pylist() == ["d1"] and table.column("score").to_pylist() == [0.9]
        await svc.stop()

    run(scenario())


def test_failed_write_is_not_acknowledged_and_a_retry_succeeds(tmp_path):
    async def scenario():
        log = GatedLog(open_storage(str(tmp_path)))
        svc = FeedbackService(FeedbackConfig(send_to_learner=False), log)
        await svc.record_decisions([decision("d1")])
        log.fail = True
        ack = await svc.submit_reward(RewardRecord("d1", 1.0))
        assert ack["status"] == "unavailable"
        assert ack_to_http(ack)[0] == 503
        log.fail = False
        assert (await svc.submit_reward(RewardRecord("d1", 1.0)))["status"] == "accepted"
        assert (await svc.submit_reward(RewardRecord("d1", 0.0)))["status"] == "duplicate"
        stats = svc.stats()
        assert stats["commit_failures"] == 1 and stats["events_committed"] == 1 and stats["rewards_duplicate"] == 1
        assert log.read_events().num_rows == 1
        await svc.stop()

    run(scenario())


def test_reward_waits_briefly_for_a_trailing_decision_then_unknown(tmp_path):
    async def scenario():
        clock = ManualClock(1000.0)
        log = EventLog(open_storage(str(tmp_path)))
        svc = FeedbackService(FeedbackConfig(send_to_learner=False, unknown_grace_s=0.5), log, clock=clock)
        early = asyncio.create_task(svc.submit_reward(RewardRecord("d1", 1.0)))
        await clock.settle()
        assert not early.done()  # waiting for its decision
        await svc.record_decisions([decision("d1", clock.now())])
        assert (await early)["status"] == "accepted"  # the decision's arrival woke it; no time passed
        never = asyncio.create_task(svc.submit_reward(RewardRecord("never", 1.0)))
        await clock.advance(0.25)
        assert not never.done(), "gave up before unknown_grace_s"
        await clock.advance(0.25)
        assert never.done(), "still waiting after unknown_grace_s"
        ack = never.result()
        assert ack["status"] == "unknown"
        status, body, _ = ack_to_http(ack)
        assert status == 404 and body["error"]["field"] == "decision_id"
        await svc.stop()

    run(scenario())


def test_batches_reach_the_learner_by_size_and_by_delay(tmp_path):
    async def scenario():
        got: list[int] = []

        async def deliver(table):
            got.append(table.num_rows)
            return {"updated": True}

        clock = ManualClock(1000.0)
        log = EventLog(open_storage(str(tmp_path)))
        cfg = FeedbackConfig(learner_batch_size=4, learner_max_delay_s=0.25)
        svc = FeedbackService(cfg, log, deliver=deliver, clock=clock)
        await svc.record_decisions([decision(f"d{i}", clock.now()) for i in range(6)])
        await asyncio.gather(*(svc.submit_reward(RewardRecord(f"d{i}", 1.0)) for i in range(4)))
        await clock.settle()
        assert got == [4]  # full batch went at once
        await svc.submit_reward(RewardRecord("d4", 0.0))
        await clock.advance(0.125)
        assert got == [4]  # 1 event waits for the delay
        await clock.advance(0.125)
        assert got == [4, 1]
        await svc.submit_reward(RewardRecord("d5", 0.0))
        stats = await svc.flush()
        assert got == [4, 1, 1] and stats["events_sent"] == 6 and stats["queued_for_learner"] == 0
        await svc.stop()

    run(scenario())


def test_learner_failures_keep_the_events_for_a_retry(tmp_path):
    async def scenario():
        calls = {"n": 0, "rows": 0}

        async def flaky(table):
            calls["n"] += 1
            if calls["n"] == 1:
                raise RuntimeError("learner restarting")
            calls["rows"] += table.num_rows
            return {}

        clock = ManualClock(1000.0)
        svc = FeedbackService(FeedbackConfig(learner_batch_size=2, learner_max_delay_s=0.05), EventLog(open_storage(str(tmp_path))),
                              deliver=flaky, clock=clock)
        await svc.record_decisions([decision("a", clock.now()), decision("b", clock.now())])
        await svc.submit_rewards([RewardRecord("a", 1.0), RewardRecord("b", 1.0)])
        await clock.settle()
        assert calls == {"n": 1, "rows": 0} and svc.stats()["queued_for_learner"] == 2  # failed; kept for a retry
        await clock.advance(FIRST_BACKOFF_S / 2)
        assert calls["n"] == 1, "retried before the back-off"
        await clock.advance(FIRST_BACKOFF_S)
        assert calls == {"n": 2, "rows": 2} and svc.stats()["learner_errors"] == 1
        await svc.stop()

    run(scenario())


def test_restart_recovers_pending_and_finished_decisions(tmp_path):
    async def first_life():
        svc = FeedbackService(FeedbackConfig(send_to_learner=False), EventLog(open_storage(str(tmp_path))))
        await svc.record_decisions([decision("rewarded"), decision("pending")])
        assert (await svc.submit_reward(RewardRecord("rewarded", 1.0)))["status"] == "accepted"
        await svc.stop()

    async def second_life():
        svc = FeedbackService(FeedbackConfig(send_to_learner=False), EventLog(open_storage(str(tmp_path))))
        recovered = svc.recover()
        assert recovered == {"finished": 1, "decisions_read": 2, "pending": 1}
        assert (await svc.submit_reward(RewardRecord("rewarded", 0.0)))["status"] == "duplicate"
        assert (await svc.submit_reward(RewardRecord("pending", 0.5)))["status"] == "accepted"
        assert sorted(svc.log.read_events().column("decision_id").to_pylist()) == ["pending", "rewarded"]
        await svc.stop()

    run(first_life())
    run(second_life())


def test_expired_decisions_default_and_late_rewards_are_logged(tmp_path):
    async def scenario():
        clock = ManualClock(1000.0)
        cfg = FeedbackConfig(send_to_learner=False, sweep_interval_s=60.0,  # the explicit sweep() below closes the window
                             join=JoinConfig(window_s=5, on_expiry="default", default_score=0.0))
        svc = FeedbackService(cfg, EventLog(open_storage(str(tmp_path))), clock=clock)
        await svc.record_decisions([decision("d", t=1000.0)])
        await clock.advance(6.0)
        assert await svc.sweep() == 1
        ack = await svc.submit_reward(RewardRecord("d", 1.0))
        assert ack["status"] == "late" and ack["finished_as"] == "defaulted"
        assert ack_to_http(ack)[1]["trained"] is False
        events = svc.log.read_events()
        assert events.column("join_status").to_pylist() == ["defaulted"]
        assert svc.log.read_late().column("decision_id").to_pylist() == ["d"]
        await svc.stop()

    run(scenario())


@pytest.mark.parametrize(
    "body, status, field",
    [
        ([1, 2], 400, "body"),
        ({"score": 0.5}, 422, "decision_id"),
        ({"decision_id": 5, "score": 0.5}, 422, "decision_id"),
        ({"decision_id": "x"}, 422, "score"),
        ({"decision_id": "x", "score": "high"}, 422, "score"),
        ({"decision_id": "x", "score": 1.2}, 422, "score"),
        ({"decision_id": "x", "score": 0.5, "cost": -1}, 422, "cost"),
        ({"decision_id": "x", "score": 0.5, "scroe": 1}, 422, "scroe"),
    ],
)
def test_http_body_validation_names_the_field(body, status, field):
    with pytest.raises(FeedbackError) as err:
        parse_feedback_body(body)
    assert err.value.status == status and err.value.field == field


def test_a_batch_the_learner_rejects_is_not_retried_forever(tmp_path):
    async def scenario():
        calls = {"n": 0}

        async def poison(table):
            calls["n"] += 1
            raise BatchRejected("update() raised")

        clock = ManualClock(1000.0)
        svc = FeedbackService(FeedbackConfig(learner_batch_size=1, learner_max_delay_s=0.0), EventLog(open_storage(str(tmp_path))),
                              deliver=poison, clock=clock)
        await svc.record_decisions([decision("a", clock.now())])
        assert (await svc.submit_reward(RewardRecord("a", 1.0)))["status"] == "accepted"
        await clock.advance(2 * MAX_BACKOFF_S)  # past any back-off: a retry would have happened by now
        stats = svc.stats()
        assert calls["n"] == 1 and stats["batches_rejected"] == 1 and stats["queued_for_learner"] == 0
        assert svc.log.read_events().num_rows == 1  # still in the log
        await svc.stop()

    run(scenario())


def test_the_sweep_loop_closes_windows_on_its_interval(tmp_path):
    async def scenario():
        clock = ManualClock(1000.0)
        cfg = FeedbackConfig(send_to_learner=False, sweep_interval_s=1.0, join=JoinConfig(window_s=5, on_expiry="default"))
        svc = FeedbackService(cfg, EventLog(open_storage(str(tmp_path))), clock=clock)
        await svc.record_decisions([decision("d", t=1000.0)])
        await clock.advance(4.0)  # the loop swept, inside the window
        assert svc.stats()["expired_defaulted"] == 0
        await clock.advance_until(lambda: svc.stats()["events_committed"] == 1, step_s=1.0, what="the defaulted event")
        assert clock.now() > 1005.0 and svc.log.read_events().column("join_status").to_pylist() == ["defaulted"]
        await svc.stop()

    run(scenario())


def test_back_off_doubles_up_to_its_cap():
    assert next_backoff(0.0) == FIRST_BACKOFF_S
    assert next_backoff(FIRST_BACKOFF_S) == 2 * FIRST_BACKOFF_S
    assert next_backoff(MAX_BACKOFF_S) == MAX_BACKOFF_S


def test_system_clock_wait_reports_whether_the_event_was_set():
    async def scenario():
        clock, event = SystemClock(), asyncio.Event()
        assert await clock.wait(event, 0.0) is False
        event.set()
        assert await clock.wait(event, 0.0) is True and await clock.wait(event, None) is True

    run(scenario())
