"""The learner's cursor over the committed event log, without Ray: the pure state machine, one catch-up
pass over a local log, and a learner actor (in process) that resumes its cursor from a checkpoint."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from banditroute.core.config import ConfigError, from_dict
from banditroute.core.event_log import EVENTS_PREFIX, list_parts, part_key, part_time, read_part
from banditroute.core.records import DecisionRecord, JoinedEvent, events_to_table
from banditroute.core.storage import StorageConfig, open_storage
from banditroute.feedback.log import EventLog
from banditroute.learner.actor import LearnerActor
from banditroute.learner.checkpoint import list_checkpoints, read_manifest
from banditroute.learner.config import LearnerConfig
from banditroute.learner.log_cursor import LogCursor, LogCursorConfig
from banditroute.learner.log_follower import CURSOR_FILE, LogFollower, catch_up
from banditroute.policy.barp import BarpPolicy, NetworkConfig, PolicyMeta
from banditroute.policy.encoders import EncoderConfig
from banditroute.policy.reward import fit_tau
from banditroute.testkit.synthetic import make_routing_data

T0 = 1_764_166_800.0  # 2025-11-26 14:20 UTC
CFG = LogCursorConfig(interval_s=1.0, min_age_s=2.0, settle_s=60.0, max_rows_per_update=4)


def key(t: float, seq: int = 1, writer: str = "w") -> str:
    return part_key(EVENTS_PREFIX, t, writer, seq)


# --- the pure state machine -----------------------------------------------------------------


def test_due_parts_skip_consumed_too_young_and_below_the_watermark():
    cursor = LogCursor(CFG, watermark=T0)
    old, a, b, young = key(T0 - 1), key(T0 + 1, 2), key(T0 + 5, 3), key(T0 + 9, 4)
    cursor.consume(a, [], now=T0 + 10)
    # Due in write order (not listing order); `young` is under min_age_s at T0 + 10.
    assert cursor.due([young, b, old, a, "events/x.parquet"], now=T0 + 10) == [b]
    assert cursor.due([young, b], now=T0 + 11) == [b, young]


def test_ids_are_taken_once_and_pending_until_their_part_is_read():
    cursor = LogCursor(CFG, watermark=T0)
    assert cursor.unseen(["a", "b", "a"]).tolist() == [True, True, False]  # repeats inside one batch too
    cursor.pushed(["a"], now=T0)
    assert cursor.unseen(["a", "b"]).tolist() == [False, True]
    assert set(cursor.pending) == {"a"}
    cursor.consume(key(T0), ["a", "b"], now=T0 + 3, events_trained=1)
    assert cursor.pending == {} and cursor.unseen(["a", "b", "c"]).tolist() == [False, False, True]
    assert cursor.counters["parts_read"] == 1 and cursor.counters["events_from_log"] == 1


def test_watermark_trails_the_clock_forgets_behind_it_and_stops_at_a_blocked_part():
    cursor = LogCursor(CFG, watermark=0.0)
    k1, k2 = key(T0, 1), key(T0 + 30, 2)
    cursor.consume(k1, ["x"], now=T0 + 5)
    cursor.consume(k2, ["y"], now=T0 + 35)
    assert cursor.advance(T0 + 70) == T0 + 10  # settle_s behind the clock
    assert set(cursor.consumed) == {k2}  # k1 is below it: nothing at its time is read again
    # Ids are kept another settle_s (a late push of one is still dropped) ...
    assert cursor.unseen(["x"]).tolist() == [False]
    cursor.advance(T0 + 5 + 2 * 60 + 1)
    assert cursor.unseen(["x", "y"]).tolist() == [True, False]  # ... then forgotten
    blocked = key(T0 + 100, 3)
    assert cursor.advance(T0 + 500, blocked=[blocked]) == T0 + 100  # an unreadable part holds it
    assert cursor.advance(T0 + 130) == T0 + 100  # never backwards


def test_state_round_trip_keeps_consumed_parts_and_pending_ids():
    cursor = LogCursor(CFG, watermark=T0)
    cursor.consume(key(T0 + 1), ["a"], now=T0 + 4)
    cursor.pushed(["p"], now=T0 + 5)
    back = LogCursor.from_state(CFG, cursor.state())
    assert back.watermark == T0 and set(back.consumed) == set(cursor.consumed)
    assert back.pending == {"p": T0 + 5} and back.unseen(["p", "a"]).tolist() == [False, True]


def test_config_is_validated_with_the_field_name():
    with pytest.raises(ValueError, match="settle_s"):
        from_dict(LearnerConfig, {"log_cursor": {"settle_s": 1.0, "min_age_s": 2.0}}, prefix="learner").validate()
    with pytest.raises(ConfigError):
        from_dict(LearnerConfig, {"log_cursor": {"intervl_s": 1.0}}, prefix="learner")
    assert from_dict(LearnerConfig, {"log_cursor": {"interval_s": 0.5}}).log_cursor.interval_s == 0.5


# --- a catch-up pass over a local log --------------------------------------------------------

ENC = EncoderConfig(name="hashing", dim=16)


def events(ids, models=("a", "b", "c"), seed=0):
    rng = np.random.default_rng(seed)
    out = []
    for did in ids:
        k = int(rng.integers(0, len(models)))
        out.append(JoinedEvent(DecisionRecord(did, T0, rng.normal(size=16).astype(np.float32).tolist(), float(rng.uniform()),
                                              list(models), models[k], 1 / 3, 0, encoder_id=""),
                               float(rng.uniform()), 0.001, T0))
    return events_to_table(out)


def test_catch_up_trains_what_pushes_missed_including_parts_that_appear_out_of_order(tmp_path):
    log = EventLog(open_storage(str(tmp_path)), writer_id="w")
    cursor = LogCursor(CFG)
    trained: list[str] = []

    def train(table):
        mask = cursor.unseen(table.column("decision_id").to_pylist())  # the learner's intake filters again
        ids = [d for d, m in zip(table.column("decision_id").to_pylist(), mask) if m]
        cursor.pushed(ids, T0)
        trained.extend(ids)

    train(events(["d0", "d1"]))  # pushed
    log.write_table(key(T0, 1), events(["d0", "d1", "d2"]))  # d2's push was lost
    log.write_table(key(T0 + 1, 3), events([f"e{i}" for i in range(9)]))  # never pushed: 3 updates of <= 4 rows
    out = catch_up(cursor, log.storage, T0 + 10, train)
    assert out == {"parts": 2, "events": 10, "blocked": 0}
    assert trained == ["d0", "d1", "d2"] + [f"e{i}" for i in range(9)] and cursor.pending == {}
    # A part with an older name becomes visible late (a write that was in flight, a spool drain): still read.
    log.write_table(key(T0 + 0.5, 2), events(["d1", "late"]))
    assert catch_up(cursor, log.storage, T0 + 20, train)["events"] == 1 and trained[-1] == "late"
    assert catch_up(cursor, log.storage, T0 + 30, train) == {"parts": 0, "events": 0, "blocked": 0}
    assert len(trained) == len(set(trained)) == 13


def test_an_unreadable_part_is_retried_and_holds_the_watermark(tmp_path):
    storage = open_storage(str(tmp_path))
    log = EventLog(storage, writer_id="w")
    bad = key(T0 + 1, 1)
    storage.write_bytes(bad, b"not parquet")
    log.write_table(key(T0 + 2, 2), events(["z"]))
    cursor = LogCursor(CFG)
    seen: list[str] = []
    out = catch_up(cursor, storage, T0 + 500, lambda t: seen.extend(t.column("decision_id").to_pylist()))
    assert out["blocked"] == 2 and seen == [] and cursor.watermark <= T0 + 1 and cursor.counters["read_errors"] == 1
    log.write_table(bad, events(["y"]))  # repaired (e.g. storage is back)
    catch_up(cursor, storage, T0 + 501, lambda t: seen.extend(t.column("decision_id").to_pylist()))
    assert seen == ["y", "z"] and cursor.watermark == T0 + 501 - CFG.settle_s
    assert list_parts(storage, EVENTS_PREFIX) == [bad, key(T0 + 2, 2)] and part_time(bad) == T0 + 1
    assert read_part(storage, bad).column("decision_id").to_pylist() == ["y"]


# --- the learner actor resumes its cursor from a checkpoint (in process, no Ray) ------------------


def test_a_restarted_learner_trains_exactly_what_its_checkpoint_lacks(tmp_path, monkeypatch):
    monkeypatch.setattr(LogFollower, "start", lambda self, train: None)  # passes run when the test says
    data = make_routing_data(60, seed=0)
    torch.manual_seed(0)
    meta = PolicyMeta(models=list(data.models), tau=fit_tau(data.costs), embed_dim=16, encoder=ENC, encoder_id="",
                      network=NetworkConfig(hidden_dim=16, preference_dim=4))
    state = BarpPolicy(meta).state()
    storage = StorageConfig(uri=str(tmp_path / "s"))
    cfg = {"checkpoint_every": 0, "replay_sample": 0, "promotion": {"enabled": False},
           "log_cursor": {"min_age_s": 0.0, "settle_s": 3600.0}}
    log = EventLog(open_storage(storage), writer_id="w")
    models = tuple(data.models)
    first = LearnerActor(cfg, storage, state, parameter_server_name=None)
    audit: list[list[str]] = []

    def audited(actor):
        inner = actor.learner.update
        trained: list[str] = []
        audit.append(trained)
        actor.learner.update = lambda ev, **kw: (trained.extend(ev.column("decision_id").to_pylist()), inner(ev, **kw))[1]
        return actor

    audited(first)
    batch1 = events([f"a{i}" for i in range(10)], models)
    first.update(batch1.slice(0, 6))  # pushed; a6..a9's push is lost
    log.write_table(log.part_key(EVENTS_PREFIX), batch1)
    assert first.update(batch1.slice(0, 2))["duplicates_dropped"] == 2  # a repeated push is not trained again
    first.follower.catch_up(first.update)
    assert sorted(audit[0]) == sorted(f"a{i}" for i in range(10))
    first.follower.catch_up(first.update)  # nothing new
    ckpt_version = first.learner.policy_version
    first.checkpoint()
    manifest = read_manifest(open_storage(storage).child("checkpoints"), ckpt_version)
    assert manifest["log_cursor"] == CURSOR_FILE
    batch2 = events([f"b{i}" for i in range(8)], models, seed=1)
    first.update(batch2.slice(0, 3))  # pushed after the checkpoint, then the process dies
    log.write_table(log.part_key(EVENTS_PREFIX), batch2)
    log.write_table(log.part_key(EVENTS_PREFIX), events(["c0", "c1"], models, seed=2))  # acked, push lost

    second = audited(LearnerActor(cfg, storage, state, parameter_server_name=None))
    assert second.learner.policy_version == ckpt_version and list_checkpoints(open_storage(storage).child("checkpoints"))
    second.follower.catch_up(second.update)
    # Everything after the checkpoint once (its training died with the process), nothing before it.
    assert sorted(audit[1]) == sorted([f"b{i}" for i in range(8)] + ["c0", "c1"])
    assert second.status()["log_cursor"]["events_from_log"] == 10
