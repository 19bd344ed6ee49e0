"""The client retry policy: what is retried, how long it waits, what counts as already recorded."""

from __future__ import annotations

import asyncio
import random

import httpx
import pytest

from banditroute.serve.http_client import RequestFailed, RetryPolicy, RouterClient, parse_retry_after


def test_backoff_grows_is_capped_jittered_and_honours_retry_after():
    policy = RetryPolicy(backoff_s=0.1, multiplier=2.0, max_backoff_s=1.0, jitter=0.0)
    assert [policy.delay(n) for n in range(6)] == pytest.approx([0.1, 0.2, 0.4, 0.8, 1.0, 1.0])
    assert policy.delay(0, retry_after_s=3.0) == 3.0  # the server's hint wins when longer
    assert RetryPolicy(max_retry_after_s=5.0, jitter=0.0).delay(0, retry_after_s=600) == 5.0
    jittered = RetryPolicy(backoff_s=1.0, jitter=0.5)
    waits = [jittered.delay(0, rng=random.Random(i)) for i in range(50)]
    assert all(0.5 <= w <= 1.0 for w in waits) and len(set(waits)) > 40
    assert parse_retry_after("2") == 2.0 and parse_retry_after(None) is None and parse_retry_after("soon") is None
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT", now=1445412470.0) == pytest.approx(10.0)
    assert [s for s in (400, 404, 409, 422, 500, 502, 503, 504) if RetryPolicy.retryable_status(s)] == [502, 503, 504]
    with pytest.raises(ValueError, match="retry.attempts"):
        RetryPolicy(attempts=0).validate()


def scripted(answers):
    """A transport answering the scripted responses in order (an Exception instance is raised)."""
    seen = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request.url.path)
        answer = answers[len(seen) - 1]
        if isinstance(answer, Exception):
            raise answer
        status, body, headers = answer
        return httpx.Response(status, json=body, headers=headers)

    return httpx.MockTransport(handler), seen


def client_for(transport) -> RouterClient:
    http = httpx.AsyncClient(base_url="http://router", transport=transport)
    return RouterClient("http://router", RetryPolicy(backoff_s=0.001, max_backoff_s=0.002), client=http, seed=0)


def test_connection_errors_and_503_are_retried_until_success():
    transport, seen = scripted([
        httpx.ConnectError("refused"),
        (503, {"error": {"message": "event buffer full"}}, {"Retry-After": "0"}),
        (502, {}, {}),
        (200, {"decision_id": "d1", "model": "a"}, {}),
    ])

    async def go():
        client = client_for(transport)
        out = await client.route({"prompt": "hi"})
        return out, client

    out, client = asyncio.run(go())
    assert out["decision_id"] == "d1" and len(seen) == 4 and client.retries == 3 and client.failures == 0


def test_4xx_is_never_retried_and_retries_are_bounded():
    transport, seen = scripted([(422, {"error": {"field": "score"}}, {})])
    with pytest.raises(RequestFailed) as err:
        asyncio.run(client_for(transport).feedback("d1", 2.0))
    assert err.value.status == 422 and len(seen) == 1

    transport, seen = scripted([(503, {}, {})] * 10)
    with pytest.raises(RequestFailed, match="gave up after 10 attempts"):
        asyncio.run(client_for(transport).route({"prompt": "hi"}))
    assert len(seen) == 10


@pytest.mark.parametrize("answer", [
    (200, {"status": "duplicate", "decision_id": "d1"}, {}),
    (409, {"status": "duplicate", "error": {"message": "duplicate: a reward was already accepted"}}, {}),
])
def test_a_replayed_reward_is_already_recorded_not_a_failure(answer):
    transport, _ = scripted([httpx.ReadTimeout("lost answer"), answer])
    outcome = asyncio.run(client_for(transport).feedback("d1", 1.0))
    assert outcome.status == "duplicate" and outcome.recorded and outcome.attempts == 2
