"""The durable log is what the learner trusts (issue 13 item 2), on the session's local Ray.

Kill the learner actor and the feedback actor mid-run: every acknowledged
reward is in the event log once, and every logged event is trained on once
per learner lifetime: the restarted learner trains exactly what the
checkpoint it resumed from lacks, including events whose push died with an
actor. The learner is :class:`~banditroute.testkit.audited_learner.AuditedLearnerActor`,
which writes each update's decision ids to a file per lifetime.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from banditroute.core.actors import get_or_create_detached_actor
from banditroute.core.records import DecisionRecord, RewardRecord
from banditroute.core.storage import StorageConfig
from banditroute.feedback.actor import get_or_create_feedback_actor
from banditroute.feedback.log import EventLog
from banditroute.learner.actor_handles import seed_checkpoint
from banditroute.policy.barp import BarpPolicy, NetworkConfig, PolicyMeta
from banditroute.policy.encoders import EncoderConfig
from banditroute.testkit.audited_learner import AuditedLearnerActor
from banditroute.testkit.fault_scenarios import wait_for, wait_restarted

MODELS = ["a", "b", "c"]
NS = "banditroute-durability-test"


def decisions(ids, seed):
    rng = np.random.default_rng(seed)
    return [DecisionRecord(did, time.time(), rng.normal(size=16).astype(np.float32), float(rng.uniform()), MODELS,
                           MODELS[int(rng.integers(0, 3))], 1 / 3, 0) for did in ids]


def lifetimes(audit_dir: Path) -> list[list[dict]]:
    """Each lifetime's audit records, in start order."""
    files = [[json.loads(line) for line in p.read_text().splitlines() if line] for p in audit_dir.glob("lifetime-*.jsonl")]
    return sorted((f for f in files if f), key=lambda recs: recs[0]["started"])


def trained(records: list[dict]) -> list[str]:
    return [d for r in records for d in r.get("trained", [])]


@pytest.mark.timeout(240)
def test_killed_learner_and_feedback_actor_lose_no_training_and_train_nothing_twice(ray_cluster, tmp_path):
    ray = ray_cluster
    storage = StorageConfig(uri=str(tmp_path / "storage"))
    audit = tmp_path / "audit"
    audit.mkdir()
    torch.manual_seed(0)
    meta = PolicyMeta(models=MODELS, tau=0.01, embed_dim=16, encoder=EncoderConfig(name="hashing", dim=16), encoder_id="",
                      network=NetworkConfig(hidden_dim=16, preference_dim=4))
    seed_checkpoint(BarpPolicy(meta).state(), storage, "checkpoints")
    cfg = {"checkpoint_every": 0, "replay_sample": 0, "torch_threads": 1, "promotion": {"enabled": False},
           "log_cursor": {"interval_s": 0.3, "min_age_s": 0.5, "settle_s": 60.0}}
    names = {"learner": f"dur-learner-{tmp_path.name}", "feedback": f"dur-feedback-{tmp_path.name}"}
    learner = get_or_create_detached_actor(AuditedLearnerActor, names["learner"], NS, cfg, storage, None, None, NS, str(audit),
                                           max_concurrency=4, num_cpus=0)
    feedback = get_or_create_feedback_actor({"learner_max_delay_s": 0.05, "unknown_grace_s": 0.0}, storage,
                                            names["feedback"], NS, learner_name=names["learner"])
    acked: list[str] = []

    def send(prefix: str, n: int, seed: int) -> None:
        ids = [f"{prefix}{i}" for i in range(n)]
        ray.get(feedback.record_decisions.remote(decisions(ids, seed)))
        out = ray.get(feedback.submit_rewards.remote([RewardRecord(d, 0.5 + 0.01 * (i % 40), 0.001) for i, d in enumerate(ids)]))
        assert [o["status"] for o in out] == ["accepted"] * n, out[:3]
        acked.extend(ids)

    try:
        send("a", 60, 1)
        wait_for(lambda: ray.get(learner.status.remote())["events_trained"] >= 60, 60, what="first pushes trained")
        ray.get(learner.checkpoint.remote())  # what the restarted learner resumes from
        send("b", 60, 2)
        ray.kill(learner, no_restart=False)  # pushes of b* in flight die with it (or are retried to the next lifetime)
        wait_restarted(lambda: ray.get(learner.status.remote(), timeout=10))
        send("c", 60, 3)
        ray.kill(feedback, no_restart=False)  # acked c* not yet delivered are never re-sent by the feedback actor
        wait_restarted(lambda: ray.get(feedback.ping.remote(), timeout=10))
        send("d", 30, 4)
        ray.get(feedback.flush.remote(30.0))

        runs = lifetimes(audit)
        wait_for(lambda: len(set(trained(lifetimes(audit)[-1]))) >= len(acked) - 60, 90, interval_s=0.5,
                 what="the restarted learner trained everything after its checkpoint")
        time.sleep(1.5)  # a few more catch-up passes: nothing may be trained twice
        runs = lifetimes(audit)
        status = ray.get(learner.status.remote())
    finally:
        for handle in (feedback, learner):
            ray.kill(handle, no_restart=True)

    # Every acknowledged reward is in the log exactly once.
    logged = Counter(EventLog.open(storage).read_events(dedupe=False).column("decision_id").to_pylist())
    assert set(logged) == set(acked) and max(logged.values()) == 1

    assert len(runs) == 2, [len(r) for r in runs]
    first, second = runs
    marks = [i for i, r in enumerate(first) if "checkpoint" in r]
    assert marks, "the first lifetime wrote its checkpoint"
    in_checkpoint = trained(first[: marks[-1]])
    assert sorted(in_checkpoint) == sorted(f"a{i}" for i in range(60))
    for run in runs:  # once per lifetime
        ids = trained(run)
        assert len(ids) == len(set(ids)), Counter(ids).most_common(3)
    # The second lifetime trained exactly what the checkpoint lacked: b*, c* (whose pushes were lost or
    # retried) and d*; nothing from before the checkpoint.
    assert set(trained(second)) == set(acked) - set(in_checkpoint)
    assert status["log_cursor"]["events_from_log"] > 0 and status["log_cursor"]["read_errors"] == 0
