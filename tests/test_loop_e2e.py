"""The whole loop on the session's Ray: route over HTTP, post rewards, new weights reach EVERY replica.

Also: the durable log holds every acknowledged event, bad feedback gets a
4xx naming the field, restarted feedback/learner actors recover (no lost
acknowledgements, versions never go backwards), and `banditroute up` runs
end to end through the CLI on a tiny synthetic data file.
"""

from __future__ import annotations

import json
import os
import time
import uuid

import httpx
import numpy as np
import pytest

from conftest import wait_until

from banditroute.feedback.log import EventLog
from banditroute.core.security import sign, verify
from banditroute.core.storage import StorageConfig, open_storage
from banditroute.testkit.synthetic import make_routing_data

pytestmark = pytest.mark.ray


@pytest.fixture
def loop(serve_instance, tmp_path):
    """Parameter server + learner + feedback actors with unique names, and a 2-replica router app wired to them."""
    import ray
    from ray import serve

    from banditroute.cluster.app import router_application
    from banditroute.cluster.config import app_config_from_dict
    from banditroute.cluster.online import start_online_loop
    from banditroute.cluster.up import wait_healthy
    from banditroute.serve.testing import hashing_policy

    prefix = f"t{uuid.uuid4().hex[:8]}"
    data = make_routing_data(60, seed=3)
    policy = hashing_policy(models=data.models, dim=64)
    storage = StorageConfig(uri=str(tmp_path / "storage"))
    app = app_config_from_dict({
        "router": {"app_name": prefix, "num_replicas": 2, "num_cpus": 0.1, "num_gpus": 0.0, "ingress_num_cpus": 0.1,
                   "torch_threads": 1, "seed": 0, "weights_poll_timeout_s": 2.0},
        # Promotion gate off: this test checks the plumbing (every update reaches BOTH replicas); the gate has its own tests.
        "learner": {"checkpoint_every": 5, "replay_sample": 16, "promotion": {"enabled": False}},
        "feedback": {"learner_batch_size": 8, "learner_max_delay_s": 0.05, "unknown_grace_s": 0.3},
        "storage": {"uri": str(storage.uri)},
        "online": {"enabled": True, "actor_prefix": prefix, "learner_num_cpus": 0.1, "feedback_num_cpus": 0.1},
    }, environ={})
    wired = start_online_loop(app, policy.state())
    serve.run(router_application(wired.router), name=prefix, route_prefix="/", blocking=False)
    base = f"http://127.0.0.1:{serve_instance}"
    wait_healthy(base, 120)
    yield {"base": base, "ps": wired.parameter_server, "learner": wired.learner, "feedback": wired.feedback, "data": data,
           "storage": storage, "start_version": wired.learner_status["policy_version"], "names": wired.names.as_dict()}
    for handle in wired.handles.values():
        ray.kill(handle, no_restart=True)


def raw_id(token: str) -> str:
    """The raw decision id (as logged) a client-facing token binds."""
    return verify(token, [os.environ["BANDITROUTE_TOKEN_SECRET"]], time.time()).decision_id


def route_and_reward(client: httpx.Client, data, n: int, rng) -> list[str]:
    acked = []
    for i in range(n):
        row = int(rng.integers(len(data)))
        r = client.post("/v1/route", json={"prompt": data.prompts[row], "preference": {"quality": 0.5, "cost": 0.5}, "mode": "explore"})
        assert r.status_code == 200, r.text
        d = r.json()
        k = data.models.index(d["model"])
        fb = client.post("/v1/feedback", json={"decision_id": d["decision_id"], "score": float(data.scores[row, k]),
                                               "cost": float(data.costs[row, k])})
        assert fb.status_code == 200 and fb.json()["status"] == "accepted", fb.text
        acked.append(d["decision_id"])
    return acked


def test_rewards_train_new_weights_that_every_replica_serves(loop):
    import ray

    rng = np.random.default_rng(0)
    with httpx.Client(base_url=loop["base"], timeout=30.0, trust_env=False) as client:
        acked = route_and_reward(client, loop["data"], 40, rng)

        # Bad feedback: 4xx naming the field; a duplicate (replayed token) is 409 and changes nothing.
        dup = client.post("/v1/feedback", json={"decision_id": acked[0], "score": 0.0})
        assert dup.status_code == 409 and dup.json()["status"] == "duplicate", dup.text
        unsigned = client.post("/v1/feedback", json={"decision_id": "no-such-decision", "score": 1.0})
        assert unsigned.status_code == 401 and unsigned.json()["error"]["field"] == "decision_id"
        forged_ok = sign("no-such-decision", "m", 0, time.time() + 60, os.environ["BANDITROUTE_TOKEN_SECRET"])
        unknown = client.post("/v1/feedback", json={"decision_id": forged_ok, "score": 1.0})  # authentic, never routed
        assert unknown.status_code == 404 and unknown.json()["error"]["field"] == "decision_id"
        for body, field in (({"decision_id": acked[1], "score": 1.5}, "score"), ({"score": 0.5}, "decision_id"),
                            ({"decision_id": acked[1], "score": "good"}, "score"), ({"decision_id": acked[1], "score": 1, "cost": -2}, "cost")):
            bad = client.post("/v1/feedback", json=body)
            assert bad.status_code == 422 and bad.json()["error"]["field"] == field, (body, bad.text)
        assert client.post("/v1/feedback", content=b"{not json", headers={"content-type": "application/json"}).status_code == 400

    stats = ray.get(loop["feedback"].flush.remote(30.0))
    assert stats["rewards_accepted"] == 40 and stats["rewards_duplicate"] == 1 and stats["rewards_unknown"] == 1
    assert stats["events_sent"] == 40
    final = ray.get(loop["learner"].status.remote())
    assert final["events_trained"] == 40 and final["policy_version"] > loop["start_version"]

    # EVERY replica (both) serves the newest version.
    def both_current():
        versions = ray.get(loop["ps"].replica_versions.remote(10.0))
        return versions if len(versions) == 2 and all(v >= final["policy_version"] for v in versions.values()) else None

    wait_until(both_current, 30, what="both replicas on the final version")

    # The durable log holds every acknowledged event, exactly once.
    logged = EventLog(open_storage(loop["storage"])).read_events().column("decision_id").to_pylist()
    assert sorted(logged) == sorted(raw_id(t) for t in acked)

    # A restarted feedback actor recovers what it acknowledged (a repeat is a duplicate, not a second event).
    ray.kill(loop["feedback"], no_restart=False)
    again = wait_until(lambda: _try(lambda: ray.get(loop["feedback"].submit_reward.remote(_reward(raw_id(acked[2]))))), 60, what="feedback restart")
    assert again["status"] == "duplicate"

    # A restarted learner resumes at (at least) the version replicas serve; versions never go back.
    ray.kill(loop["learner"], no_restart=False)
    resumed = wait_until(lambda: _try(lambda: ray.get(loop["learner"].status.remote())), 60, what="learner restart")
    assert resumed["policy_version"] >= final["policy_version"]
    with httpx.Client(base_url=loop["base"], timeout=30.0, trust_env=False) as client:
        route_and_reward(client, loop["data"], 10, rng)
    ray.get(loop["feedback"].flush.remote(30.0))
    after = wait_until(lambda: (s := ray.get(loop["learner"].status.remote()))["policy_version"] > resumed["policy_version"] and s, 30,
                     what="an update after the restart")
    assert after["policy_version"] > final["policy_version"]


def _reward(decision_id: str):
    from banditroute.core.records import RewardRecord

    return RewardRecord(decision_id=decision_id, score=1.0)


def _try(fn):
    try:
        return fn()
    except Exception:  # noqa: BLE001 - actor restarting
        return None


def test_up_command_end_to_end(serve_instance, tmp_path):
    from banditroute.cli import main

    data_path = make_routing_data(80, seed=5).save(tmp_path / "tiny.parquet")
    out = tmp_path / "up"
    prefix = f"up{uuid.uuid4().hex[:6]}"
    rc = main([
        "up", "--data", str(data_path), "--encoder", "hashing", "--max-decisions", "200", "--out", str(out),
        "--replicas", "2", "--concurrency", "8",
        "--set", f"online.actor_prefix={prefix}", "--set", f"router.app_name={prefix}", "--set", "router.num_cpus=0.1",
        "--set", "up.progress_interval_s=1", "--set", "up.cold_start.network.hidden_dim=32",
        # The promotion gate runs (held-out split, OPE every 10 updates) with a margin no candidate fails,
        # so this 200-decision smoke run publishes; the gate's decisions are tested in test_promotion.py.
        "--set", "learner.promotion.min_holdout_events=2", "--set", "learner.promotion.margin=10",
    ])
    assert rc == 0
    summary = json.loads((out / "summary.json").read_text())
    for key in ("decisions", "rewards_acknowledged", "events_in_log", "policy_version_start", "policy_version_end",
                "replica_versions", "reward_curve"):
        assert key in summary, key
    assert summary["decisions"] == 200 and summary["rewards_acknowledged"] == 200 and summary["events_in_log"] == 200
    assert summary["policy_version_start"] == 0 and summary["policy_version_end"] > 0
    assert len(summary["replica_versions"]) == 2
    assert all(v == summary["policy_version_end"] for v in summary["replica_versions"].values())
    assert summary["reward_curve"][-1][0] == 200 and all(len(p) == 2 for p in summary["reward_curve"])
    assert (out / "learning_curve.png").stat().st_size > 1000

    # Which version was served from which decision, and the gate's checks behind it.
    promotions = summary["promotions"]
    assert promotions and all(1 < d <= 200 for d, _ in promotions) and promotions[-1][1] <= summary["policy_version_end"]
    assert [v for _, v in promotions] == sorted({v for _, v in promotions})
    checks = summary["promotion"]["checks"]
    assert checks and any(c["promote"] for c in checks) and all(0 <= c["decision"] <= 200 and c["reason"] for c in checks)
    # The verdict against every single model on the same requests (the data's outcome table, the driver's w_cost draws).
    assert len(summary["reward_by_quarter"]) == 4 and all(q is not None for q in summary["reward_by_quarter"])
    assert sorted(summary["fixed_model_rewards"]) == sorted(make_routing_data(80, seed=5).models)
    best = summary["best_fixed_model"]
    assert best["reward"] == max(summary["fixed_model_rewards"].values())
    assert summary["beats_best_fixed_model"] == (summary["reward_by_quarter"][-1] > best["reward_last_quarter"])
