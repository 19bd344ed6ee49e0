"""Bad input never crashes anything: property tests of every endpoint's parser, then a live fuzz over HTTP.

Parsers: any JSON value in -> a valid result, or the 4xx error type (RequestError /
TokenError) with a non-empty message and a field; never another exception. Live: a few hundred
malformed requests (banditroute.testkit.fuzzing, shared with bench/fuzz.py) -> 0 answers >= 500, every 4xx names
the problem, no replica restarted, and a normal request still succeeds.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from banditroute.serve.feedback_endpoint import parse_feedback_body
from banditroute.core.security import TOKEN_ERROR_KINDS, TokenError, sign, verify
from banditroute.serve.protocol import (
    RequestError,
    check_length,
    messages_to_text,
    parse_batch_body,
    parse_json_body,
    parse_route_body,
)

MODELS = ["big-model", "mid-model", "small-model"]
SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True)

KEYS = st.sampled_from(["prompt", "messages", "preference", "candidates", "mode", "prompts", "requests", "role", "content",
                        "text", "type", "quality", "cost", "decision_id", "score", "model", "stream", "x"])
SCALARS = st.none() | st.booleans() | st.integers(min_value=-(10**400), max_value=10**400) | \
    st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=20) | st.sampled_from(MODELS + ["explore", "greedy", "\ud800"])
JSON = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(KEYS | st.text(max_size=5), inner, max_size=5),
                    max_leaves=25)
# bodies shaped like the real ones, so the parsers get past the first check
ROUTE_LIKE = st.fixed_dictionaries({}, optional={"prompt": JSON, "messages": JSON | st.lists(st.dictionaries(KEYS, JSON, max_size=3), max_size=3),
                                                 "preference": JSON | st.dictionaries(st.sampled_from(["quality", "cost"]), SCALARS),
                                                 "candidates": JSON | st.lists(st.sampled_from(MODELS) | SCALARS, max_size=4),
                                                 "mode": JSON})
BATCH_LIKE = st.fixed_dictionaries({}, optional={"prompts": JSON | st.lists(st.text(max_size=10) | SCALARS, max_size=10),
                                                 "requests": JSON | st.lists(ROUTE_LIKE, max_size=4),
                                                 "preference": JSON, "candidates": JSON, "mode": JSON})
FEEDBACK_LIKE = st.fixed_dictionaries({}, optional={"decision_id": JSON, "score": SCALARS, "cost": SCALARS}) | JSON


def assert_client_error(exc: Exception) -> None:
    status = getattr(exc, "status", None)
    assert isinstance(status, int) and 400 <= status < 500, exc
    assert isinstance(exc.message, str) and exc.message.strip()
    assert isinstance(exc.field, str) and exc.field
    json.dumps({"message": exc.message, "field": exc.field}, ensure_ascii=False).encode("utf-8")  # the response can render it


def _route(body):
    return parse_route_body(body, models=MODELS, default_w_cost=0.3, default_mode="explore", max_prompt_chars=50)


@SETTINGS
@given(ROUTE_LIKE | JSON)
def test_route_body_parser(body):
    try:
        req = _route(body)
    except RequestError as exc:
        assert_client_error(exc)
        return
    assert isinstance(req.text, str) and req.text.strip() and len(req.text) <= 50
    assert 0.0 <= req.w_cost <= 1.0 and req.mode in ("explore", "greedy")
    assert req.candidates is None or (req.candidates and set(req.candidates) <= set(MODELS))


@SETTINGS
@given(BATCH_LIKE | JSON)
def test_batch_body_parser(body):
    try:
        reqs = parse_batch_body(body, models=MODELS, default_w_cost=0.3, default_mode="greedy", max_prompt_chars=50, max_batch_requests=6)
    except RequestError as exc:
        assert_client_error(exc)
        return
    assert 1 <= len(reqs) <= 6 and all(r.text.strip() for r in reqs)


@SETTINGS
@given(JSON | st.lists(st.dictionaries(KEYS, JSON, max_size=3), max_size=4))
def test_messages_to_text_and_chat_checks(messages):
    try:
        text = messages_to_text(messages)
        check_length(text, 50, "messages")
    except RequestError as exc:
        assert_client_error(exc)
        return
    assert isinstance(text, str) and text.strip() and len(text) <= 50


@SETTINGS
@given(FEEDBACK_LIKE)
def test_feedback_body_parser(body):
    try:
        reward = parse_feedback_body(body, max_cost_usd=10.0)
    except RequestError as exc:
        assert_client_error(exc)
        return
    assert reward.decision_id.strip() and 0.0 <= reward.score <= 1.0
    assert reward.cost is None or 0.0 <= reward.cost <= 10.0


@SETTINGS
@given(st.dictionaries(KEYS | st.sampled_from(["n", "max_tokens", "max_completion_tokens", "temperature", "functions"]) | st.text(max_size=5),
                       JSON, max_size=6))
def test_chat_forwarding_allow_list(body):
    from banditroute.serve.limits import LimitsConfig
    from banditroute.serve.openai_proxy import FORWARDED_FIELDS, forwarded_body

    limits = LimitsConfig(chat_max_tokens=64)
    try:
        out = forwarded_body(body, limits)
    except RequestError as exc:
        assert_client_error(exc)
        return
    assert set(out) <= set(FORWARDED_FIELDS)  # nothing else reaches the operator's upstream key
    assert any(1 <= (out.get(k) or 0) <= 64 for k in ("max_tokens", "max_completion_tokens"))
    assert out.get("n") in (None, 1)


@SETTINGS
@given(BATCH_LIKE | JSON, st.integers(1, 60))
def test_batch_text_cap(body, cap):
    try:
        reqs = parse_batch_body(body, models=MODELS, default_w_cost=0.3, default_mode="greedy", max_prompt_chars=50,
                                max_batch_requests=6, max_batch_chars=cap)
    except RequestError as exc:
        assert_client_error(exc)
        return
    assert sum(len(r.text) for r in reqs) <= cap


SECRET = "k" * 32


@SETTINGS
@given(JSON | st.text(max_size=200) | st.builds(lambda s, i, c: s[:i] + c + s[i + 1:],
                                                st.just(sign("d", "m", 1, 10**10, SECRET)), st.integers(0, 80), st.characters()))
def test_token_verify(token):
    try:
        claims = verify(token, [SECRET], now=1000.0)
    except TokenError as exc:
        assert exc.kind in TOKEN_ERROR_KINDS and exc.message
        return
    assert claims.decision_id == "d"  # only the genuine token (unchanged) verifies


@SETTINGS
@given(st.binary(max_size=200) | JSON.map(lambda v: json.dumps(v).encode()) |
       st.builds(lambda v, cut: json.dumps(v).encode()[:cut], JSON, st.integers(0, 50)))
def test_json_body_parser(raw):
    try:
        value = parse_json_body(raw)
    except RequestError as exc:
        assert_client_error(exc)
        assert exc.status == 400 and exc.field == "body"
        return
    # what it accepts is plain, finite, encodable JSON
    json.dumps(value, allow_nan=False, ensure_ascii=False).encode("utf-8")


def test_json_body_parser_edges():
    for raw in (b"NaN", b'{"a": Infinity}', b"1e999", b"9" * 5000, b'"\\ud800"', b"[" * 100_000, b'{"a": "\xff"}',
                '"\\ud800"'.encode("utf-16")):
        with pytest.raises(RequestError) as info:
            parse_json_body(raw)
        assert info.value.status == 400 and info.value.field == "body", raw[:20]
    assert parse_json_body(b'{"p": "\\ud83d\\ude00"}') == {"p": "\U0001F600"}  # a valid surrogate pair is fine


# --- live fuzz ------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def secured(serve_http_port, tmp_path_factory):
    from banditroute.testkit.fuzzing import deploy_secured_app

    app = deploy_secured_app(tmp_path_factory.mktemp("fuzz"), serve_http_port, "fuzz-test")
    yield app
    app["cleanup"]()


@pytest.mark.ray
def test_live_fuzz_no_5xx_no_crash(secured):
    from ray import serve

    from banditroute.testkit.fuzzing import KEYS, FuzzContext, generate, replica_ids, route_tokens, run

    base = secured["base"]
    prompts = list(secured["data"].prompts)
    before = replica_ids(base)
    secret = os.environ["BANDITROUTE_TOKEN_SECRET"]
    ctx = FuzzContext(tokens=route_tokens(base, prompts, 16), prompts=prompts,
                      sign=lambda d, m, v, exp: sign(d, m, v, exp, secret))
    requests = list(generate(random.Random(7), 400, ctx))
    assert len({r.kind for r in requests}) >= 15 and len({r.path for r in requests}) >= 10  # the mix covers it all
    report = asyncio.run(run(base, requests, concurrency=12))
    summary = report.to_json()
    assert report.requests == 400 and not report.transport_errors, summary
    assert not report.server_errors, [e["body"] for e in report.server_errors]
    assert not report.no_message and not report.no_field, summary["examples"]
    assert {401, 404, 405, 409, 410, 413, 422} <= set(report.by_status), summary["by_status"]
    assert report.by_kind["bounds"] and report.by_kind["docs"]  # the request bounds were tried too

    assert replica_ids(base) == before  # the same Router and ingress replicas answer: none restarted
    app = serve.status().applications[secured["app_name"]]
    assert app.status == "RUNNING" and all(d.status == "HEALTHY" for d in app.deployments.values())
    import httpx

    r = httpx.post(base + "/v1/route", json={"prompt": prompts[0]}, headers={"x-api-key": KEYS["route"]}, timeout=30, trust_env=False)
    assert r.status_code == 200 and r.json()["decision_id"].startswith("br1.")
    assert verify(r.json()["decision_id"], [secret], time.time()).model == r.json()["model"]
