"""The learner ACTOR on the session's Ray: a poisoned candidate is not published (reason in the status),
pin/unpin through the admin methods, and a killed learner resumes without any version going backwards."""

from __future__ import annotations

import uuid

import numpy as np
import pytest

from conftest import wait_until

from banditroute.policy.reward import fit_tau
from banditroute.core.storage import StorageConfig
from test_promotion import new_policy, uniform_events

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def problem():
    from banditroute.policy.encoders import EncoderConfig, make_encoder
    from banditroute.testkit.synthetic import make_routing_data

    data = make_routing_data(300, seed=0)
    encoder = make_encoder(EncoderConfig(name="hashing", dim=64))
    return data, encoder.encode(data.prompts), encoder.encoder_id


def _wait_restarted(learner, started_at: float, timeout_s=90.0):
    """Status of the NEW instance (ray.kill returns before the old one is gone)."""
    import ray

    def restarted_status():
        try:
            status = ray.get(learner.status.remote(), timeout=10)
        except Exception:  # noqa: BLE001 - restarting
            return None
        return status if status["started_at"] > started_at else None

    return wait_until(restarted_status, timeout_s, interval_s=0.3, what="the learner to come back")


def test_gate_pin_and_restart_on_ray(ray_cluster, problem, tmp_path):
    import ray

    from banditroute.learner.actor_handles import get_or_create_learner_actor
    from banditroute.core.names import NAMESPACE
    from banditroute.learner.param_server import get_or_create_parameter_server

    data, _, enc_id = problem
    prefix = f"g{uuid.uuid4().hex[:8]}"
    storage = StorageConfig(uri=str(tmp_path / "storage"))
    ps = get_or_create_parameter_server(f"{prefix}-ps", NAMESPACE, storage)
    # No re-base: this test follows versions through pin/restart (re-basing is tested in test_value_learner.py).
    cfg = {"learning_rate": 0.1, "replay_sample": 16, "checkpoint_every": 5, "rebase_after_held_checks": 0,
           "promotion": {"every_updates": 5, "holdout_fraction": 0.5, "min_holdout_events": 40}}
    learner = get_or_create_learner_actor(cfg, storage, new_policy(data, enc_id).state(), name=f"{prefix}-learner",
                                          parameter_server_name=f"{prefix}-ps", num_cpus=0.1)
    try:
        assert ray.get(ps.latest_version.remote()) == 0
        rng = np.random.default_rng(1)
        tau = fit_tau(data.costs)
        for u in range(30):  # trained-on rewards inverted, held-out ones true: the candidate gets worse
            ray.get(learner.update.remote(uniform_events(problem, rng, 16, u * 100, poison_training=True, tau=tau)))
        status = ray.get(learner.status.remote())
        assert status["candidate_version"] == 30 and status["serving_version"] == 0 and status["policy_version"] == 0
        assert ray.get(ps.latest_version.remote()) == 0, "a held candidate must not reach the parameter server"
        last = status["promotion"]["last_decision"]
        assert last["promote"] is False and "possibly worse" in last["reason"] and last["difference"]["value"] < 0

        # Admin: pin (rollback) to checkpoint v20 -> replicas get its weights under a NEW number; then unpin.
        assert ray.get(learner.list_checkpoints.remote())[-1] == 30
        pinned = ray.get(learner.pin.remote(20))
        assert pinned["source_version"] == 20 and pinned["serving_version"] > 30 and pinned["published"]
        assert ray.get(ps.latest_version.remote()) == pinned["serving_version"]
        with pytest.raises(ray.exceptions.RayTaskError, match="no checkpoint v9999"):
            ray.get(learner.pin.remote(9999))
        for u in range(30, 35):
            ray.get(learner.update.remote(uniform_events(problem, rng, 16, u * 100)))
        held = ray.get(learner.promotion_status.remote())
        assert held["pinned"] and held["serving_version"] == pinned["serving_version"]
        assert held["candidate_version"] == pinned["candidate_version"] + 5
        # Kill while pinned: the restarted learner keeps the pin and counts above everything it used.
        started_at = ray.get(learner.status.remote())["started_at"]
        ray.kill(learner, no_restart=False)
        resumed = _wait_restarted(learner, started_at)
        assert resumed["pinned"] and resumed["serving_version"] == held["serving_version"]
        assert resumed["candidate_version"] >= held["candidate_version"]
        assert ray.get(ps.latest_version.remote()) == held["serving_version"]
        assert ray.get(learner.unpin.remote())["was_pinned"]
        for u in range(35, 40):
            ray.get(learner.update.remote(uniform_events(problem, rng, 16, u * 100)))
        after = ray.get(learner.promotion_status.remote())
        assert after["candidate_version"] > resumed["candidate_version"] and after["serving_version"] >= resumed["serving_version"]
        assert after["history"] and after["history"][-1]["action"] == "gate"  # the gate decides again
        assert ray.get(ps.latest_version.remote()) == after["serving_version"]
    finally:
        ray.kill(learner, no_restart=True)
        ray.kill(ps, no_restart=True)
