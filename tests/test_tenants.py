"""Tenants (issue 16): API key -> tenant, default preference, allow-list (narrow yes, widen 403), rate limit, logging."""

from __future__ import annotations

import pytest

from banditroute.cluster.config import app_config_from_dict
from banditroute.core.config import ConfigError
from banditroute.core.security import api_key_id
from banditroute.policy.reward import preference_to_w_cost
from banditroute.serve.caller import set_caller
from banditroute.serve.core import RouterCore, decision_batch
from banditroute.core.records import decisions_from_table
from banditroute.serve.protocol import RequestError, RouteRequest, parse_batch_body
from banditroute.serve.tenants import TenantConfig, TenantTable, apply_tenant, apply_tenant_batch, caller_tenant, preference_given
from banditroute.serve.testing import hashing_policy

POOL = ["big-model", "mid-model", "small-model"]
ACME = TenantConfig("acme", api_keys_env="ACME_KEYS", preference={"quality": 0.2, "cost": 0.8},
                    models=["mid-model", "small-model"], rate_limit_per_s=1.0, rate_limit_burst=2)
BETA = TenantConfig("beta", api_key_ids=[api_key_id("beta-route-key")])
ENV = {"ACME_KEYS": "acme-key-1, acme-key-2"}


def table(clock=None) -> TenantTable:
    return TenantTable([ACME, BETA], environ=ENV, **({"clock": clock} if clock else {}))


def test_the_key_names_the_tenant_and_its_own_keys_are_admitted():
    t = table()
    assert t.for_key("Bearer acme-key-2", None).name == "acme" and t.for_key(None, "acme-key-1").own_keys
    beta = t.for_key("Bearer beta-route-key", None)
    assert beta.name == "beta" and not beta.own_keys  # an id of a route key: the route group admits it, not the tenant
    assert t.for_key("Bearer someone-else", None) is None and t.for_key(None, None) is None
    assert t.admits("route", None, "acme-key-1") and t.admits("feedback", None, "acme-key-1")
    assert not t.admits("admin", None, "acme-key-1") and not t.admits("route", "Bearer beta-route-key", None)
    with pytest.raises(ValueError, match=r"tenants\[0\].api_keys_env.*ACME_KEYS"):
        TenantTable([ACME], environ={})
    with pytest.raises(ValueError, match="already belongs to tenant 'acme'"):
        TenantTable([ACME, TenantConfig("copy", api_keys_env="ACME_KEYS")], environ=ENV)


def test_defaults_apply_and_requests_narrow_but_never_widen_the_allow_list():
    acme = table().for_key(None, "acme-key-1")
    req = apply_tenant(RouteRequest("q", 0.5), acme, POOL, preference_given({"prompt": "q"}))
    assert req.tenant == "acme" and req.candidates == ["mid-model", "small-model"]
    assert req.w_cost == pytest.approx(preference_to_w_cost(0.2, 0.8))
    given = apply_tenant(RouteRequest("q", 0.1, ["small-model"]), acme, POOL, preference_given({"preference": {"cost": 1}}))
    assert given.w_cost == 0.1 and given.candidates == ["small-model"]  # the request's own preference and narrowing stand
    with pytest.raises(RequestError) as err:
        apply_tenant(RouteRequest("q", 0.1, ["small-model", "big-model"]), acme, POOL, True)
    assert err.value.status == 403 and err.value.field == "candidates" and "big-model" in err.value.message
    with pytest.raises(RequestError) as err:  # shadow mode naming a model outside the allow-list
        apply_tenant(RouteRequest("q", 0.1, shadow_model="big-model"), acme, POOL, True)
    assert err.value.status == 403 and err.value.field == "model"
    # a batch names the item's field
    body = {"requests": [{"prompt": "a"}, {"prompt": "b", "candidates": ["big-model"]}]}
    reqs = parse_batch_body(body, models=POOL, default_w_cost=0.3, default_mode="explore", max_prompt_chars=100, max_batch_requests=8)
    with pytest.raises(RequestError) as err:
        apply_tenant_batch(reqs, body, acme, POOL)
    assert err.value.status == 403 and err.value.field == "requests[1].candidates"
    # no tenant: the request is untouched
    plain = apply_tenant(RouteRequest("q", 0.5), None, POOL, False)
    assert plain.tenant == "" and plain.candidates is None


def test_tenant_comes_from_the_key_of_the_caller_and_only_in_cluster_callers_may_name_one():
    t = table()
    set_caller("route", {"authorization": "Bearer acme-key-1"})
    assert caller_tenant(t).name == "acme"
    assert t.resolve(caller_tenant(t), "beta").name == "acme"  # a claimed tenant never overrides the key's
    set_caller("route", {})
    assert caller_tenant(t) is None and t.resolve(None, "beta").name == "beta" and t.resolve(None, "") is None
    with pytest.raises(RequestError) as err:
        t.resolve(None, "nobody")
    assert err.value.status == 422 and err.value.field == "tenant"


def test_a_tenant_rate_limit_is_one_bucket_for_all_its_keys():
    now = [0.0]
    t = table(clock=lambda: now[0])
    k1, k2 = t.for_key(None, "acme-key-1"), t.for_key(None, "acme-key-2")
    assert t.check_rate(k1) and t.check_rate(k2)  # burst 2, shared
    with pytest.raises(RequestError) as err:
        t.check_rate(k1)
    assert err.value.status == 429 and err.value.headers["Retry-After"] == "1" and "acme" in err.value.message
    now[0] += 1.0
    assert t.check_rate(k2)
    assert t.check_rate(t.for_key("Bearer beta-route-key", None)) is False  # no own limit: the per-key limit applies
    assert t.check_rate(None) is False


def test_tenants_section_loads_into_the_router_and_is_validated():
    app = app_config_from_dict({"router": {"policy": "ckpt"},
                                "tenants": [{"name": "acme", "api_keys_env": "ACME_KEYS", "models": ["mid-model"],
                                             "preference": {"quality": 1.0}, "rate_limit_per_s": 5}]})
    assert app.router.tenants == app.tenants and app.router.tenants[0].models == ["mid-model"]
    for bad, match in (({"name": "a"}, r"tenants\[0\]: give api_keys_env"),
                       ({"name": "a", "api_key_ids": ["xyz"]}, r"tenants\[0\].api_key_ids\[0\]"),
                       ({"name": "a", "api_keys_env": "K", "preference": {"speed": 1}}, r"tenants\[0\].preference"),
                       ({"name": "a", "api_keys_env": "K", "models": []}, r"tenants\[0\].models"),
                       ({"name": "a", "api_keys_env": "K", "rate_limit_per_s": 0}, r"tenants\[0\].rate_limit_per_s")):
        with pytest.raises(ConfigError, match=match):
            app_config_from_dict({"router": {"policy": "ckpt"}, "tenants": [bad]})
    with pytest.raises(ConfigError, match="duplicate tenant"):
        app_config_from_dict({"router": {"policy": "ckpt"}, "tenants": [{"name": "a", "api_keys_env": "K"}] * 2})


def test_the_decision_log_carries_the_tenant_and_routes_within_the_allow_list():
    core = RouterCore(hashing_policy(tuple(POOL), seed=3), seed=0)
    acme = table().for_key(None, "acme-key-1")
    reqs = [apply_tenant(RouteRequest(f"prompt {i}", 0.3), acme, POOL, False) for i in range(50)]
    res = core.route_batch(reqs + [RouteRequest("no tenant", 0.3)])
    assert all(r.decision.tenant == "acme" and r.model in ("mid-model", "small-model") for r in res[:-1])
    assert res[-1].decision.tenant == ""
    back = decisions_from_table(decision_batch(res))
    assert [d.tenant for d in back] == ["acme"] * 50 + [""]


# --- live, over HTTP ---------------------------------------------------------------------------------------------------


@pytest.mark.ray
def test_live_tenant_key_defaults_allow_list_and_decision_log(serve_http_port, tmp_path):
    """route-key-2 belongs to tenant 'acme' (by key id): its allow-list, 403 on widening, the tenant in the log."""
    import time

    import httpx
    from ray import serve

    from banditroute.cluster.app import build_app
    from banditroute.serve.decision_sinks import read_decision_log
    from banditroute.serve.testing import write_fixture
    from banditroute.testkit.fuzzing import KEY_ENVS

    policy_path, _ = write_fixture(tmp_path, n=16)
    log_dir = tmp_path / "decisions"
    router = {"policy": str(policy_path), "app_name": "tenants-test", "num_replicas": 1, "num_cpus": 0.1, "num_gpus": 0.0,
              "placement": "inline", "torch_threads": 1, "port": serve_http_port, "decision_sink": "local",
              "decision_sink_options": {"path": str(log_dir)}, "security": {"route_api_keys_env": KEY_ENVS["route"],
                                                                          "require_signed_tokens": False},
              "tenants": [{"name": "acme", "api_key_ids": [api_key_id("route-key-2")], "models": ["mid-model", "small-model"],
                           "rate_limit_per_s": 0.5, "rate_limit_burst": 12}]}
    serve.run(build_app({"router": router}), name="tenants-test", route_prefix="/")
    base = f"http://127.0.0.1:{serve_http_port}"
    try:
        with httpx.Client(base_url=base, timeout=30, trust_env=False, headers={"x-api-key": "route-key-2"}) as acme, \
                httpx.Client(base_url=base, timeout=30, trust_env=False, headers={"x-api-key": "route-key-1"}) as plain:
            deadline = time.time() + 120
            while plain.get("/healthz").status_code != 200 and time.time() < deadline:
                time.sleep(0.2)
            models = {acme.post("/v1/route", json={"prompt": f"q {i}", "tenant": "other"}).json()["model"] for i in range(6)}
            assert models <= {"mid-model", "small-model"}
            r = acme.post("/v1/route", json={"prompt": "q", "candidates": ["small-model"]})
            assert r.status_code == 200 and r.json()["model"] == "small-model"
            r = acme.post("/v1/route", json={"prompt": "q", "candidates": ["big-model", "small-model"]})
            assert r.status_code == 403 and r.json()["error"]["field"] == "candidates"
            r = acme.post("/v1/route/batch", json={"requests": [{"prompt": "a"}, {"prompt": "b", "candidates": ["big-model"]}]})
            assert r.status_code == 403 and r.json()["error"]["field"] == "requests[1].candidates"
            assert plain.post("/v1/route", json={"prompt": "q", "candidates": ["big-model"]}).json()["model"] == "big-model"
            statuses = [acme.get("/v1/models").status_code for _ in range(8)]  # burst 12 shared by the tenant, 0.5/s
            assert 429 in statuses and plain.get("/v1/models").status_code == 200
        rows = read_decision_log(log_dir).to_pylist()
        tenants = [row["tenant"] for row in rows]
        assert tenants.count("acme") == 7 and tenants.count("") == 1  # the body's "tenant": "other" is ignored
    finally:
        serve.delete("tenants-test")
