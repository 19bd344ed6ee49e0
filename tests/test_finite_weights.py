"""Non-finite weights are never made current: policy load, parameter-server publish, replica swap (issue 14)."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from banditroute.core.records import NonFiniteWeightsError, WeightsSnapshot, non_finite_weights
from banditroute.learner.param_server import ParameterServerState
from banditroute.serve.core import RouterCore
from banditroute.serve.testing import hashing_policy


def poisoned(snapshot: WeightsSnapshot, value: float, version: int) -> WeightsSnapshot:
    state = dict(snapshot.state)
    weights = {k: np.array(v, copy=True) for k, v in state["weights"].items()}
    name = sorted(weights)[0]
    weights[name].reshape(-1)[0] = value
    state["weights"] = weights
    return WeightsSnapshot(version, state)


def test_non_finite_weights_names_the_tensors():
    assert non_finite_weights({"a": np.zeros(3), "b": np.array([1.0, np.nan]), "c": np.array([np.inf])}) == ["b", "c"]
    assert non_finite_weights({"a": np.ones((2, 2), dtype=np.float32)}) == []


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_a_policy_refuses_non_finite_weights_and_keeps_its_own(bad):
    policy = hashing_policy(policy_version=3)
    before = policy.logits(np.ones((2, 64), np.float32), 0.3).numpy()
    with pytest.raises(NonFiniteWeightsError, match="v4"):
        policy.load_weights(poisoned(policy.snapshot(), bad, 4))
    assert policy.policy_version == 3
    assert np.array_equal(policy.logits(np.ones((2, 64), np.float32), 0.3).numpy(), before)


def test_the_parameter_server_refuses_to_publish_non_finite_weights():
    async def scenario():
        server = ParameterServerState()
        good = hashing_policy(policy_version=1).snapshot()
        assert server.publish(good) == 1
        with pytest.raises(NonFiniteWeightsError):
            server.publish(poisoned(good, np.nan, 2))
        assert server.latest.policy_version == 1
        assert await server.wait_for_newer(1, 0.01) is None  # nothing reached the replicas

    asyncio.run(scenario())


def test_a_replica_keeps_serving_when_a_swap_brings_non_finite_weights():
    core = RouterCore(hashing_policy(policy_version=1), seed=0)
    with pytest.raises(NonFiniteWeightsError):
        core.swap_weights(poisoned(core.policy.snapshot(), np.nan, 2))
    assert core.policy_version == 1
    results = core.route_batch([("What is 2+2?", 0.2, None, "explore")])
    assert results[0].ok and results[0].policy_version == 1
