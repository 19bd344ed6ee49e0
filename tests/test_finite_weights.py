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


def test_a_checkpoint_with_non_finite_weights_is_refused_on_load(tmp_path):
    """Cold start and `serve --frozen` load checkpoints without a snapshot: the same guard applies."""
    import torch

    from banditroute.policy.checkpoint import load_policy

    policy = hashing_policy(policy_version=5)
    folder = policy.save(tmp_path / "ckpt")
    assert load_policy(folder).policy_version == 5
    weights = torch.load(folder / "policy.pt", weights_only=True)
    name = next(k for k, v in weights.items() if v.is_floating_point())
    weights[name].view(-1)[0] = float("nan")
    torch.save(weights, folder / "policy.pt")
    with pytest.raises(NonFiniteWeightsError, match=name.replace(".", r"\.")):
        load_policy(folder)


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


class _FakeParameterServer:
    """wait_for_newer hands out the queued snapshots in order (then nothing); report_replica records reports."""

    def __init__(self, snapshots):
        self.snapshots = list(snapshots)
        self.reports: list[int] = []
        server = self

        class _Method:
            def __init__(self, fn):
                self.fn = fn

            def remote(self, *args):
                async def call():
                    await asyncio.sleep(0.005)  # a real long-poll waits; this lets the test's loop run
                    return self.fn(*args)
                return call()

        self.wait_for_newer = _Method(lambda known, timeout: server.snapshots.pop(0) if server.snapshots else None)
        self.report_replica = _Method(lambda replica, version: server.reports.append(version))


def test_a_replica_counts_refused_weights_and_takes_the_next_good_ones(tmp_path, monkeypatch):
    from banditroute.serve import service as service_module
    from banditroute.serve.config import RouterConfig
    from banditroute.serve.testing import write_fixture

    policy_path, _ = write_fixture(tmp_path, n=8)
    cfg = RouterConfig(policy=str(policy_path), parameter_server_name="fake-ps",
                       decision_sink_options={"path": str(tmp_path / "log")})
    service = service_module.RouterService(cfg, "r1")
    start = service.core.policy_version
    good = service.core.policy.snapshot()
    server = _FakeParameterServer([poisoned(good, np.nan, start + 1), WeightsSnapshot(start + 2, good.state)])
    monkeypatch.setattr(service_module.ray, "get_actor", lambda name, namespace=None: server)

    async def poll_until_reported():
        task = asyncio.create_task(service._poll_weights())
        for _ in range(200):
            if len(server.reports) >= 3:
                break
            await asyncio.sleep(0.01)
        task.cancel()
        return await service.info()

    info = asyncio.run(poll_until_reported())
    assert service.weights_rejected == 1 and info["weights_rejected"] == 1
    assert service.core.policy_version == start + 2 and server.reports[:2] == [start, start + 2]
    service.close()
