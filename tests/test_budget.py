"""Budget pacing in serving (issue 15 item 4): the shared ledger, the pure adjustment, the ingress client."""

from __future__ import annotations

import asyncio
import math

import pytest

from banditroute.core.config import ConfigError, from_dict
from banditroute.policy.pacer import PacerConfig, PacerState, cost_weight_adjustment, paced_w_cost
from banditroute.serve.budget import BudgetClient, BudgetConfig, BudgetLedger, shift_for
from banditroute.serve.config import RouterConfig

PRICES = {"cheap": 0.0001, "dear": 0.002}


def test_adjustment_is_a_logit_shift_of_the_requests_own_weight():
    cfg = PacerConfig(target=1.0, w_init=0.5)
    assert cost_weight_adjustment(PacerState(w_cost=0.5), cfg) == 0.0
    shift = cost_weight_adjustment(PacerState(w_cost=0.8), cfg)
    assert shift == pytest.approx(math.log(4.0))
    assert paced_w_cost(0.5, shift) == pytest.approx(0.8)
    assert paced_w_cost(0.2, 0.0) == 0.2
    assert paced_w_cost(0.2, shift) > 0.2 and paced_w_cost(0.2, -shift) < 0.2
    assert 0.0 <= paced_w_cost(1.0, 10.0) <= 1.0 and 0.0 <= paced_w_cost(0.0, -10.0) <= 1.0


def simulate(ledger: BudgetLedger, n: int, key: str | None = None, reported: float | None = None) -> list[float]:
    """A policy that picks 'dear' with probability (1 - paced w_cost)^2: the spend the ledger must hold."""
    import numpy as np

    rng = np.random.default_rng(0)
    spent = []
    for i in range(n):
        w = paced_w_cost(float(rng.uniform(0, 1)), shift_for(ledger.view(), key))
        model = "dear" if rng.random() < (1 - w) ** 2 else "cheap"
        ledger.report([(f"{key}{i}", model, key)], [] if reported is None else [(f"{key}{i}", reported * PRICES[model])])
        spent.append((reported or 1.0) * PRICES[model])
    return spent


@pytest.mark.parametrize("target", [0.5, 1.0, 1.5])
def test_global_target_is_held_within_ten_percent_over_the_second_half(target):
    ledger = BudgetLedger(BudgetConfig(target_usd_per_1k=target), PRICES.get)
    spent = simulate(ledger, 4000)
    second = sum(spent[2000:]) / 2000 * 1000
    assert abs(second / target - 1) < 0.10
    assert ledger.view()["global"]["target_usd_per_1k"] == target


def test_per_key_target_and_reported_costs_replace_prices():
    ledger = BudgetLedger(BudgetConfig(per_key_usd_per_1k={"k1": 0.5}), PRICES.get)
    spent = simulate(ledger, 3000, key="k1", reported=2.0)  # the upstream charges twice the listed price
    assert abs(sum(spent[1500:]) / 1500 * 1000 / 0.5 - 1) < 0.10
    assert "global" not in ledger.view() and shift_for(ledger.view(), "other") == 0.0


def test_a_cost_reported_before_its_decision_is_booked_once():
    ledger = BudgetLedger(BudgetConfig(target_usd_per_1k=1.0, window=1000), PRICES.get)
    ledger.report([], [("a", 0.01)])
    view = ledger.report([("a", "cheap", None)], [])
    assert view["global"]["spend_usd_per_1k"] == pytest.approx(10.0)  # 0.01 USD for 1 request: 10 USD per 1k
    ledger.report([("b", "dear", None)], [("b", 0.0)])  # reported free: the price is taken back
    assert ledger.view()["global"]["spend_usd_per_1k"] == pytest.approx(5.0)


@pytest.mark.parametrize("raw, field", [
    ({"target_usd_per_1k": -1}, "budget.target_usd_per_1k"),
    ({"target_usd_per_1k": float("nan")}, "budget.target_usd_per_1k"),
    ({"per_key_usd_per_1k": {"abc": 0}}, "budget.per_key_usd_per_1k.abc"),
    ({"prices": {"m": -0.1}}, "budget.prices.m"),
])
def test_bad_budget_config_names_the_field(raw, field):
    with pytest.raises((ValueError, ConfigError), match=field.replace(".", r"\.")):
        from_dict(RouterConfig, {"policy": "x", "budget": raw}, prefix="router").validate()


class FakeActor:
    def __init__(self, ledger):
        self.ledger, self.calls = ledger, 0

        class _Method:
            def __init__(inner):
                pass

            async def remote(inner, decisions, costs):
                self.calls += 1
                return self.ledger.report(decisions, costs)

        self.report = _Method()


def test_client_paces_with_the_last_view_and_reports_in_the_background():
    class Req:
        w_cost = 0.3

    async def main():
        ledger = BudgetLedger(BudgetConfig(target_usd_per_1k=0.1, window=10), PRICES.get)
        actor = FakeActor(ledger)
        client = BudgetClient(BudgetConfig(target_usd_per_1k=0.1, window=10, report_interval_s=0.01), "t", None, None,
                              actor_factory=lambda: actor)
        req = Req()
        assert client.pace_all([req], None) is None and req.w_cost == pytest.approx(0.3)  # no view yet: unchanged
        for i in range(50):
            client.spent([{"response": {"decision_id": str(i), "model": "dear"}}, {"error": {}}], None)
        await asyncio.sleep(0.1)
        assert actor.calls >= 1 and ledger.view()["global"]["requests"] == 50
        req2 = Req()
        client.pace_all([req2], None)
        assert req2.w_cost > 0.3  # over-spending: the cost weight went up
        client._task.cancel()

    asyncio.run(main())


def test_disabled_by_default_and_never_touches_requests():
    class Req:
        w_cost = 0.4

    client = BudgetClient(BudgetConfig(), "t", None, None, actor_factory=lambda: None)
    req = Req()
    assert not client.enabled and client.pace_all([req], "k") == "k" and req.w_cost == 0.4


FLOOR = 0.2
"""The synthetic policy's exploration floor on 'dear' (the share no cost weight removes from explore decisions)."""


def simulate_explore(config: BudgetConfig, n: int, seed: int = 0) -> tuple[list[float], BudgetClient, BudgetLedger]:
    """Explore traffic through the client and the ledger: an explore decision picks 'dear' with probability
    max(FLOOR, (1 - w)^2), a greedy one when (1 - w)^2 > 1/2. Its explore spend never goes below
    1000 * (0.2 * 0.002 + 0.8 * 0.0001) = 0.48 USD per 1k, whatever the cost weight."""
    import numpy as np

    class Req:
        def __init__(self, w):
            self.w_cost, self.mode = w, "explore"

    ledger = BudgetLedger(config, PRICES.get)
    client = BudgetClient(config, "t", None, None, actor_factory=lambda: None, rng_seed=seed)
    client._ensure_reporter = lambda: None  # no event loop here: the view is handed over by hand below
    rng = np.random.default_rng(seed)
    spent = []
    for start in range(0, n, 10):  # ten decisions per report: the view an ingress routes with lags behind
        reqs = [Req(float(rng.uniform(0, 1))) for _ in range(10)]
        client.pace_all(reqs, None)
        batch = []
        for i, req in enumerate(reqs):
            p_dear = (1 - req.w_cost) ** 2
            dear = p_dear > 0.5 if req.mode == "greedy" else rng.random() < max(FLOOR, p_dear)
            batch.append((f"{start + i}", "dear" if dear else "cheap", None))
            spent.append(PRICES[batch[-1][1]])
        client.view = ledger.report(batch, [])
    return spent, client, ledger


def test_a_target_below_the_exploration_floors_spend_is_held_by_deciding_some_requests_greedily():
    target = 0.4  # below the 0.48 USD per 1k that explore traffic costs at any cost weight
    spent, client, ledger = simulate_explore(BudgetConfig(target_usd_per_1k=target), 4000)
    assert abs(sum(spent[2000:]) / 2000 * 1000 / target - 1) < 0.10
    view = ledger.view()["global"]
    assert view["adjustment"] == pytest.approx(4.0) and 0.0 < view["greedy_fraction"] < 1.0
    assert not view["at_limit"] and client.greedy_decisions > 0


def test_without_the_greedy_lever_the_same_target_is_missed_and_the_view_says_so():
    spent, client, ledger = simulate_explore(BudgetConfig(target_usd_per_1k=0.4, max_greedy_fraction=0.0), 4000)
    assert sum(spent[2000:]) / 2000 * 1000 > 0.44  # the shift alone stays over the target (round 2's failure)
    view = ledger.view()["global"]
    assert view["at_limit"] and view["greedy_fraction"] == 0.0 and client.greedy_decisions == 0


def test_an_unreachable_target_saturates_every_lever_and_is_flagged():
    spent, client, ledger = simulate_explore(BudgetConfig(target_usd_per_1k=0.05), 3000)  # below the cheap model's 0.1
    view = ledger.view()["global"]
    assert view["at_limit"] and view["greedy_fraction"] == pytest.approx(1.0) and view["adjustment"] == pytest.approx(4.0)


def test_greedy_requests_and_unpaced_scopes_are_left_alone():
    from banditroute.serve.budget import greedy_share_for

    view = {"global": {"adjustment": 4.0, "greedy_fraction": 0.5}, "key:k": {"adjustment": 0.0, "greedy_fraction": 0.5}}
    assert greedy_share_for(view, None) == pytest.approx(0.5) and greedy_share_for(view, "k") == pytest.approx(0.75)
    assert greedy_share_for({}, "k") == 0.0

    class Req:
        def __init__(self, mode):
            self.w_cost, self.mode = 0.5, mode

    client = BudgetClient(BudgetConfig(target_usd_per_1k=1.0), "t", None, None, actor_factory=lambda: None, rng_seed=0)
    client._ensure_reporter = lambda: None
    client.view = {"global": {"adjustment": 0.0, "greedy_fraction": 1.0}}
    reqs = [Req("explore"), Req("greedy")]
    client.pace_all(reqs, None)
    assert [r.mode for r in reqs] == ["greedy", "greedy"] and client.greedy_decisions == 1


@pytest.mark.parametrize("raw, field", [
    ({"target_usd_per_1k": 1, "greedy_span": 0}, "budget.greedy_span"),
    ({"target_usd_per_1k": 1, "max_greedy_fraction": 1.5}, "budget.max_greedy_fraction"),
])
def test_bad_greedy_lever_config_names_the_field(raw, field):
    with pytest.raises((ValueError, ConfigError), match=field.replace(".", r"\.")):
        from_dict(RouterConfig, {"policy": "x", "budget": raw}, prefix="router").validate()
