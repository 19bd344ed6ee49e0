"""Tenant budgets (issue 16, round 3): a tenant's ``budget_usd_per_1k`` is the ``tenant:<name>`` scope of the budget ledger."""

from __future__ import annotations

import asyncio
import os
import secrets

import numpy as np
import pytest

from banditroute.cluster.config import app_config_from_dict
from banditroute.core.config import ConfigError
from banditroute.policy.pacer import paced_w_cost
from banditroute.serve.budget import BudgetClient, BudgetConfig, BudgetLedger, shift_for
from banditroute.serve.caller import set_caller
from banditroute.serve.tenants import TenantConfig, with_tenant_budgets

PRICES = {"cheap": 0.0001, "dear": 0.002}


def test_tenant_budget_is_configured_validated_and_becomes_a_scope():
    app = app_config_from_dict({"router": {"policy": "ckpt"},
                                "tenants": [{"name": "acme", "api_keys_env": "K", "budget_usd_per_1k": 0.4}]})
    assert app.router.tenants[0].budget_usd_per_1k == 0.4
    for bad in (0, -1.0, float("inf"), True):
        with pytest.raises(ConfigError, match=r"tenants\[0\].budget_usd_per_1k"):
            app_config_from_dict({"router": {"policy": "ckpt"}, "tenants": [{"name": "a", "api_keys_env": "K", "budget_usd_per_1k": bad}]})
    merged = with_tenant_budgets(BudgetConfig(per_tenant_usd_per_1k={"old": 1.0}),
                                 [TenantConfig("acme", api_keys_env="K", budget_usd_per_1k=0.4), TenantConfig("free", api_keys_env="F")])
    assert merged.enabled and merged.per_tenant_usd_per_1k == {"old": 1.0, "acme": 0.4}
    plain = BudgetConfig()
    assert with_tenant_budgets(plain, [TenantConfig("free", api_keys_env="F")]) is plain and not plain.enabled
    with pytest.raises(ValueError, match=r"budget\.per_tenant_usd_per_1k\.acme"):
        BudgetConfig(per_tenant_usd_per_1k={"acme": 0.0}).validate()
    assert set(BudgetLedger(merged, PRICES.get).view()) == {"tenant:old", "tenant:acme"}


def test_a_tenant_target_is_held_and_other_traffic_is_not_paced_by_it():
    """Two tenants share one ledger; only acme has a target: acme's spend converges to it, beta's is untouched."""
    ledger = BudgetLedger(BudgetConfig(per_tenant_usd_per_1k={"acme": 0.5}), PRICES.get)
    rng = np.random.default_rng(0)
    spent: dict[str, list[float]] = {"acme": [], "beta": []}
    for i in range(6000):
        tenant = "acme" if i % 2 == 0 else "beta"
        shift = shift_for(ledger.view(), None, tenant)
        if tenant == "beta":
            assert shift == 0.0
        w = paced_w_cost(float(rng.uniform(0, 1)), shift)
        model = "dear" if rng.random() < (1 - w) ** 2 else "cheap"
        ledger.report([(f"d{i}", model, None, tenant)], [])
        spent[tenant].append(PRICES[model])
    acme_late = sum(spent["acme"][1500:]) / 1500 * 1000
    beta_late = sum(spent["beta"][1500:]) / 1500 * 1000
    assert abs(acme_late / 0.5 - 1) < 0.10, acme_late
    unpaced = 1000 * (PRICES["dear"] / 3 + PRICES["cheap"] * 2 / 3)  # E[(1 - U)^2] = 1/3: 'dear' a third of the time
    assert abs(beta_late / unpaced - 1) < 0.10, (beta_late, unpaced)  # beta is not held to acme's target
    view = ledger.view()
    assert view["tenant:acme"]["requests"] == 3000 and "global" not in view


def test_key_and_tenant_scopes_add_up_and_three_tuples_still_book():
    ledger = BudgetLedger(BudgetConfig(per_key_usd_per_1k={"k1": 1.0}, per_tenant_usd_per_1k={"acme": 1.0}, window=1), PRICES.get)
    ledger.report([("a", "dear", "k1", "acme"), ("b", "dear", "k1")], [])  # a 3-tuple: no tenant
    view = ledger.view()
    assert view["key:k1"]["requests"] == 2 and view["tenant:acme"]["requests"] == 1
    both = shift_for(view, "k1", "acme")
    assert both == pytest.approx(view["key:k1"]["adjustment"] + view["tenant:acme"]["adjustment"]) and both > 0
    ledger.report([], [("a", 0.0)])  # the upstream reported acme's decision free: taken back from both its scopes
    assert ledger.view()["tenant:acme"]["spend_usd_per_1k"] == pytest.approx(0.0)


class FakeActor:
    def __init__(self, ledger: BudgetLedger):
        self.ledger = ledger

        class _Report:
            async def remote(_, decisions, costs):
                return ledger.report(decisions, costs)

        self.report = _Report()


class FakeDecider:
    """Stands in for the deciding replica: records the w_cost each request arrives with."""

    def __init__(self, models):
        self.models, self.seen = models, []

    async def info(self):
        return {"models": self.models}

    async def route(self, req):
        self.seen.append((req.tenant, req.w_cost))
        return {"response": {"decision_id": f"d{len(self.seen)}", "model": "dear", "probability": 1.0, "policy_version": 1}}

    async def route_many(self, reqs):
        return [await self.route(r) for r in reqs]


def test_ingress_paces_a_tenants_requests_by_its_scope_and_books_them_under_it(tmp_path, monkeypatch):
    """RouterIngress end to end (no Ray: its class, a fake decider): acme's requests are paced by tenant:acme and
    booked there; a request under a key of no tenant is neither."""
    from banditroute.serve.ingress import RouterIngress
    from banditroute.serve.testing import write_fixture

    monkeypatch.setenv("ACME_TEST_KEYS", "acme-key-1")
    monkeypatch.setenv("BANDITROUTE_TOKEN_SECRET", os.environ.get("BANDITROUTE_TOKEN_SECRET") or secrets.token_urlsafe(32))
    policy_path, _ = write_fixture(tmp_path, n=16)
    config = {"policy": str(policy_path), "app_name": "tenant-budget", "decision_sink": "local", "torch_threads": 1,
              "decision_sink_options": {"path": str(tmp_path / "decisions")},
              "tenants": [{"name": "acme", "api_keys_env": "ACME_TEST_KEYS", "budget_usd_per_1k": 0.1}],
              "budget": {"prices": PRICES, "window": 10, "report_interval_s": 60}}
    ingress_class = RouterIngress.func_or_class.__mro__[1]  # the user class under Serve's ASGI wrapper

    async def main():
        ingress = ingress_class(None, None, config)
        ingress.router.close()
        ledger = BudgetLedger(ingress.budget.config, PRICES.get)
        ingress.budget._factory = lambda: FakeActor(ledger)
        ingress.router = decider = FakeDecider(["cheap", "dear"])
        try:
            set_caller("route", {"x-api-key": "acme-key-1"})
            for i in range(30):
                await ingress.handle_route({"prompt": f"q{i}", "preference": {"quality": 0.5, "cost": 0.5}})
            await ingress.budget.report_once()  # acme spent 2 USD per 1k against 0.1: its scope pushes w_cost up
            await ingress.handle_route({"prompt": "paced", "preference": {"quality": 0.5, "cost": 0.5}})
            await ingress.handle_route_batch({"requests": [{"prompt": "b1"}], "preference": {"quality": 0.5, "cost": 0.5}})
            set_caller("route", {})
            await ingress.handle_route({"prompt": "no tenant", "preference": {"quality": 0.5, "cost": 0.5}})
            await ingress.budget.report_once()
        finally:
            ingress.budget._task.cancel()
        return decider.seen, ledger.view()

    seen, view = asyncio.run(main())
    assert [t for t, _ in seen] == ["acme"] * 32 + [""]
    assert seen[0][1] == pytest.approx(0.5)  # no view yet: unpaced
    assert seen[30][1] > 0.5 and seen[31][1] > 0.5  # /v1/route and /v1/route/batch paced by tenant:acme
    assert seen[32][1] == pytest.approx(0.5)  # no tenant: no tenant scope
    assert view["tenant:acme"]["requests"] == 32 and view["tenant:acme"]["adjustment"] > 0
