"""Freshly onboarded models get a probability band: never ignored, never over-trusted."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from banditroute.policy.fresh_models import FreshModelConfig, band_logits, fresh_columns
from banditroute.testkit.identity import tiny_identity_policy


def probs(logits: torch.Tensor) -> np.ndarray:
    return torch.softmax(logits, dim=-1).numpy()


def test_band_raises_an_ignored_fresh_model_to_the_floor_and_caps_an_overtrusted_one():
    logits = torch.tensor([[5.0, 4.0, -10.0, 0.0], [0.0, 0.0, 12.0, 1.0]])  # row 0 ignores model 2, row 1 trusts it blindly
    out = band_logits(logits, torch.tensor([False, False, True, False]), floor=0.05, cap=0.3)
    p = probs(out)
    assert p[0, 2] == pytest.approx(0.05, abs=1e-5)
    assert p[1, 2] == pytest.approx(0.3, abs=1e-5)
    # the others keep their ratio (only the fresh column moved)
    assert p[0, 0] / p[0, 1] == pytest.approx(np.exp(1.0), rel=1e-5)


def test_band_leaves_probabilities_inside_it_and_unoffered_or_lone_candidates_alone():
    logits = torch.tensor([[1.0, 0.0, 0.5], [0.0, float("-inf"), 3.0], [float("-inf"), 2.0, float("-inf")]])
    fresh = torch.tensor([False, True, False])
    out = band_logits(logits, fresh, floor=0.02, cap=0.6)
    torch.testing.assert_close(out[0], logits[0])  # p(model 1) ~ 0.19: inside the band
    assert torch.isinf(out[1, 1]) and out[1, 1] < 0  # not offered: stays unoffered
    torch.testing.assert_close(out[2], logits[2])  # the only candidate: nothing to band against


def test_band_adapts_to_few_candidates_and_handles_several_fresh_models():
    logits = torch.tensor([[0.0, 9.0]])  # two candidates, cap 0.25 < 1/2: the cap is raised to 1/2
    p = probs(band_logits(logits, torch.tensor([False, True]), floor=0.03, cap=0.25))
    assert p[0, 1] == pytest.approx(0.5, abs=1e-5)
    logits = torch.tensor([[8.0, -9.0, -9.0, 0.0, 0.0, 0.0]])
    p = probs(band_logits(logits, torch.tensor([False, True, True, False, False, False]), floor=0.04, cap=0.3))
    assert (p[0, 1:3] > 0.03).all() and (p[0, 1:3] < 0.3).all()


def test_fresh_columns_count_the_outcomes_behind_an_identity():
    cfg = FreshModelConfig(min_observations=50)
    assert fresh_columns([10, 49, 50, 2000], cfg) == [True, True, False, False]
    assert fresh_columns([10], FreshModelConfig(enabled=False)) == [False]
    with pytest.raises(ValueError, match="floor < cap"):
        FreshModelConfig(floor=0.5, cap=0.4).validate()


def test_served_logits_band_an_onboarded_model_but_offline_decide_does_not():
    policy = tiny_identity_policy()
    large = policy.registry.get("large")
    # a quiz made the newcomer look like `large` at a tenth of the price: the raw policy would send it everything
    policy.registry.add("newcomer", large.price / 10, large.mu, large.sigma, n_observations=20)
    emb = np.random.default_rng(0).normal(size=(32, 64)).astype(np.float32)
    k = policy.models.index("newcomer")
    raw = torch.softmax(policy.logits_for(emb, 0.2)[0], -1)[:, k]
    served = torch.softmax(policy.logits(emb, 0.2), -1)[:, k]
    assert raw.mean() > 0.5 and served.max() <= policy.meta.fresh_models.cap + 1e-5
    assert policy.decide(emb, 0.2).models == policy.models  # offline decide: the raw policy
    # enough evidence behind the identity: no band
    policy.registry.add("newcomer", large.price / 10, large.mu, large.sigma, n_observations=500, replace=True)
    torch.testing.assert_close(policy.logits(emb, 0.2), policy.logits_for(emb, 0.2)[0])


def test_a_fresh_model_the_identity_underrates_still_gets_the_floor():
    policy = tiny_identity_policy()
    policy.registry.add("underrated", 0.004, [-3.0, -3.0], [0.8, 0.8], n_observations=20)
    emb = np.random.default_rng(1).normal(size=(16, 64)).astype(np.float32)
    k = policy.models.index("underrated")
    assert float(torch.softmax(policy.logits_for(emb, 0.5)[0], -1)[:, k].max()) < 0.01
    served = torch.softmax(policy.logits(emb, 0.5), -1)[:, k]
    assert served.min() >= policy.meta.fresh_models.floor - 1e-5


def test_router_core_records_the_registry_version_with_each_decision():
    from banditroute.serve.core import RouteRequest, RouterCore, decision_batch

    policy = tiny_identity_policy()
    core = RouterCore(policy, seed=0)
    first = core.route_batch([RouteRequest("what is 2+2?", 0.3, None, "explore")])[0]
    assert first.decision.registry_version == policy.registry.version
    policy.registry.set_price("large", 0.001)
    second = core.route_batch([RouteRequest("what is 2+3?", 0.3, None, "explore")])[0]
    assert second.decision.registry_version == first.decision.registry_version + 1
    table = decision_batch([first, second])
    assert table.column("registry_version").to_pylist() == [first.decision.registry_version, second.decision.registry_version]
