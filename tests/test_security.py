"""Signed decision tokens, API keys, body limits: the pure functions, then the live app over HTTP."""

from __future__ import annotations

import os
import time
import uuid

import httpx
import pytest

from banditroute.core.config import ConfigError, from_dict
from banditroute.serve.feedback_endpoint import ack_to_http, parse_feedback_body
from banditroute.serve.protocol import RequestError
from banditroute.core.security import (
    Security,
    SecurityConfig,
    TokenError,
    api_key_id,
    check_open_bind,
    ensure_local_secret,
    secret_problem,
    key_matches,
    presented_key,
    sign,
    verify,
)

SECRET = "s3cr3t-0123456789-abcdefghij-XYZ!"
OTHER = "0th3r-9876543210-jihgfedcba-ZYX?"


def kind_of(token, secrets=(SECRET,), now=1000.0) -> str:
    with pytest.raises(TokenError) as info:
        verify(token, list(secrets), now)
    assert info.value.message
    return info.value.kind


def test_token_round_trip_binds_id_model_version_expiry():
    token = sign("abc123", "big-model", 7, 2000.4, SECRET)
    assert token.startswith("br1.") and all(c.isalnum() or c in "-_." for c in token)  # URL-safe, opaque
    claims = verify(token, [SECRET], now=1000.0)
    assert (claims.decision_id, claims.model, claims.policy_version, claims.expires_at) == ("abc123", "big-model", 7, 2001)
    # rotation: a token signed with the previous secret still verifies while it is listed
    assert verify(sign("x", "m", 1, 2000, OTHER), [SECRET, OTHER], 1000.0).decision_id == "x"


def test_every_changed_character_is_rejected():
    token = sign("abc123", "big-model", 7, 2000, SECRET)
    for i in range(len(token)):
        for c in "A_0.":
            if c != token[i]:
                changed = token[:i] + c + token[i + 1:]
                assert kind_of(changed) in ("tampered", "malformed", "unsigned"), (i, c)
    assert kind_of(token + "=") in ("tampered", "malformed")


def test_unsigned_malformed_tampered_expired_wrong_secret():
    assert kind_of(str(uuid.uuid4())) == "unsigned"
    assert kind_of(None) == "unsigned" and kind_of(12) == "unsigned"
    for bad in ("br1.", "br1..", "br1.a.b.c", "br1.é.x", "br1." + "A" * 5000 + ".x"):
        assert kind_of(bad) == "malformed", bad
    assert kind_of(sign("a", "m", 1, 2000, OTHER)) == "tampered"  # another server's secret
    assert kind_of(sign("a", "m", 1, 999, SECRET)) == "expired"
    assert kind_of(sign("a", "m", 1, 1000, SECRET)) == "expired"  # expiry is exclusive
    # the signature is checked first: an expired token with a wrong MAC is "tampered"
    assert kind_of(sign("a", "m", 1, 999, OTHER)) == "tampered"


def test_api_keys_and_security_from_env():
    assert presented_key("Bearer k1", None) == "k1" and presented_key("bearer   k1 ", None) == "k1"
    assert presented_key("Basic xyz", "k2") == "k2" and presented_key(None, None) is None and presented_key("Bearer ", " ") is None
    assert key_matches("k1", ("k0", "k1")) and not key_matches("k1x", ("k1",)) and not key_matches(None, ("k1",))
    env = {"SECRET": f"{SECRET},{OTHER}", "RK": "r1, r2", "AK": "a1"}
    sec = Security(SecurityConfig(token_secret_env="SECRET", route_api_keys_env="RK", admin_api_keys_env="AK"), env)
    assert sec.check_key("route", "Bearer r2", None) is None and sec.check_key("route", None, "r1") is None
    assert sec.check_key("route", None, None) == "missing_key" and sec.check_key("route", "Bearer r3", None) == "wrong_key"
    assert sec.check_key("feedback", None, None) is None  # not configured: open
    assert sec.check_key("admin", "Bearer a1", None) is None and sec.check_key("admin", None, "r1") == "wrong_key"
    assert Security(SecurityConfig(token_secret_env="SECRET"), env).check_key("admin", "Bearer a1", None) == "disabled"
    token = sec.token("raw-id", "m", 3, now=1000.0)
    assert sec.verify(token, 1000.0 + 86_399).decision_id == "raw-id"
    assert verify(token, [SECRET], 1000.0).model == "m"  # the FIRST secret signs

    with pytest.raises(ValueError, match="security.token_secret_env"):
        Security(SecurityConfig(token_secret_env="MISSING"), env)
    with pytest.raises(ValueError, match="32 random bytes"):
        Security(SecurityConfig(token_secret_env="S"), {"S": "short"})
    with pytest.raises(ValueError, match="security.feedback_api_keys_env"):
        Security(SecurityConfig(token_secret_env="SECRET", feedback_api_keys_env="NOPE"), env)
    trusted = Security(SecurityConfig(require_signed_tokens=False), {})
    assert trusted.token("raw", "m", 1, 0.0) == "raw" and not trusted.signing

    fresh: dict[str, str] = {}
    assert ensure_local_secret(SecurityConfig(), fresh) and len(fresh["BANDITROUTE_TOKEN_SECRET"]) >= 32
    assert not ensure_local_secret(SecurityConfig(), fresh)  # an existing secret is kept


def test_secrets_must_be_32_random_bytes():
    for weak in ("a" * 16, "a" * 31, "a" * 64, "ab" * 20, "test-secret-"):
        assert secret_problem(weak), weak
        with pytest.raises(ValueError, match="security.token_secret_env: secret #1"):
            Security(SecurityConfig(token_secret_env="S"), {"S": f"{SECRET},{weak}"})
    assert secret_problem(SECRET) is None and secret_problem("漢字" * 6)  # 36 bytes of UTF-8, but 2 distinct characters
    fresh: dict[str, str] = {}
    ensure_local_secret(SecurityConfig(), fresh)  # what `banditroute serve`/`up` generate passes
    assert secret_problem(fresh["BANDITROUTE_TOKEN_SECRET"]) is None
    assert secret_problem("test-secret-" + "0123456789abcdef" * 2) is None  # tests/conftest.py's form


def test_tokens_bind_the_route_key_that_routed():
    env = {"SECRET": SECRET, "RK": "route-a,route-b,shared", "FK": "grader,shared"}
    sec = Security(SecurityConfig(token_secret_env="SECRET", route_api_keys_env="RK", feedback_api_keys_env="FK"), env)
    kid = sec.routing_key_id("Bearer route-a", None)
    assert kid == api_key_id("route-a") and "route-a" not in kid and len(kid) == 16
    claims = sec.verify(sec.token("d1", "m", 2, 1000.0, kid), 1000.0)
    assert claims.key_id == kid and claims.decision_id == "d1"
    assert sec.check_token_key(claims, None, "route-a") is None  # the key that routed it
    assert sec.check_token_key(claims, "Bearer grader", None) is None  # a dedicated feedback key (a grader service)
    for other in ("route-b", "shared", None):  # another client's key (shared is a route key too), or none
        assert sec.check_token_key(claims, None, other) == "wrong_key", other
    # keyless routing binds nothing: the token is accepted from anyone (and keeps the 4-claim form)
    keyless = Security(SecurityConfig(token_secret_env="SECRET"), env)
    assert keyless.routing_key_id("Bearer whatever", None) == ""
    legacy = sign("d2", "m", 1, 2000, SECRET)
    assert verify(legacy, [SECRET], 1000.0).key_id == "" and keyless.check_token_key(verify(legacy, [SECRET], 1000.0), None, None) is None
    assert len(sign("d2", "m", 1, 2000, SECRET, kid)) > len(legacy)


def test_non_loopback_bind_with_open_keys_is_refused_unless_forced():
    for host in ("127.0.0.1", "localhost", "::1", "127.0.1.1"):
        check_open_bind(host, SecurityConfig())
    with pytest.raises(ValueError, match="router.host.*route and feedback.*--allow-open"):
        check_open_bind("0.0.0.0", SecurityConfig())
    with pytest.raises(ValueError, match="feedback"):
        check_open_bind("10.0.0.5", SecurityConfig(route_api_keys_env="RK"))
    check_open_bind("0.0.0.0", SecurityConfig(route_api_keys_env="RK", feedback_api_keys_env="FK"))
    check_open_bind("0.0.0.0", SecurityConfig(allow_open_bind=True))


def test_serve_flag_allow_open_and_the_refusal(tmp_path):
    import argparse

    from banditroute.cli.commands import serve as serve_cmd

    parser = argparse.ArgumentParser()
    serve_cmd.add_arguments(parser)
    assert "router.security.allow_open_bind" not in serve_cmd.overrides_from_flags(parser.parse_args([]))
    assert serve_cmd.overrides_from_flags(parser.parse_args(["--allow-open"]))["router.security.allow_open_bind"] is True
    from banditroute.cli import main

    assert main(["serve", "--frozen", "--policy", str(tmp_path), "--host", "0.0.0.0", "--storage", str(tmp_path / "s")]) != 0


def test_config_validation_names_the_field():
    for bad, name in (({"token_ttl_s": 0}, "security.token_ttl_s"), ({"max_body_bytes": 10}, "security.max_body_bytes"),
                      ({"max_reward_cost_usd": -1}, "security.max_reward_cost_usd"), ({"route_api_keys_env": " "}, "security.route_api_keys_env")):
        with pytest.raises(ValueError, match=name):
            from_dict(SecurityConfig, bad)
    with pytest.raises(ConfigError, match="security.nope"):
        from banditroute.serve.config import RouterConfig

        from_dict(RouterConfig, {"policy": "x", "security": {"nope": 1}})


def test_reward_values_are_validated_and_replays_are_409():
    assert parse_feedback_body({"decision_id": "d", "score": 1, "cost": 10}, max_cost_usd=10.0).cost == 10.0
    for body, field in (({"decision_id": "d", "score": 1, "cost": 10.5}, "cost"), ({"decision_id": "d", "score": 10**400}, "score"),
                        ({"decision_id": "d", "score": 0.5, "cost": 10**400}, "cost")):
        with pytest.raises(RequestError) as info:
            parse_feedback_body(body, max_cost_usd=10.0)
        assert info.value.status == 422 and info.value.field == field
    status, body, _ = ack_to_http({"status": "duplicate", "decision_id": "t"})
    assert status == 409 and body["status"] == "duplicate" and body["error"]["field"] == "decision_id" and body["error"]["message"]


def test_one_error_envelope_for_every_http_error():
    import pickle

    from banditroute.serve.protocol import RETRY_AFTER, error_body, router_error

    assert error_body(422, "bad", "score") == {"error": {"message": "bad", "field": "score", "type": "invalid_request_error"}}
    assert error_body(503, "down")["error"] == {"message": "down", "field": None, "type": "unavailable"}
    assert error_body(401, "no key", "authorization", "authentication_error")["error"]["type"] == "authentication_error"
    err = RequestError(503, None, "learner restarting", headers=RETRY_AFTER)
    assert err.to_json() == error_body(503, "learner restarting") and err.headers == {"Retry-After": "1"}
    copy = pickle.loads(pickle.dumps(RequestError(502, None, "upstream", type_="upstream_error", headers={"x": "y"})))
    assert (copy.status, copy.field, copy.message, copy.type, copy.headers) == (502, None, "upstream", "upstream_error", {"x": "y"})
    routed = router_error({"status": 422, "field": "candidates", "message": "unknown model"})
    assert (routed.status, routed.field, routed.message) == (422, "candidates", "unknown model")
    # the feedback actor's answers use the same envelope
    status, body, headers = ack_to_http({"status": "unavailable", "decision_id": "d", "error": "event log down"})
    assert status == 503 and headers == {"Retry-After": "1"}  # the details stay in the log (generic 5xx bodies)
    assert body["error"]["type"] == "unavailable" and "incident" in body["error"]["message"] and "event log" not in body["error"]["message"]
    status, body, _ = ack_to_http({"status": "invalid", "decision_id": "d", "field": "score", "error": "score: NaN"})
    assert status == 422 and body == error_body(422, "score: NaN", "score")


# --- live, over HTTP ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def secured(serve_http_port, tmp_path_factory):
    from banditroute.testkit.fuzzing import deploy_secured_app

    app = deploy_secured_app(tmp_path_factory.mktemp("secured"), serve_http_port, "secured-test",
                             limits={"rate_limit_per_s": 1.0, "rate_limit_burst": 60})
    yield app
    app["cleanup"]()


def _client(base: str, key: str | None = None) -> httpx.Client:
    return httpx.Client(base_url=base, timeout=30, trust_env=False, headers={"x-api-key": key} if key else {})


@pytest.mark.ray
def test_live_api_keys_body_limit_and_token_rejections(secured):
    from banditroute.testkit.fuzzing import KEYS, MAX_BODY_BYTES

    base = secured["base"]
    prompt = secured["data"].prompts[0]
    with _client(base) as anon:
        assert anon.get("/healthz").status_code == 200  # open
        for method, path, body in (("POST", "/v1/route", {"prompt": prompt}), ("POST", "/v1/route/batch", {"prompts": [prompt]}),
                                   ("POST", "/v1/chat/completions", {"model": "banditroute", "messages": []}), ("GET", "/v1/models", None),
                                   ("POST", "/v1/feedback", {"decision_id": "x", "score": 1}), ("GET", "/v1/admin/security", None)):
            r = anon.request(method, path, json=body)
            assert r.status_code == 401 and r.headers["www-authenticate"].startswith("Bearer"), (path, r.text)
            assert r.json()["error"]["field"] == "authorization" and "missing" in r.json()["error"]["message"]
        # a key of another group is wrong for this one
        r = anon.post("/v1/route", json={"prompt": prompt}, headers={"authorization": f"Bearer {KEYS['feedback']}"})
        assert r.status_code == 401 and "not valid" in r.json()["error"]["message"]

    with _client(base, KEYS["route"]) as client, _client(base, KEYS["feedback"]) as fb, _client(base, KEYS["admin"]) as admin:
        before = admin.get("/v1/admin/security").json()["rejections"]
        assert before.get("route_missing_key", 0) >= 4 and before.get("route_wrong_key", 0) >= 1

        out = client.post("/v1/route", json={"prompt": prompt, "mode": "greedy"}).json()
        token = out["decision_id"]
        assert token.startswith("br1.") and verify(token, [os.environ["BANDITROUTE_TOKEN_SECRET"]], time.time()).model == out["model"]
        assert client.get("/v1/models", headers={"authorization": "Bearer route-key-2"}).status_code == 200  # the second route key

        # body limits: a declared Content-Length over the limit, and a chunked body without one
        big = b'{"prompt": "' + b"a" * MAX_BODY_BYTES + b'"}'
        r = client.post("/v1/route", content=big, headers={"content-type": "application/json"})
        assert r.status_code == 413 and r.json()["error"]["field"] == "body"
        r = client.post("/v1/route", content=iter([big[:40_000], big[40_000:]]), headers={"content-type": "application/json"})
        assert r.status_code == 413 and r.json()["error"]["field"] == "body"

        secret = os.environ["BANDITROUTE_TOKEN_SECRET"]
        head, mac = token.rsplit(".", 1)
        cases = [
            (str(uuid.uuid4()), 401, "token_unsigned"),
            (head + "." + ("A" if mac[0] != "A" else "B") + mac[1:], 401, "token_tampered"),
            (sign(uuid.uuid4().hex, "big-model", 0, time.time() + 60, "x" * 32), 401, "token_tampered"),
            ("br1.not-a-token", 401, "token_malformed"),
            (sign(uuid.uuid4().hex, "big-model", 0, time.time() - 1, secret), 410, "token_expired"),
        ]
        for bad, status, _ in cases:
            r = fb.post("/v1/feedback", json={"decision_id": bad, "score": 0.5})
            assert r.status_code == status and r.json()["error"]["field"] == "decision_id" and r.json()["error"]["message"], r.text
        r = fb.post("/v1/feedback", json={"decision_id": token, "score": 0.5, "cost": 11.0})  # over max_reward_cost_usd
        assert r.status_code == 422 and r.json()["error"]["field"] == "cost"

        first = fb.post("/v1/feedback", json={"decision_id": token, "score": 0.5, "cost": 0.01})
        assert first.status_code == 200 and first.json()["status"] == "accepted" and first.json()["decision_id"] == token, first.text
        replay = fb.post("/v1/feedback", json={"decision_id": token, "score": 1.0})
        assert replay.status_code == 409 and replay.json()["status"] == "duplicate" and replay.json()["error"]["field"] == "decision_id"

        after = admin.get("/v1/admin/security").json()
        counts = after["rejections"]
        for reason, n in (("token_unsigned", 1), ("token_tampered", 2), ("token_malformed", 1), ("token_expired", 1),
                          ("token_replayed", 1), ("body_too_large", 2)):
            assert counts.get(reason, 0) - before.get(reason, 0) == n, (reason, counts, before)
        assert after["api_keys"] == {"route": "2 key(s)", "feedback": "2 key(s)", "admin": "1 key(s)"} and after["signed_tokens"]


@pytest.mark.ray
def test_live_request_bounds_key_binding_docs_and_rate_limit(secured):
    from banditroute.testkit.fuzzing import KEYS

    base, prompt = secured["base"], secured["data"].prompts[2]
    with _client(base, KEYS["route"]) as client, _client(base, KEYS["feedback"]) as fb:
        token = client.post("/v1/route", json={"prompt": prompt}).json()["decision_id"]
        assert verify(token, [os.environ["BANDITROUTE_TOKEN_SECRET"]], time.time()).key_id == api_key_id(KEYS["route"])
        # feedback's own 16 KiB limit, well under the route limit (64 KiB in this app)
        r = fb.post("/v1/feedback", json={"decision_id": token, "score": 0.5, "pad": "z" * 20_000})
        assert r.status_code == 413 and r.json()["error"]["field"] == "body" and "feedback_max_body_bytes" in r.json()["error"]["message"]
        # a dedicated feedback key (a grader) may reward any route key's decision
        assert fb.post("/v1/feedback", json={"decision_id": token, "score": 0.5}).status_code == 200
        # route-key-2 may also post feedback, but only for decisions it routed: not route-key-1's
        other_token = client.post("/v1/route", json={"prompt": prompt}).json()["decision_id"]
        with _client(base, "route-key-2") as other:
            r = other.post("/v1/feedback", json={"decision_id": other_token, "score": 0.5})
            assert r.status_code == 403 and r.json()["error"]["field"] == "decision_id", r.text
            own = other.post("/v1/route", json={"prompt": prompt}).json()["decision_id"]
            assert other.post("/v1/feedback", json={"decision_id": own, "score": 0.5}).status_code == 200
        for path in ("/docs", "/redoc", "/openapi.json"):  # off by default
            r = client.get(path)
            assert r.status_code == 404 and r.json()["error"]["field"] == "path", path
        chat = {"model": "banditroute", "messages": [{"role": "user", "content": prompt}]}
        for extra, field in (({"n": 3}, "n"), ({"max_tokens": 10**6}, "max_tokens"), ({"functions": []}, "functions")):
            r = client.post("/v1/chat/completions", json=dict(chat, **extra))
            assert r.status_code == 422 and r.json()["error"]["field"] == field, r.text
        r = client.post("/v1/route/batch", json={"prompts": ["w " * 2_500] * 8})  # 40,000 characters > max_batch_chars
        assert r.status_code == 413 and r.json()["error"]["field"] == "prompts"
    with _client(base, "route-key-2") as other:  # burst 60, 1/s: a burst of 75 quick calls is throttled
        statuses = [other.get("/v1/models") for _ in range(75)]
        limited = [r for r in statuses if r.status_code == 429]
        assert limited and all(r.status_code in (200, 429) for r in statuses)
        assert int(limited[0].headers["retry-after"]) >= 1 and limited[0].json()["error"]["field"] == "authorization"
    with _client(base, KEYS["route"]) as client:
        assert client.get("/v1/models").status_code == 200  # another key is not affected


@pytest.mark.ray
def test_python_api_gives_signed_tokens(secured):
    from ray import serve

    from banditroute.serve.client import RouterClient

    secret = [os.environ["BANDITROUTE_TOKEN_SECRET"]]
    client = RouterClient(secured["app_name"])
    out = client.route_sync(secured["data"].prompts[1], mode="greedy")
    assert verify(out["decision_id"], secret, time.time()).model == out["model"]
    import asyncio

    batch = asyncio.run(client.route_batch(["a", "b", "c"]))
    assert all(verify(b["decision_id"], secret, time.time()).model == b["model"] for b in batch)
    handle_out = serve.get_app_handle(secured["app_name"]).handle_route.remote({"prompt": "via the ingress"}).result()
    assert verify(handle_out["decision_id"], secret, time.time()).decision_id
