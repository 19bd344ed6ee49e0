"""The durable event log and checkpoints on a real S3 API (moto_server on loopback), outages included."""

from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest

from banditroute.feedback.log import EventLog, read_event_log
from banditroute.feedback.config import FeedbackConfig
from banditroute.feedback.service import FeedbackService
from banditroute.learner.learner import OnlineLearner
from banditroute.core.records import DecisionRecord, JoinedEvent, RewardRecord, events_to_table
from banditroute.serve.testing import hashing_policy
from banditroute.core.storage import open_storage
from banditroute.testkit.s3server import s3_server, s3_storage_config  # noqa: F401


def decision(did: str) -> DecisionRecord:
    return DecisionRecord(did, time.time(), [0.1] * 64, 0.4, ["big-model", "small-model"], "small-model", 0.7, 0, encoder_id="")


def test_event_log_on_s3_acks_only_durable_events_and_survives_an_outage(s3_server, s3_storage_config):  # noqa: F811
    async def scenario():
        log = EventLog(open_storage(s3_storage_config))
        # No spool here: this checks that a write storage refuses is never acknowledged
        # (the spooled path is tested in test_faults.py / test_feedback_spool.py).
        svc = FeedbackService(FeedbackConfig(send_to_learner=False, unknown_grace_s=0.0, spool_max_events=0), log)
        await svc.record_decisions([decision(f"d{i}") for i in range(5)])
        acks = await svc.submit_rewards([RewardRecord(f"d{i}", 1.0, 0.001) for i in range(3)])
        assert [a["status"] for a in acks] == ["accepted"] * 3
        with s3_server.unavailable("paused"):  # S3 hangs: the write times out, nothing is acknowledged
            start = time.monotonic()
            down = await svc.submit_reward(RewardRecord("d3", 0.5))
            assert down["status"] == "unavailable" and time.monotonic() - start < 15
        assert (await svc.submit_reward(RewardRecord("d3", 0.5)))["status"] == "accepted"
        assert svc.stats()["commit_failures"] == 1
        await svc.stop()
        # A new incarnation on the same bucket recovers: d0..d3 finished, d4 still pending.
        again = FeedbackService(FeedbackConfig(send_to_learner=False, unknown_grace_s=0.0), EventLog(open_storage(s3_storage_config)))
        assert again.recover() == {"finished": 4, "decisions_read": 5, "pending": 1}
        assert (await again.submit_reward(RewardRecord("d0", 0.0)))["status"] == "duplicate"
        assert (await again.submit_reward(RewardRecord("d4", 0.0)))["status"] == "accepted"
        await again.stop()

    asyncio.run(scenario())
    table = read_event_log(s3_storage_config.uri, endpoint_url=s3_server.endpoint_url)
    assert sorted(table.column("decision_id").to_pylist()) == ["d0", "d1", "d2", "d3", "d4"]
    keys = open_storage(s3_storage_config).list("events")
    assert keys and all(k.startswith("events/dt=") and "/hr=" in k and k.endswith(".parquet") for k in keys)


def test_learner_checkpoints_on_s3_and_resumes(s3_storage_config):  # noqa: F811
    storage = open_storage(s3_storage_config).child("checkpoints")
    policy = hashing_policy(models=("big-model", "small-model"), dim=64)
    learner = OnlineLearner(policy)
    rng = np.random.default_rng(0)
    events = [
        JoinedEvent(DecisionRecord(f"e{i}", 0.0, rng.normal(size=64).tolist(), 0.3, ["big-model", "small-model"],
                                   "big-model" if i % 2 else "small-model", 0.5, 0), float(i % 2), 0.001, 0.0)
        for i in range(16)
    ]
    for _ in range(3):
        learner.update(events_to_table(events))
    uri = learner.save_checkpoint(storage)
    assert uri.startswith("s3://") and uri.endswith("v000000000003")
    resumed = OnlineLearner.resume_or_start(storage, None)
    assert resumed.policy_version == 3
    x = np.asarray(events[0].decision.embedding, np.float32)[None]
    assert np.allclose(resumed.policy.logits(x, 0.3).numpy(), policy.logits(x, 0.3).numpy(), atol=1e-6)


@pytest.mark.parametrize("mode", ["stopped"])
def test_checkpoint_write_fails_fast_when_s3_is_down(s3_server, s3_storage_config, mode):  # noqa: F811
    from banditroute.core.storage import StorageUnavailable

    storage = open_storage(s3_storage_config).child("checkpoints")
    learner = OnlineLearner(hashing_policy(models=("big-model", "small-model"), dim=64))
    with s3_server.unavailable(mode):
        start = time.monotonic()
        with pytest.raises(StorageUnavailable):
            learner.save_checkpoint(storage)
        assert time.monotonic() - start < 15
