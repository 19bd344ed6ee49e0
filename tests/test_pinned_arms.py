"""Experiment arms that pin a policy version (serve/pinned_arms.py): config, loading, the batch path, the report."""

from __future__ import annotations

import numpy as np
import pytest

from banditroute.cluster.config import app_config_from_dict
from banditroute.core.config import ConfigError
from banditroute.core.storage import StorageConfig
from banditroute.policy.experiments import ArmConfig, ExperimentConfig, experiment_report
from banditroute.serve.core import RouterCore
from banditroute.serve.pinned_arms import load_pinned_arms
from banditroute.serve.protocol import RouteRequest
from banditroute.serve.testing import hashing_policy

MODELS = ("small-model", "mid-model", "big-model")


def pinned_experiment(checkpoint: str) -> ExperimentConfig:
    return ExperimentConfig("served-vs-v3", [ArmConfig("router", 0.5), ArmConfig("pinned", 0.5, checkpoint=checkpoint)])


def test_pinned_arm_config_is_validated_naming_the_field():
    arms = [{"name": "router"}, {"name": "pinned", "checkpoint": "s3://bucket/prefix/checkpoints/v3"}]
    app = app_config_from_dict({"router": {"policy": "ckpt"}, "storage": {"uri": "s3://bucket/prefix", "endpoint_url": "http://minio:9000"},
                                "experiments": [{"name": "e", "arms": arms}]})
    assert app.router.experiments[0].arms[1].checkpoint == "s3://bucket/prefix/checkpoints/v3"
    # the cluster layer hands the replicas the application's storage access for checkpoint URIs
    assert isinstance(app.router.pinned_storage, StorageConfig)
    assert app.router.pinned_storage.endpoint_url == "http://minio:9000"
    for bad in ("", "   "):
        with pytest.raises(ConfigError, match=r"experiments.e.arms\[1\].checkpoint"):
            app_config_from_dict({"router": {"policy": "ckpt"},
                                  "experiments": [{"name": "e", "arms": [{"name": "a"}, {"name": "b", "checkpoint": bad}]}]})
    with pytest.raises(ConfigError, match=r"experiments.e.arms\[1\].checkpoint.*not both"):
        app_config_from_dict({"router": {"policy": "ckpt"}, "experiments": [
            {"name": "e", "arms": [{"name": "a"}, {"name": "b", "model": "small-model", "checkpoint": "ckpt/v1"}]}]})


def test_an_arm_may_pin_a_version_of_the_learners_checkpoints():
    arms = [{"name": "router"}, {"name": "v3", "policy_version": 3}]
    app = app_config_from_dict({"router": {"policy": "ckpt"}, "storage": {"uri": "s3://bucket/prefix/"},
                                "learner": {"checkpoint_prefix": "ckpts"}, "experiments": [{"name": "e", "arms": arms}]})
    assert app.router.experiments[0].arms[1].checkpoint == "s3://bucket/prefix/ckpts/v000000000003"
    for arm, message in (({"name": "b", "policy_version": -1}, "policy_version"),
                         ({"name": "b", "policy_version": 3, "model": "small-model"}, "policy_version.*not both")):
        with pytest.raises(ConfigError, match=rf"experiments.e.arms\[1\].{message}"):
            app_config_from_dict({"router": {"policy": "ckpt"}, "storage": {"uri": "s3://b/p"},
                                  "experiments": [{"name": "e", "arms": [{"name": "a"}, arm]}]})
    with pytest.raises(ConfigError, match=r"experiments.e.arms\[1\].policy_version: needs the application's storage"):
        app_config_from_dict({"router": {"policy": "ckpt"},
                              "experiments": [{"name": "e", "arms": [{"name": "a"}, {"name": "b", "policy_version": 3}]}]})


def test_loading_refuses_missing_checkpoints_other_encoders_and_other_pools(tmp_path):
    core = RouterCore(hashing_policy(MODELS, seed=1, policy_version=9), seed=0)
    with pytest.raises(ValueError, match=r"experiments.served-vs-v3.arms\[1\].checkpoint: .*not a policy checkpoint"):
        load_pinned_arms([pinned_experiment(str(tmp_path / "nowhere"))], None, core)
    with pytest.raises(ValueError, match=r"experiments.served-vs-v3.arms\[1\].checkpoint: file:///nonexistent-h7d"):
        load_pinned_arms([pinned_experiment("file:///nonexistent-h7d/ckpt")], None, core)
    hashing_policy(MODELS, dim=32, seed=2).save(tmp_path / "narrow")
    with pytest.raises(ValueError, match=r"mismatch: experiments.served-vs-v3.arms\[1\].checkpoint"):
        load_pinned_arms([pinned_experiment(str(tmp_path / "narrow"))], None, core)
    hashing_policy(MODELS[:2], seed=2).save(tmp_path / "two")
    with pytest.raises(ValueError, match=r"arms\[1\].checkpoint: the pinned policy scores"):
        load_pinned_arms([pinned_experiment(str(tmp_path / "two"))], None, core)


def test_pinned_rows_are_decided_by_the_pinned_weights_on_the_same_embeddings(tmp_path):
    served = hashing_policy(MODELS, seed=1, policy_version=9)
    pinned = hashing_policy(MODELS, seed=5, policy_version=3)
    pinned.save(tmp_path / "v3")
    core = RouterCore(served, seed=0)
    exp = pinned_experiment(str(tmp_path / "v3"))
    core.experiments = [exp]
    core.pinned = load_pinned_arms([exp], None, core)
    assert core.pinned.versions() == {"served-vs-v3/pinned": 3}
    reqs = [RouteRequest(f"prompt {i}", 0.3, None, "greedy") for i in range(300)]
    res = core.route_batch(reqs)
    # references: each policy alone on the same prompts (greedy: deterministic)
    ref_served = {r.decision.prompt_sha256: r for r in RouterCore(served, seed=0).route_batch(reqs)}
    ref_pinned = {r.decision.prompt_sha256: r for r in RouterCore(pinned, core.encoder, seed=0).route_batch(reqs)}
    arms = [r.decision.arm for r in res]
    assert set(arms) == {"router", "pinned"} and 0.35 < arms.count("pinned") / len(arms) < 0.65
    differs = 0
    for r in res:
        d = r.decision
        ref = (ref_pinned if d.arm == "pinned" else ref_served)[d.prompt_sha256]
        assert d.experiment == "served-vs-v3" and d.override == "" and d.router_model is None
        assert d.policy_version == (3 if d.arm == "pinned" else 9)
        assert d.chosen_model == ref.model and d.probability == pytest.approx(ref.probability)
        assert d.candidate_probabilities == pytest.approx(ref.decision.candidate_probabilities, abs=1e-6)
        np.testing.assert_allclose(d.embedding, ref.embedding, atol=1e-6)  # the same embedding either way
        differs += ref_served[d.prompt_sha256].decision.candidate_probabilities != pytest.approx(ref.decision.candidate_probabilities)
    assert differs > 100  # the two policies really disagree, so the test tells them apart
    # explore rows: the pinned arm logs its own propensities (p of the chosen model under its distribution)
    for r in core.route_batch([RouteRequest(f"x {i}", 0.3, None, "explore") for i in range(100)]):
        assert r.probability == pytest.approx(r.probabilities[r.model])
    # sticky by user: one user's requests all land in one arm, decided by one version
    same = core.route_batch([RouteRequest(f"u {i}", 0.3, None, "greedy", user="alice") for i in range(20)])
    assert len({(r.decision.arm, r.policy_version) for r in same}) == 1
    # the report still splits the arms
    events = [{"decision_id": r.decision_id, "experiment": r.decision.experiment, "arm": r.decision.arm,
               "chosen_model": r.model, "served_model": None, "score": 1.0, "cost": 0.0, "w_cost": 0.3} for r in res]
    report = experiment_report([exp], [r.record().__dict__ for r in res], events, tau=0.01)
    counts = {a["name"]: a["decisions"] for a in report["experiments"][0]["arms"]}
    assert counts == {"router": arms.count("router"), "pinned": arms.count("pinned")}


def test_a_pinned_arm_whose_pool_moved_stops_enrolling(tmp_path):
    served = hashing_policy(MODELS, seed=1, policy_version=9)
    pinned = hashing_policy(MODELS, seed=5, policy_version=3)
    core = RouterCore(served, seed=0)
    exp = pinned_experiment(str(tmp_path / "unused"))
    core.experiments = [exp]
    from banditroute.serve.pinned_arms import PinnedArms

    pinned.meta.models = list(reversed(MODELS))  # the live pool no longer matches the pinned policy's columns
    core.pinned = PinnedArms({("served-vs-v3", "pinned"): pinned})
    res = core.route_batch([RouteRequest(f"prompt {i}", 0.3, None, "greedy") for i in range(100)])
    assert {r.decision.arm for r in res} == {"router", ""} and {r.policy_version for r in res} == {9}


def test_build_app_makes_pinned_checkpoint_folders_absolute_and_keeps_uris():
    from banditroute.cluster.app import resolve_paths

    arms = [{"name": "router"}, {"name": "old", "checkpoint": "runs/ckpt/v3"}, {"name": "s3", "checkpoint": "s3://b/p/v2"}]
    app = app_config_from_dict({"router": {"policy": "ckpt"}, "experiments": [{"name": "e", "arms": arms}]})
    resolved = resolve_paths(app.router).experiments[0].arms
    assert resolved[1].checkpoint.startswith("/") and resolved[1].checkpoint.endswith("runs/ckpt/v3")
    assert resolved[2].checkpoint == "s3://b/p/v2" and app.router.experiments[0].arms[1].checkpoint == "runs/ckpt/v3"


def test_a_replica_loads_its_pinned_arms_at_start_and_refuses_a_bad_one(tmp_path):
    from banditroute.serve.config import RouterConfig
    from banditroute.serve.service import RouterService

    hashing_policy(MODELS, seed=5, policy_version=3).save(tmp_path / "v3")
    served = hashing_policy(MODELS, seed=1, policy_version=9)
    sink = {"path": str(tmp_path / "log")}
    cfg = RouterConfig(policy="unused", decision_sink_options=sink, experiments=[pinned_experiment(str(tmp_path / "v3"))])
    service = RouterService(cfg, "r1", core=RouterCore(served, seed=0))
    assert service.core.pinned.versions() == {"served-vs-v3/pinned": 3}
    bad = RouterConfig(policy="unused", decision_sink_options=sink, experiments=[pinned_experiment(str(tmp_path / "nope"))])
    with pytest.raises(ValueError, match=r"experiments.served-vs-v3.arms\[1\].checkpoint"):
        RouterService(bad, "r2", core=RouterCore(served, seed=0))
