"""`build_app` with ``online.enabled`` brings up the whole loop (what a RayService does), on the session's Ray.

Storage is the real moto S3 server: the seed policy is read from an S3 URI,
checkpoints and the event log land under the same prefix, and a second build
(a restarted head or an upgrade) resumes from storage without a seed.
"""

from __future__ import annotations

import uuid

import httpx
import pytest

from conftest import wait_until

from banditroute.cluster.config import OnlineConfig
from banditroute.core.names import ActorNames
from banditroute.policy.checkpoint import fetch_policy_folder
from banditroute.feedback.log import EventLog
from banditroute.learner.checkpoint import list_checkpoints
from banditroute.core.storage import open_storage

pytestmark = pytest.mark.ray


def _upload_policy(folder, storage_config, key_prefix: str) -> str:
    storage = open_storage(storage_config)
    for name in ("policy.pt", "meta.json"):
        storage.write_bytes(f"{key_prefix}/{name}", (folder / name).read_bytes())
    return storage.uri_for(key_prefix)


def test_fetch_policy_folder_rejects_a_folder_without_meta(tmp_path):
    with pytest.raises(ValueError, match="online.initial_policy"):
        fetch_policy_folder(str(tmp_path), None, tmp_path, field="online.initial_policy")


def test_build_app_without_a_starting_point_names_initial_policy(ray_cluster, tmp_path):
    from banditroute.cluster.app import build_app

    with pytest.raises(ValueError, match=r"online\.initial_policy"):
        build_app({"router": {"num_gpus": 0}, "storage": {"uri": str(tmp_path / "empty")},
                   "online": {"enabled": True, "actor_prefix": "t-none"}})
    with pytest.raises(ValueError, match=r"^storage: required"):
        build_app({"router": {"num_gpus": 0}, "online": {"enabled": True}})
    with pytest.raises(ValueError, match=r"online\.actor_prefx"):
        build_app({"router": {"num_gpus": 0}, "storage": {"uri": str(tmp_path)}, "online": {"actor_prefx": "x"}})
    with pytest.raises(ValueError, match=r"prices\.small-model"):
        build_app({"router": {"num_gpus": 0, "policy": "x"}, "prices": {"small-model": -1}})


def test_online_app_starts_the_loop_on_s3_and_resumes(serve_instance, tmp_path, s3_server, s3_storage_config):  # noqa: F811
    import ray
    from ray import serve

    from banditroute.cluster.up import wait_healthy
    from banditroute.core.names import NAMESPACE
    from banditroute.cluster.app import build_app
    from banditroute.serve.testing import write_fixture

    policy_path, _ = write_fixture(tmp_path, n=8)
    seed_uri = _upload_policy(policy_path, s3_storage_config, "seed-policy")
    prefix = f"t{uuid.uuid4().hex[:8]}"
    names = ActorNames.for_prefix(prefix).as_dict()
    storage = {k: v for k, v in vars(s3_storage_config).items()}
    prices = {"big-model": 0.02, "mid-model": 0.002, "small-model": 0.0002}
    args = {
        "router": {"app_name": prefix, "num_gpus": 0, "num_cpus": 0.1, "ingress_num_cpus": 0.1, "torch_threads": 1,
                   "weights_poll_timeout_s": 2.0, "security": {"admin_api_keys_env": "BANDITROUTE_TEST_ADMIN_KEYS"}},
        "storage": storage, "prices": prices,
        "online": {"enabled": True, "initial_policy": seed_uri, "actor_prefix": prefix,
                   "learner_num_cpus": 0.1, "feedback_num_cpus": 0.1},
        "feedback": {"learner_batch_size": 2, "learner_max_delay_s": 0.05, "unknown_grace_s": 0.5},
        "learner": {"checkpoint_every": 1},
    }
    try:
        serve.run(build_app(dict(args)), name=prefix, route_prefix="/", blocking=False)
        base = f"http://127.0.0.1:{serve_instance}"
        health = wait_healthy(base, 120)
        assert health["models"] == ["big-model", "mid-model", "small-model"]
        ckpt = open_storage(s3_storage_config).child("checkpoints")
        assert list_checkpoints(ckpt), "the seed policy was not written as the first checkpoint on S3"

        with httpx.Client(base_url=base, timeout=30, trust_env=False) as client:
            acked = []
            for i in range(4):
                r = client.post("/v1/route", json={"prompt": f"what is {i} squared?", "mode": "explore"})
                assert r.status_code == 200, r.text
                decision = r.json()
                fb = client.post("/v1/feedback", json={"decision_id": decision["decision_id"], "score": 1.0})
                assert fb.status_code == 200, fb.text
                # no cost in the reward, none from an upstream: the configured price is the cost
                assert fb.json()["cost"] == pytest.approx(prices[decision["model"]])
                acked.append(decision)
        log = EventLog(open_storage(s3_storage_config))
        assert log.count_rows() == len(acked)  # acknowledged = in the S3 event log

        learner = ray.get_actor(names["learner"], namespace=NAMESPACE)
        ray.get(ray.get_actor(names["feedback"], namespace=NAMESPACE).flush.remote(30.0))
        wait_until(lambda: ray.get(learner.status.remote())["events_received"] >= len(acked), 60,  # trained on, or held out
                   what="the learner to receive every acknowledged event")
        ray.get(learner.checkpoint.remote())
        newest = list_checkpoints(ckpt)[-1]

        # The admin API reaches the learner the builder wired: status, pin (rollback), unpin.
        admin = {"Authorization": "Bearer admin-key-1"}
        with httpx.Client(base_url=base, timeout=60, trust_env=False) as client:
            assert client.get("/v1/admin/policy").status_code == 401
            status = client.get("/v1/admin/policy", headers=admin).json()
            assert newest in status["checkpoints"] and status["pinned"] is False
            bad = client.post("/v1/admin/policy/pin", json={"version": 10_000}, headers=admin)
            assert bad.status_code == 422 and bad.json()["error"]["field"] == "version"
            assert client.post("/v1/admin/policy/pin", json={"version": "1"}, headers=admin).status_code == 422
            first = status["checkpoints"][0]
            pinned = client.post("/v1/admin/policy/pin", json={"version": first}, headers=admin).json()
            assert pinned["pinned"] and pinned["source_version"] == first and pinned["serving_version"] > newest
            # the replicas move FORWARD to the pinned weights (a new number for old weights)
            wait_until(lambda: client.get("/healthz").json()["policy_version"] == pinned["serving_version"], 30,
                       what="the replicas to serve the pinned version")
            # an offline candidate (any BaRP checkpoint URI, e.g. train-from-log's) is served the same way
            offline = client.post("/v1/admin/policy/pin", json={"checkpoint": seed_uri}, headers=admin).json()
            assert offline["source_version"] == seed_uri and offline["serving_version"] > pinned["serving_version"]
            missing = client.post("/v1/admin/policy/pin", json={"checkpoint": seed_uri + "-nope"}, headers=admin)
            assert missing.status_code == 422 and missing.json()["error"]["field"] == "checkpoint"
            assert client.post("/v1/admin/policy/unpin", headers=admin).json()["was_pinned"] is True
        newest = list_checkpoints(ckpt)[-1]
        serving = ray.get(learner.status.remote())["serving_version"]
        serve.delete(prefix)
        for name in names.values():  # a lost cluster: only S3 remains
            ray.kill(ray.get_actor(name, namespace=NAMESPACE), no_restart=True)

        # A second build, no seed anywhere: the loop resumes from the S3 checkpoint.
        again = dict(args, online={"enabled": True, "actor_prefix": prefix})
        serve.run(build_app(again), name=prefix, route_prefix="/", blocking=False)
        assert wait_healthy(base, 120)["policy_version"] >= serving  # never backwards
        status = ray.get(ray.get_actor(names["learner"], namespace=NAMESPACE).status.remote())
        assert status["candidate_version"] >= newest
    finally:
        for name in names.values():
            try:
                ray.kill(ray.get_actor(name, namespace=NAMESPACE), no_restart=True)
            except ValueError:
                pass


def test_online_config_validates():
    with pytest.raises(ValueError, match="actor_prefix"):
        OnlineConfig(actor_prefix="").validate()


def test_wire_router_points_the_replicas_at_the_loop():
    from banditroute.cluster.online import wire_router
    from banditroute.serve.config import RouterConfig

    router = RouterConfig(policy="runs/p", num_replicas=3, decision_sink="local")
    wired = wire_router(router, ActorNames.for_prefix("t1"))
    assert wired.policy is None and wired.num_replicas == 3
    assert (wired.parameter_server_name, wired.learner_actor_name) == ("t1-parameter-server", "t1-learner")
    assert wired.decision_sink == "feedback-actor" and wired.decision_sink_options == {"name": "t1-feedback", "namespace": "banditroute"}
    assert router.policy == "runs/p" and router.decision_sink == "local"  # a copy: the caller's config is unchanged
