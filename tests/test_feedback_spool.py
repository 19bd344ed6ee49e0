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
from banditroute.feedback.spool import Spool, SpoolFull
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

    parent: "FlakyStorage | None" = None

    def child(self, prefix: str) -> "FlakyStorage":
        """A sub-root that is down whenever this storage is (the default spool lives in the log's storage)."""
        sub = FlakyStorage(self._fs, self.path_for(prefix), self.uri_for(prefix), self.config)
        sub.parent = self
        return sub

    def _check(self, op: str) -> None:
        if self.down or (self.parent is not None and self.parent.down):
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
    spool = Spool.at(tmp_path / "spool", 100)  # restart: the part is still there
    spool.load()
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


# --- the spool survives losing a node (issue 14, item 4) --------------------------------------------


def _node(monkeypatch, tmp_path, name: str):
    """'Run on node ``name``': its own temp dir (a node-local disk), which is gone when the node is lost."""
    import tempfile

    local = tmp_path / "nodes" / name / "tmp"
    local.mkdir(parents=True, exist_ok=True)
    monkeypatch.setattr(tempfile, "tempdir", str(local))
    return local


def test_default_spool_is_never_node_local_so_a_move_neither_loses_nor_doubles(tmp_path, monkeypatch):
    """Reproduces the issue: ack from node A's spool, A is lost, the actor restarts on B, the token is replayed."""
    import shutil

    storage = FlakyStorage.at(tmp_path / "log")
    # The default spool lives in the log's storage (FlakyStorage.child): as down as the log, never on a node's disk.
    settings = dict(send_to_learner=False, unknown_grace_s=0.0, spool_drain_interval_s=DRAIN_INTERVAL_S)

    async def scenario():
        clock = ManualClock(time.time())
        node_a = _node(monkeypatch, tmp_path, "a")
        on_a = FeedbackService(FeedbackConfig(**settings), EventLog(storage), clock=clock)
        await on_a.record_decisions([decision("d1"), decision("d2")])
        storage.down = True
        first = await on_a.submit_reward(RewardRecord("d1", 1.0))
        await on_a.stop()
        shutil.rmtree(node_a)  # node A is lost, with its disk
        storage.down = False
        _node(monkeypatch, tmp_path, "b")
        on_b = FeedbackService(FeedbackConfig(**settings), EventLog(storage), clock=clock)
        on_b.recover()
        replay = await on_b.submit_reward(RewardRecord("d1", 0.0))
        await clock.advance_until(lambda: on_b.stats()["spool_depth"] == 0, DRAIN_INTERVAL_S, what="the drain")
        await on_b.stop()
        return first, replay

    first, replay = asyncio.run(scenario())
    ids = EventLog(storage).read_events(dedupe=False).column("decision_id").to_pylist()
    assert ids.count("d1") == 1, ids  # never lost, never twice
    assert (first["status"], replay["status"]) in {("accepted", "duplicate"), ("unavailable", "accepted")}
    assert first["status"] == "unavailable"  # with the log's own storage down, the default spool is down too


def test_shared_spool_ack_survives_an_actor_move_and_a_replay_is_409(tmp_path, monkeypatch):
    """spool_uri on shared storage: acknowledged from the spool on node A; B sees it, answers 409, drains it once."""
    import shutil

    storage = FlakyStorage.at(tmp_path / "log")
    shared = tmp_path / "shared-spool"  # a second bucket / an RWX mount every node reaches
    settings = dict(send_to_learner=False, unknown_grace_s=0.0, spool_uri=str(shared), spool_drain_interval_s=DRAIN_INTERVAL_S)

    async def scenario():
        clock = ManualClock(time.time())
        node_a = _node(monkeypatch, tmp_path, "a")
        on_a = FeedbackService(FeedbackConfig(**settings), EventLog(storage), clock=clock)
        await on_a.record_decisions([decision("d1")])
        storage.down = True
        await on_a.record_decisions([decision("d2"), decision("d3")])  # decisions spooled while the log is down
        acked = await on_a.submit_reward(RewardRecord("d1", 1.0))
        acked2 = await on_a.submit_reward(RewardRecord("d2", 0.5))
        await on_a.stop()
        shutil.rmtree(node_a)
        _node(monkeypatch, tmp_path, "b")
        on_b = FeedbackService(FeedbackConfig(**settings), EventLog(storage), clock=clock)
        recovered = on_b.recover()  # the log is still down: the shared spool alone
        during = [await on_b.submit_reward(RewardRecord(d, 0.0)) for d in ("d1", "d2", "d3")]
        storage.down = False
        await clock.advance_until(lambda: not on_b.recovery.pending and on_b.stats()["spool_depth"] == 0,
                                  DRAIN_INTERVAL_S, what="the late recovery and the drain")
        after = await on_b.submit_reward(RewardRecord("d1", 0.0))
        await on_b.stop()
        return acked, acked2, recovered, during, after

    acked, acked2, recovered, during, after = asyncio.run(scenario())
    assert acked["status"] == acked2["status"] == "accepted"
    assert recovered["finished"] == 2 and recovered["storage_unavailable"] == 1
    assert [a["status"] for a in during] == ["duplicate", "duplicate", "accepted"]  # d3 was pending in the spool
    assert after["status"] == "duplicate" and ack_to_http(after)[0] == 409
    ids = EventLog(storage).read_events(dedupe=False).column("decision_id").to_pylist()
    assert sorted(ids) == ["d1", "d2", "d3"]
    assert "d3" in EventLog(storage).read_decisions().column("decision_id").to_pylist()
    assert not list(shared.rglob("*.parquet"))  # drained


def test_an_unreadable_spool_at_recovery_holds_every_reward_until_it_can_be_read(tmp_path):
    storage = FlakyStorage.at(tmp_path / "log")
    spool_storage = FlakyStorage.at(tmp_path / "spool")

    async def scenario():
        clock = ManualClock(time.time())
        svc = FeedbackService(config(tmp_path), EventLog(storage), clock=clock)
        svc.writer.spool = Spool(spool_storage, 100)
        await svc.record_decisions([decision("d1"), decision("d2")])
        storage.down = True
        assert (await svc.submit_reward(RewardRecord("d1", 1.0)))["status"] == "accepted"  # in the spool
        storage.down = False
        await svc.stop()

        again = FeedbackService(config(tmp_path), EventLog(storage), clock=clock)
        again.writer.spool = Spool(spool_storage, 100)
        spool_storage.down = True
        assert again.recover()["spool_unavailable"] == 1 and again.recovery.blocks_all
        # d1 is pending in the decision log, but its acknowledged reward is in the spool nobody can read
        held = [await again.submit_reward(RewardRecord(d, 0.0)) for d in ("d1", "d2")]
        spool_storage.down = False
        await clock.advance_until(lambda: not again.recovery.pending and again.stats()["spool_depth"] == 0,
                                  DRAIN_INTERVAL_S, what="recovery and the drain")
        after = [await again.submit_reward(RewardRecord(d, 0.0)) for d in ("d1", "d2")]
        await again.stop()
        return held, after

    held, after = asyncio.run(scenario())
    assert [h["status"] for h in held] == ["unavailable", "unavailable"] and "spool" in held[0]["error"]
    assert [a["status"] for a in after] == ["duplicate", "accepted"]
    assert sorted(logged_ids(storage)) == ["d1", "d2"]


def test_spool_config_names_its_fields_and_never_defaults_to_a_node_local_folder(tmp_path):
    from banditroute.core.storage import StorageConfig

    log = StorageConfig(uri="s3://bucket/prefix", endpoint_url="http://127.0.0.1:9000")
    assert FeedbackConfig().spool_storage_for(log).uri == "s3://bucket/prefix/spool"
    other = FeedbackConfig(spool_uri="s3://spool-bucket/x").spool_storage_for(log)
    assert other.uri == "s3://spool-bucket/x" and other.endpoint_url == "http://127.0.0.1:9000"
    with pytest.raises(ValueError, match="feedback.spool_dir is the deprecated name of feedback.spool_uri"):
        FeedbackConfig(spool_uri="/a", spool_dir="/b").validate()
    with pytest.raises(ValueError, match="feedback.spool_uri"):
        FeedbackConfig(spool_uri=" ").validate()
    svc = FeedbackService(FeedbackConfig(send_to_learner=False), EventLog(open_storage(str(tmp_path / "log"))))
    assert svc.spool.location == (tmp_path / "log" / "spool").resolve().as_uri()


# --- one late row per decision --------------------------------------------------------------


def test_replayed_late_rewards_write_one_late_row_even_across_a_restart(tmp_path):
    from banditroute.feedback.join import JoinConfig

    storage = open_storage(str(tmp_path / "log"))
    settings = dict(send_to_learner=False, unknown_grace_s=0.0, join=JoinConfig(window_s=1.0))

    async def scenario():
        clock = ManualClock(time.time())
        svc = FeedbackService(FeedbackConfig(**settings), EventLog(storage), clock=clock)
        await svc.record_decisions([decision("d1")])
        await clock.advance(2.0)
        await svc.sweep()  # the window closes (dropped)
        answers = [await svc.submit_reward(RewardRecord("d1", 1.0)) for _ in range(50)]
        await svc.stop()
        again = FeedbackService(FeedbackConfig(**settings), EventLog(storage), clock=clock)
        again.recover()
        more = [await again.submit_reward(RewardRecord("d1", 1.0)) for _ in range(5)]
        stats = again.stats()
        await again.stop()
        return answers + more, stats

    answers, stats = asyncio.run(scenario())
    assert {a["status"] for a in answers} == {"late"} and sum(not a.get("already_logged") for a in answers) == 1
    assert ack_to_http(answers[-1])[0] == ack_to_http(answers[0])[0]  # a replay is answered like the first
    late = EventLog(storage).read_late()
    assert late.column("decision_id").to_pylist() == ["d1"]
    assert len(storage.list("late_rewards")) == 1 and stats["late_repeats_not_logged"] == 5
