"""Budget pacer: the cost weight is steered so that spend tracks a target."""

from __future__ import annotations

import math

import numpy as np
import pytest

from banditroute.policy.decide import Decisions
from banditroute.policy.pacer import BudgetPacer, PacerConfig, PacerState, pacer_update, replay_with_pacer


def synthetic_stream(pacer: BudgetPacer, n: int, rng, rate_per_hour=None, t0=0.0):
    """Each request routes to an expensive model (USD 1) unless w_cost exceeds its threshold (then USD 0.1):
    expected cost per request = 0.1 + 0.9 * (1 - w)."""
    costs, t = [], t0
    for _ in range(n):
        c = 1.0 if pacer.w_cost < rng.random() else 0.1
        if rate_per_hour is not None:
            t += rng.exponential(3600.0 / rate_per_hour)
        pacer.observe(c, t if rate_per_hour is not None else None)
        costs.append(c)
    return np.array(costs), t


@pytest.mark.parametrize("target_per_request", [0.25, 0.4, 0.7])
def test_tracks_a_per_request_target(target_per_request):
    pacer = BudgetPacer(PacerConfig(target=1000 * target_per_request))
    costs, _ = synthetic_stream(pacer, 20000, np.random.default_rng(0))
    assert abs(costs.mean() / target_per_request - 1) < 0.05  # cumulative, warm-up included
    after = costs[4000:]
    assert abs(after.mean() / target_per_request - 1) < 0.03
    blocks = after.reshape(-1, 1000).mean(axis=1)
    assert np.mean(np.abs(blocks / target_per_request - 1)) < 0.06
    w_star = 1 - (target_per_request - 0.1) / 0.9
    assert abs(pacer.w_cost - w_star) < 0.1


def test_tracks_a_per_hour_target_when_traffic_doubles():
    rng = np.random.default_rng(1)
    target = 200.0  # USD per hour
    pacer = BudgetPacer(PacerConfig(target=target, unit="per_hour"))
    costs1, t1 = synthetic_stream(pacer, 8000, rng, rate_per_hour=500.0)  # 16 h at 500 req/h
    w_before = pacer.w_cost
    costs2, t2 = synthetic_stream(pacer, 16000, rng, rate_per_hour=1000.0, t0=t1)  # traffic doubles
    assert pacer.w_cost > w_before + 0.1  # twice the requests: cheaper routing per request
    # spend per hour in the second half of each phase is on target
    assert abs(costs1[4000:].sum() / ((t1 / 8000) * 4000 / 3600) / target - 1) < 0.1
    assert abs(costs2[8000:].sum() / ((t2 - t1) / 16000 * 8000 / 3600) / target - 1) < 0.1


def test_controller_direction_bounds_and_anti_windup():
    cfg = PacerConfig(target=1.0, w_init=0.5, w_min=0.05, w_max=0.9)
    s = PacerState(w_cost=0.5)
    over = pacer_update(s, 2.0, cfg)
    under = pacer_update(s, 0.5, cfg)
    assert over.w_cost > 0.5 > under.w_cost
    for _ in range(500):  # a target that cannot be met: stays at the bound, integral bounded
        s = pacer_update(s, 100.0, cfg)
    assert s.w_cost == pytest.approx(0.9)
    assert math.isfinite(s.integral)
    steps = 0
    while s.w_cost >= 0.5 and steps < 50:  # once spend drops, it recovers quickly
        s = pacer_update(s, 0.1, cfg)
        steps += 1
    assert steps < 15


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(target=0.0), "target"),
        (dict(target=-1.0), "target"),
        (dict(target=float("nan")), "target"),
        (dict(unit="per_day"), "unit"),
        (dict(window=0), "window"),
        (dict(w_min=0.5, w_max=0.4), "w_min"),
        (dict(w_init=0.995), "w_init"),
    ],
)
def test_bad_config(kwargs, message):
    with pytest.raises(ValueError, match=message):
        BudgetPacer(PacerConfig(**kwargs))


def test_bad_observations():
    pacer = BudgetPacer(PacerConfig(target=1.0))
    with pytest.raises(ValueError, match="cost"):
        pacer.observe(-1.0)
    hourly = BudgetPacer(PacerConfig(target=1.0, unit="per_hour", window=2))
    with pytest.raises(ValueError, match="timestamps"):
        hourly.observe_many([1.0, 1.0])


class ThresholdPolicy:
    """A stand-in policy: model 1 (expensive, good) while w_cost < the prompt's threshold, else model 0."""

    models = ["cheap", "pricey"]

    def decide(self, embeddings, w_cost, mask=None, explore=False):
        pick = (np.asarray(w_cost) < embeddings[:, 0]).astype(np.int64)
        probs = np.eye(2)[pick]
        return Decisions(pick, np.ones(len(pick)), probs)


def test_replay_through_a_policy():
    rng = np.random.default_rng(2)
    n = 300
    emb = rng.random((n, 4)).astype(np.float32)
    costs = np.c_[np.full(n, 0.001), np.full(n, 0.01)]
    scores = np.c_[np.full(n, 0.5), np.ones(n)]
    res = replay_with_pacer(ThresholdPolicy(), scores, costs, ["cheap", "pricey"], emb, PacerConfig(target=5.0), n_requests=8000)
    assert abs(res["relative_error_after_warmup"]) < 0.05
    assert res["block_mape_after_warmup"] < 0.1
    assert 0.5 < res["mean_score"] < 1.0


def test_the_controller_output_moves_the_shift_first_then_the_greedy_share():
    from banditroute.policy.pacer import spend_levers

    assert spend_levers(-9.0, 4.0, 2.0, 1.0) == (-4.0, 0.0)  # under-spending: only the shift, bounded
    assert spend_levers(3.0, 4.0, 2.0, 1.0) == (3.0, 0.0)
    assert spend_levers(5.0, 4.0, 2.0, 1.0) == (4.0, pytest.approx(0.5))
    assert spend_levers(99.0, 4.0, 2.0, 0.8) == (4.0, pytest.approx(0.8))  # capped at max_greedy
    assert spend_levers(99.0, 4.0, 2.0, 0.0) == (4.0, 0.0)  # lever off


def test_scopes_greedy_shares_combine_as_independent_draws():
    from banditroute.policy.pacer import combined_greedy_share

    assert combined_greedy_share([]) == 0.0
    assert combined_greedy_share([0.5, 0.5]) == pytest.approx(0.75)
    assert combined_greedy_share([0.2, 0.0, 1.0]) == pytest.approx(1.0)
