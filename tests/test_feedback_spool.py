"""Storage outages without Ray: acknowledged rewards wait in a bounded local spool and reach the log once, in order.

The drain loop runs on a ManualClock: the tests advance it by the drain interval instead of sleeping.
"""

from __future__ import annotations

import asyncio
import time

import pytest

from conftest import ManualClock

from banditroute.serve.feedback_endpoint import ack_to_http
from banditroute.feedback.log import EventLog
from banditroute.feedback.config import FeedbackConfig
from banditroute.feedback.service import FeedbackService
from banditroute.feedback.spool import LocalSpool, SpoolFull
from banditroute.core.records import DecisionRecord, RewardRecord
from banditroute.core.storage import Storage, StorageUnavailable, open_storage
from banditroute.testkit.s3server import S3Proxy, s3_proxy, s3_server  # noqa: F401


class FlakyStorage(Storage):
    """Local storage that answers StorageUnavailable while ``down`` (what an S3 outage looks like to the log)."""

    down = False

    @classmethod
    def at(cls, path) -> "FlakyStorage":
        base = open_storage(str(path))
        return cls(base._fs, base._root, base._uri_root, base.config)

    def _check(self, op: str) -> None:
        if self.down:
            raise StorageUnavailable(f"storage unavailable during {op}: connection refused (test)")

    def write_bytes(self, key, data):
        self._check("write")
        super().write_bytes(key, data)

    def read_bytes(self, key):
        self._check("read")
        return super().read_bytes(key)

    def list(self, prefix=""):
        self._check("list")
        return super().list(prefix)


def decision(did: str) -> DecisionRecord:
    return DecisionRecord(did, time.time(), [0.5, -0.5, 0.25], 0.2, ["a", "b"], "b", 0.4, 3, encoder_id="enc")


DRAIN_INTERVAL_S = 0.5


def config(tmp_path, **kw) -> FeedbackConfig:
    settings = dict(send_to_learner=False, unknown_grace_s=0.0, spool_dir=str(tmp_path / "spool"),
                    spool_drain_interval_s=DRAIN_INTERVAL_S)
    settings.update(kw)
    return FeedbackConfig(**settings)


def logged_ids(storage) -> list[str]:
    return EventLog(storage).read_events().column("decision_id").to_pylist()


def test_outage_spools_acknowledged_rewards_and_drains_them_once_in_order(tmp_path):
    storage = FlakyStorage.at(tmp_path / "log")

    async def scenario():
        clock = ManualClock(time.time())
        svc = FeedbackService(config(tmp_path), EventLog(storage), clock=clock)
        await svc.record_decisions([decision(f"d{i}") for i in range(6)])
        assert (await svc.submit_reward(RewardRecord("d0", 1.0)))["status"] == "accepted"
        storage.down = True
        await svc.record_decisions([decision("d6")])  # decisions spool too (the replica answers 200)
        acks = [await svc.submit_reward(RewardRecord(f"d{i}", 0.5)) for i in (1, 2, 3, 6)]
        assert [a["status"] for a in acks] == ["accepted"] * 4
        assert (await svc.submit_reward(RewardRecord("d1", 0.0)))["status"] == "duplicate"
        stats = svc.stats()
        assert stats["spool_depth"] == 5 and stats["spooled"] == 5 and stats["drained"] == 0  # 1 decision + 4 events
        assert logged_ids(open_storage(str(tmp_path / "log"))) == ["d0"]
        assert len(list((tmp_path / "spool" / "events").rglob("*.parquet"))) == 4
        errors = svc.stats()["storage_errors"]
        # the drain keeps failing while storage is down; nothing is lost
        await clock.advance_until(lambda: svc.stats()["storage_errors"] >= errors + 2, DRAIN_INTERVAL_S, what="two failed drains")
        assert svc.stats()["spool_depth"] == 5
        storage.down = False
        await clock.advance_until(lambda: svc.stats()["spool_depth"] == 0, DRAIN_INTERVAL_S, what="the drain")
        stats = svc.stats()
        assert stats["spool_depth"] == 0 and stats["drained"] == 5 and stats["storage_errors"] >= 1
        assert (await svc.submit_reward(RewardRecord("d4", 1.0)))["status"] == "accepted"  # direct again
        await svc.stop()

    asyncio.run(scenario())
    assert logged_ids(storage) == ["d0", "d1", "d2", "d3", "d6", "d4"]  # log order = acknowledgement order
    assert "d6" in EventLog(storage).read_decisions().column("decision_id").to_pylist()
    assert not list((tmp_path / "spool").rglob("*.parquet"))


def test_full_spool_is_back_pressure_with_a_clear_message(tmp_path):
    storage = FlakyStorage.at(tmp_path / "log")

    async def scenario():
        clock = ManualClock(time.time())
        svc = FeedbackService(config(tmp_path, spool_max_events=3), EventLog(storage), clock=clock)
        await svc.record_decisions([decision(f"d{i}") for i in range(5)])
        storage.down = True
        assert [(await svc.submit_reward(RewardRecord(f"d{i}", 1.0)))["status"] for i in range(3)] == ["accepted"] * 3
        full = await svc.submit_reward(RewardRecord("d3", 1.0))
        assert full["status"] == "unavailable" and "event buffer full (3 events waiting for storage" in full["error"]
        status, body, headers = ack_to_http(full)
        assert status == 503 and "event buffer full" in body["error"]["message"] and "Retry-After" in headers
        with pytest.raises(SpoolFull, match="event buffer full"):
            await svc.record_decisions([decision("d9")])  # the replica answers 503
        assert svc.stats()["spool_full_rejections"] == 2
        storage.down = False
        await clock.advance_until(lambda: svc.stats()["spool_depth"] == 0, DRAIN_INTERVAL_S, what="the drain")
        assert (await svc.submit_reward(RewardRecord("d3", 1.0)))["status"] == "accepted"  # the retry succeeds
        await svc.stop()

    asyncio.run(scenario())
    assert sorted(logged_ids(storage)) == ["d0", "d1", "d2", "d3"]


def test_restart_during_an_outage_finds_its_spool_and_never_accepts_twice(tmp_path):
    storage = FlakyStorage.at(tmp_path / "log")

    async def scenario():
        clock = ManualClock(time.time())
        svc = FeedbackService(config(tmp_path), EventLog(storage), clock=clock)
        await svc.record_decisions([decision(f"d{i}") for i in range(4)])
        assert (await svc.submit_reward(RewardRecord("d0", 1.0)))["status"] == "accepted"  # in the log
        storage.down = True
        assert (await svc.submit_reward(RewardRecord("d1", 1.0)))["status"] == "accepted"  # in the spool
        await svc.stop()  # the process dies; storage is still down when it comes back

        again = FeedbackService(config(tmp_path), EventLog(storage), clock=clock)
        recovered = again.recover()  # must not raise (no crash loop)
        assert recovered["storage_unavailable"] == 1 and recovered["finished"] == 1 and again.recovery.pending
        assert (await again.submit_reward(RewardRecord("d1", 0.0)))["status"] == "duplicate"  # from the spool
        waiting = await again.submit_reward(RewardRecord("d0", 0.0))  # only the log knows d0: wait, do not guess
        assert waiting["status"] == "unavailable" and "recovering" in waiting["error"]
        storage.down = False
        await clock.advance_until(lambda: not again.recovery.pending and again.stats()["spool_depth"] == 0, DRAIN_INTERVAL_S,
                                  what="the late recovery and the drain")
        assert not again.recovery.pending and again.stats()["spool_depth"] == 0
        assert (await again.submit_reward(RewardRecord("d0", 0.0)))["status"] == "duplicate"
        assert (await again.submit_reward(RewardRecord("d2", 0.0)))["status"] == "accepted"  # pending from the log
        await again.stop()

    asyncio.run(scenario())
    assert sorted(logged_ids(storage)) == ["d0", "d1", "d2"]


def test_a_drain_repeated_after_a_crash_leaves_no_duplicate(tmp_path):
    storage = FlakyStorage.at(tmp_path / "log")
    log = EventLog(storage)
    spool = LocalSpool(tmp_path / "spool", 100)
    svc = FeedbackService(config(tmp_path), log)
    svc.joiner.add_decision(decision("d0"))
    storage.down = True

    async def accept():
        ack = await svc.submit_reward(RewardRecord("d0", 1.0))
        await svc.stop()
        return ack

    assert asyncio.run(accept())["status"] == "accepted"
    (key,) = svc.spool.keys()
    storage.down = False
    log.write_part(key, svc.spool.read_bytes(key))  # the drain wrote the part, then the process died
    spool = LocalSpool(tmp_path / "spool", 100)  # restart: the part is still there
    assert spool.keys() == [key] and spool.depth == 1
    restarted = FeedbackService(config(tmp_path), EventLog(storage))
    assert restarted.drain_spool() == 1
    assert logged_ids(storage) == ["d0"]


def test_spool_config_is_validated():
    with pytest.raises(ValueError, match="feedback.spool_max_events"):
        FeedbackConfig(spool_max_events=-1).validate()
    with pytest.raises(ValueError, match="feedback.spool_drain_interval_s"):
        FeedbackConfig(spool_drain_interval_s=0).validate()


def test_s3_outage_behind_a_proxy_loses_no_acknowledged_reward(s3_proxy):  # noqa: F811
    storage_config = s3_proxy.storage_config()

    async def scenario():
        clock = ManualClock(time.time())
        svc = FeedbackService(config_for_s3(storage_config), EventLog(open_storage(storage_config)), clock=clock)
        await svc.record_decisions([decision(f"d{i}") for i in range(30)])
        acked = []
        for i in range(30):
            if i == 10:
                s3_proxy.down()  # moto keeps its objects; connections are refused
            if i == 20:
                s3_proxy.up()
            ack = await svc.submit_reward(RewardRecord(f"d{i}", 1.0))
            assert ack["status"] == "accepted", ack
            acked.append(f"d{i}")
        await clock.advance_until(lambda: svc.stats()["spool_depth"] == 0, DRAIN_INTERVAL_S, timeout_s=20, what="the drain")
        stats = svc.stats()
        assert stats["spool_depth"] == 0 and stats["spooled"] >= 10 and stats["storage_errors"] >= 1
        await svc.stop()
        return acked

    acked = asyncio.run(scenario())
    assert sorted(logged_ids(open_storage(storage_config))) == sorted(acked)


def config_for_s3(storage_config) -> FeedbackConfig:
    import tempfile

    return FeedbackConfig(send_to_learner=False, unknown_grace_s=0.0, spool_dir=tempfile.mkdtemp(prefix="spool-"),
                          spool_drain_interval_s=DRAIN_INTERVAL_S)


def test_a_write_that_failed_but_landed_is_not_duplicated_by_the_drain(tmp_path):
    """The connection broke AFTER storage kept the part: the spooled copy has the same key and replaces it."""

    class LandsThenFails(EventLog):
        fail_next = True

        def write_table(self, key, table):
            super().write_table(key, table)  # the object is stored ...
            if key.startswith("events/") and self.fail_next:
                self.fail_next = False
                raise StorageUnavailable("connection reset after the upload")  # ... but the client saw an error

    async def scenario():
        log = LandsThenFails(open_storage(str(tmp_path / "log")))
        svc = FeedbackService(FeedbackConfig(send_to_learner=False, spool_dir=str(tmp_path / "spool")), log)
        await svc.record_decisions([decision("d1")])
        ack = await svc.submit_reward(RewardRecord("d1", 1.0, 0.001))
        assert ack["status"] == "accepted" and svc.spool.depth == 1
        assert svc.drain_spool() == 1
        await svc.stop()
        return log.read_events(columns=["decision_id"]).column("decision_id").to_pylist()

    assert asyncio.run(scenario()) == ["d1"]


def test_readers_keep_the_first_row_per_decision(tmp_path):
    """Storage writes are at-least-once; readers see each decision once (the first reward, as the join decided)."""
    from banditroute.core.records import JoinedEvent

    log = EventLog(open_storage(str(tmp_path)))
    first, again = JoinedEvent(decision("d1"), 1.0, 0.001, 1.0), JoinedEvent(decision("d1"), 0.0, 0.002, 2.0)
    log.append_events([first, JoinedEvent(decision("d2"), 0.5, 0.001, 1.5)])
    log.append_events([again])
    assert log.read_events(dedupe=False).column("decision_id").to_pylist() == ["d1", "d2", "d1"]
    table = log.read_events()
    assert table.column("decision_id").to_pylist() == ["d1", "d2"] and table.column("score").to_pylist() == [1.0, 0.5]
