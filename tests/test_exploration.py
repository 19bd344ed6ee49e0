"""Bounded exploration: the projection's properties (hypothesis), the one decision rule and the propensities RouterCore logs."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from banditroute.policy.decide import decide
from banditroute.policy.exploration import ExplorationBounds, bound_probabilities, check_bounds
from banditroute.serve.core import RouteRequest, RouterCore
from banditroute.serve.testing import hashing_policy

TOL = 1e-5


@st.composite
def rows_and_bounds(draw):
    """A batch of softmax rows over K models with random candidate masks, plus floor <= ceiling."""
    k = draw(st.integers(1, 12))
    b = draw(st.integers(1, 6))
    logits = np.array(draw(st.lists(st.floats(-30, 30), min_size=b * k, max_size=b * k)), dtype=np.float32).reshape(b, k)
    mask = np.array(draw(st.lists(st.booleans(), min_size=b * k, max_size=b * k)), dtype=bool).reshape(b, k)
    mask[np.arange(b), draw(st.lists(st.integers(0, k - 1), min_size=b, max_size=b))] = True  # >= 1 candidate per row
    floor = draw(st.floats(0.0, 0.5))
    ceiling = draw(st.floats(max(floor, 1e-3), 1.0))
    probs = torch.softmax(torch.from_numpy(logits).masked_fill(torch.from_numpy(~mask), float("-inf")), dim=-1)
    return probs, torch.from_numpy(mask), floor, ceiling


@settings(max_examples=300, deadline=None)
@given(rows_and_bounds())
def test_projection_properties(case):
    probs, mask, floor, ceiling = case
    q = bound_probabilities(probs, mask, floor, ceiling)
    k = mask.sum(dim=1, keepdim=True).float()
    lo = torch.minimum(torch.full_like(k, floor), 1.0 / k)
    hi = torch.maximum(torch.full_like(k, ceiling), 1.0 / k)
    assert torch.allclose(q.sum(dim=1), torch.ones(len(q)), atol=TOL)
    assert bool((q[~mask] == 0).all()), "masked-out models must stay exactly 0"
    cand_lo = lo.expand_as(q)[mask]
    cand_hi = hi.expand_as(q)[mask]
    assert bool((q[mask] >= cand_lo - TOL).all()) and bool((q[mask] <= cand_hi + TOL).all())
    # Order among candidates is kept: p_i > p_j never becomes q_i < q_j.
    for row in range(len(q)):
        idx = torch.nonzero(mask[row]).squeeze(1)
        p_row, q_row = probs[row, idx], q[row, idx]
        bigger = p_row.unsqueeze(1) > p_row.unsqueeze(0)
        assert not bool((bigger & (q_row.unsqueeze(1) < q_row.unsqueeze(0) - TOL)).any())
    # Rows already inside the bounds are untouched (bit-identical).
    inside = ((probs >= lo) & (probs <= hi) | ~mask).all(dim=1)
    assert torch.equal(q[inside], probs[inside])


@settings(max_examples=100, deadline=None)
@given(rows_and_bounds())
def test_projection_is_the_closest_distribution_within_bounds(case):
    """Euclidean projection: no random feasible point inside the bounds is closer to p."""
    probs, mask, floor, ceiling = case
    q = bound_probabilities(probs, mask, floor, ceiling).double()
    p = probs.double()
    k = mask.sum(dim=1, keepdim=True).double()
    lo = torch.where(mask, torch.minimum(torch.full_like(k, floor), 1.0 / k), torch.zeros_like(p))
    hi = torch.where(mask, torch.maximum(torch.full_like(k, ceiling), 1.0 / k), torch.zeros_like(p))
    gen = torch.Generator().manual_seed(0)
    for _ in range(20):  # random feasible points: a mix of q and the uniform-on-candidates point
        t = torch.rand(len(p), 1, generator=gen, dtype=torch.float64)
        uniform = mask.double() / k
        other = t * q + (1 - t) * uniform  # convex combination stays feasible
        assert bool((((other - p) ** 2).sum(1) >= ((q - p) ** 2).sum(1) - 1e-9).all())
    assert bool((q >= lo - TOL).all() and (q <= hi + TOL).all())


def test_examples_and_disabled_bounds():
    p = torch.tensor([[0.999, 0.0005, 0.0005, 0.0], [0.5, 0.3, 0.2, 0.0], [1.0, 0.0, 0.0, 0.0]])
    m = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 0], [1, 0, 0, 0]], dtype=torch.bool)
    q = bound_probabilities(p, m, 0.01, 0.98)
    assert torch.allclose(q[0], torch.tensor([0.98, 0.01, 0.01, 0.0]), atol=1e-6)
    assert torch.equal(q[1], p[1]) and torch.equal(q[2], p[2])  # inside; a single candidate keeps 1
    # floor > 1/K: uniform over the candidates (the effective floor is 1/K).
    assert torch.allclose(bound_probabilities(p, m, 0.5, 0.6)[0], torch.tensor([1 / 3, 1 / 3, 1 / 3, 0.0]), atol=1e-6)
    assert bound_probabilities(p, m, 0.0, 1.0) is p  # bounds off: no work at all
    with pytest.raises(ValueError, match="exploration_floor"):
        check_bounds(0.5, 0.2)
    with pytest.raises(ValueError, match="exploration_ceiling"):
        check_bounds(0.0, 0.0)


def test_router_core_logs_the_bounded_propensity():
    models = ("big-model", "mid-model", "small-model")
    policy = hashing_policy(models, seed=3)
    with torch.no_grad():  # a sharp policy: one model gets ~all of the softmax
        policy.network.decision_head.weight.zero_()
        policy.network.decision_head.bias.copy_(torch.tensor([20.0, 0.0, -20.0]))
    raw = RouterCore(policy, seed=0, exploration_floor=0.0, exploration_ceiling=1.0)
    sharp = raw.route_batch([RouteRequest("hello", 0.5, None, "explore")])[0].probabilities
    assert sharp["small-model"] < 1e-6, "the test needs a sharp softmax"  # else the floor would not bind

    core = RouterCore(policy, seed=0, exploration_floor=0.05, exploration_ceiling=0.9)
    res = core.route_batch([RouteRequest("hello", 0.5, None, "explore")] * 300 + [RouteRequest("hello", 0.5, None, "greedy")])
    explore, greedy = res[:-1], res[-1]
    for r in explore:
        assert min(r.probabilities.values()) >= 0.05 - 1e-6 and max(r.probabilities.values()) <= 0.9 + 1e-6
        assert r.probability == pytest.approx(r.probabilities[r.model])  # the logged propensity is the bounded one
        rec = r.record()
        assert rec.probability == pytest.approx(rec.candidate_probabilities[rec.candidates.index(rec.chosen_model)])
    assert any(r.model == "small-model" for r in explore), "the floor must make every candidate reachable"
    assert greedy.probability == 1.0 and greedy.model == "big-model"
    assert greedy.probabilities["small-model"] < 1e-6  # greedy rows report the plain softmax
    # A request with a candidate subset: masked models absent, bounds over the subset.
    sub = core.route_batch([RouteRequest("hello", 0.5, ["mid-model", "small-model"], "explore")])[0]
    assert set(sub.probabilities) == {"mid-model", "small-model"}
    assert min(sub.probabilities.values()) >= 0.1 - 1e-6  # K=2: ceiling 0.9 binds, so the other gets >= 0.1


# --- the one decision rule (policy.decide.decide) ------------------------------------------------


@st.composite
def logits_and_bounds(draw):
    """Masked logits (-inf = not a candidate), one mode per row, and bounds."""
    probs, mask, floor, ceiling = draw(rows_and_bounds())
    logits = torch.log(probs)  # -inf exactly where the mask is False
    explore = torch.tensor(draw(st.lists(st.booleans(), min_size=len(probs), max_size=len(probs))))
    return logits, mask, explore, ExplorationBounds(floor, ceiling)


@settings(max_examples=200, deadline=None)
@given(logits_and_bounds(), st.integers(0, 2**31 - 1))
def test_decide_bounds_masks_and_propensities(case, seed):
    logits, mask, explore, bounds = case
    out = decide(logits, explore, bounds, torch.Generator().manual_seed(seed), mask)
    plain = torch.softmax(logits, dim=-1)
    bounded = bound_probabilities(plain, mask, bounds.floor, bounds.ceiling)
    assert torch.allclose(out.probabilities.sum(dim=1), torch.ones(len(logits)), atol=TOL)
    assert bool(mask.gather(1, out.actions.unsqueeze(1)).all()), "a decision never picks a model outside the mask"
    assert bool((out.probabilities[~mask] == 0).all())
    # explore rows: the bounded distribution, the propensity is the chosen model's probability under it
    assert torch.equal(out.probabilities[explore], bounded[explore])
    chosen = out.probabilities.gather(1, out.actions.unsqueeze(1)).squeeze(1)
    assert torch.equal(out.propensities[explore], chosen[explore])
    assert bool((out.propensities[explore] > 0).all())
    # greedy rows: the plain softmax, its argmax, propensity 1
    greedy = ~explore
    assert torch.equal(out.probabilities[greedy], plain[greedy])
    assert torch.equal(out.actions[greedy], plain[greedy].argmax(dim=1))
    assert bool((out.propensities[greedy] == 1).all())


def test_decide_one_mode_for_the_batch_and_the_default_mask():
    logits = torch.tensor([[9.0, 0.0, float("-inf")], [0.0, 1.0, 2.0]])
    bounds = ExplorationBounds(0.1, 0.8)
    gen = torch.Generator().manual_seed(0)
    state = gen.get_state()
    greedy = decide(logits, False, bounds, gen)
    assert torch.equal(gen.get_state(), state), "an all-greedy batch draws nothing"
    assert greedy.actions.tolist() == [0, 2] and greedy.propensities.tolist() == [1.0, 1.0]
    explore = decide(logits, True, bounds, gen)  # mask: the finite logits
    assert explore.probabilities[0, 2] == 0 and explore.probabilities[0, 1] >= 0.2 - 1e-6  # K=2: ceiling 0.8 binds
    assert torch.equal(explore.probabilities, decide(logits, torch.tensor([True, True]), bounds, gen).probabilities)
    # sampling frequencies follow the bounded distribution
    many = decide(logits[:1].expand(20000, 3), True, bounds, torch.Generator().manual_seed(1))
    freq = torch.bincount(many.actions, minlength=3).float() / 20000
    assert torch.allclose(freq, many.probabilities[0], atol=0.02)
    assert torch.equal(many.propensities, many.probabilities[0, many.actions])


def test_bounds_off_is_the_plain_softmax_sample():
    """Without bounds, explore is the old softmax sample: same draws for the same seed."""
    logits = torch.randn(64, 5, generator=torch.Generator().manual_seed(3))
    out = decide(logits, True, ExplorationBounds.off(), torch.Generator().manual_seed(7))
    probs = torch.softmax(logits, dim=-1)
    expected = torch.multinomial(probs, 1, generator=torch.Generator().manual_seed(7)).squeeze(1)
    assert torch.equal(out.actions, expected) and torch.equal(out.probabilities, probs)
    with pytest.raises(ValueError, match="exploration_floor"):
        ExplorationBounds(0.5, 0.2)
