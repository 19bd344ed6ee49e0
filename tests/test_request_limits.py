"""Bounded requests (issue 14 item 6): body limits per endpoint group, JSON parsed off the event loop, the
character clip before tokenizing, the text cap per batch call, the chat field allow-list, the per-key
rate limit, generic 5xx bodies. Pure functions, no cluster."""

from __future__ import annotations

import asyncio
import json

import pytest
from banditroute.core.config import from_dict
from banditroute.core.security import SecurityConfig
from banditroute.serve.body import parse_json_off_loop, read_body
from banditroute.serve.feedback_endpoint import ack_to_http
from banditroute.serve.limits import LimitsConfig
from banditroute.serve.openai_proxy import forwarded_body
from banditroute.serve.protocol import (
    RequestError,
    parse_batch_body,
    parse_json_body,
    public_error,
)
from banditroute.serve.rate_limit import (
    KeyedRateLimiter,
    TokenBucket,
    retry_after_header,
)


async def _chunks(data: bytes, size: int = 4096):
    for i in range(0, len(data), size):
        yield data[i:i + size]


def _read(data: bytes, group: str, declared: bool = True) -> bytes:
    limit, name = SecurityConfig().body_limit(group)
    headers = {"content-length": str(len(data))} if declared else {}
    return asyncio.run(read_body(headers, _chunks(data), limit, name))


def test_body_limits_per_endpoint_group():
    cfg = SecurityConfig()
    assert cfg.body_limit("route") == (8 * 1024 * 1024, "security.max_body_bytes")  # route/chat keep today's limit
    assert cfg.body_limit("feedback") == (16 * 1024, "security.feedback_max_body_bytes")
    assert cfg.body_limit("admin") == (16 * 1024, "security.admin_max_body_bytes")
    body = json.dumps({"decision_id": "x", "score": 1, "pad": "a" * 20_000}).encode()
    assert _read(body, "route") == body
    for group in ("feedback", "admin"):
        for declared in (True, False):  # a Content-Length over the limit is refused unread; a chunked body while reading
            with pytest.raises(RequestError) as info:
                _read(body, group, declared)
            assert info.value.status == 413 and info.value.field == "body"
            assert f"security.{group}_max_body_bytes" in info.value.message
    with pytest.raises(ValueError, match="security.feedback_max_body_bytes"):
        from_dict(SecurityConfig, {"feedback_max_body_bytes": 10})


def test_large_json_is_parsed_off_the_event_loop_and_stays_strict():
    # 100k objects with numbers: the C scanner holds the GIL throughout unless it calls back into Python
    raw = json.dumps({"requests": [{"prompt": "ab", "preference": {"quality": 1, "cost": 0.5}}] * 100_000}).encode()

    async def ticks_during_parse(thread_min_bytes: int) -> int:
        """How many times another coroutine ran while the body was parsed (0 = the event loop was blocked)."""
        ticks, parsing, stop = [0], [False], asyncio.Event()

        async def ticker():
            while not stop.is_set():
                await asyncio.sleep(0)
                if parsing[0]:
                    ticks[0] += 1

        task = asyncio.create_task(ticker())
        await asyncio.sleep(0.01)
        parsing[0] = True
        value = await parse_json_off_loop(raw, thread_min_bytes)
        parsing[0] = False
        stop.set()
        await task
        assert value == json.loads(raw)
        return ticks[0]

    # Counts, not times (speed belongs in bench/): inline, no other coroutine runs during the parse;
    # off the loop, other requests get turns while it runs, however loaded the box is.
    assert asyncio.run(ticks_during_parse(len(raw) + 1)) == 0
    assert asyncio.run(ticks_during_parse(64 * 1024)) >= 3
    for bad in (b"NaN", b'{"a": 1e999}', b'"\\ud800"', b'{"a": "\xff"}', b"[" * 100_000):  # same strictness in the thread
        with pytest.raises(RequestError) as info:
            asyncio.run(parse_json_off_loop(bad + b" " * 70_000, 64 * 1024))
        assert info.value.status == 400 and info.value.field == "body"
    assert parse_json_body(b'{"a": [1, 2.5, {"b": null}], "a": 3}', yielding=True) == {"a": 3}  # last duplicate wins, as json.loads


def test_batch_total_characters_cap():
    kwargs = dict(models=["m"], default_w_cost=0.3, default_mode="greedy", max_prompt_chars=10_000, max_batch_requests=10)
    assert len(parse_batch_body({"prompts": ["x" * 5000] * 4}, max_batch_chars=20_000, **kwargs)) == 4
    for key, items in (("prompts", ["x" * 5000] * 5), ("requests", [{"prompt": "x" * 5000}] * 5)):
        with pytest.raises(RequestError) as info:
            parse_batch_body({key: items}, max_batch_chars=20_000, **kwargs)
        assert info.value.status == 413 and info.value.field == key and "limits.max_batch_chars" in info.value.message


def test_chat_fields_are_allow_listed_and_capped():
    limits = LimitsConfig(chat_max_tokens=100)
    chat = {"model": "banditroute", "messages": [{"role": "user", "content": "hi"}], "temperature": 0.2, "preference": {"cost": 1}}
    assert forwarded_body(chat, limits) == {"model": "banditroute", "messages": chat["messages"], "temperature": 0.2, "max_tokens": 100}
    assert forwarded_body(dict(chat, max_completion_tokens=50, n=1), limits)["max_completion_tokens"] == 50
    assert "max_tokens" not in forwarded_body(dict(chat, max_completion_tokens=50), limits)
    for extra, field in (({"n": 2}, "n"), ({"n": True}, "n"), ({"max_tokens": 101}, "max_tokens"), ({"max_tokens": 0}, "max_tokens"),
                         ({"max_completion_tokens": "9"}, "max_completion_tokens"), ({"functions": []}, "functions"),
                         ({"": 1}, "<empty key>")):
        with pytest.raises(RequestError) as info:
            forwarded_body(dict(chat, **extra), limits)
        assert info.value.status == 422 and info.value.field == field, extra
    assert forwarded_body(dict(chat, store=True), LimitsConfig(chat_extra_fields=["store"]))["store"] is True


def test_token_bucket_and_keyed_rate_limiter():
    clock = [100.0]
    limiter = KeyedRateLimiter(rate_per_s=2.0, burst=3, max_keys=2, clock=lambda: clock[0])
    assert [limiter.check("a") for _ in range(3)] == [0.0, 0.0, 0.0]  # the burst
    assert limiter.check("a") == pytest.approx(0.5)  # one token comes back after 1/rate seconds
    assert limiter.check("b") == 0.0  # keys are independent
    clock[0] += 0.5
    assert limiter.check("a") == 0.0 and limiter.check("a") == pytest.approx(0.5)
    clock[0] += 100.0  # refills up to the burst, never beyond
    assert [limiter.check("a") for _ in range(4)][-1] > 0
    limiter.check("c")  # a third key: the least recently used ("b") is dropped
    assert len(limiter) == 2
    clock[0] -= 50.0  # a clock that steps back never refills
    bucket = TokenBucket(0.0, 10.0)
    assert bucket.take(5.0, 1.0, 3.0) == pytest.approx(1.0) and bucket.tokens == 0.0
    off = KeyedRateLimiter(rate_per_s=0.0, burst=1)
    assert not off.enabled and all(off.check("k") == 0.0 for _ in range(100)) and len(off) == 0
    assert retry_after_header(0.2) == {"Retry-After": "1"} and retry_after_header(2.1) == {"Retry-After": "3"}
    with pytest.raises(ValueError, match="limits.rate_limit_per_s"):
        LimitsConfig(rate_limit_per_s=float("nan")).validate()


def test_5xx_bodies_are_generic():
    internal = RequestError(503, None, "the feedback actor is unavailable: RayActorError: actor feedback@banditroute s3://bkt/x")
    shown = public_error(internal, "abc123")
    assert shown.status == 503 and "s3://" not in shown.message and "actor" not in shown.message and "abc123" in shown.message
    upstream = RequestError(502, None, "upstream for 'm' answered 500", type_="upstream_error", public=True)
    assert public_error(upstream, "x") is upstream  # written for clients
    client = RequestError(422, "score", "score must be in [0, 1]")
    assert public_error(client, "x") is client
    status, body, headers = ack_to_http({"status": "unavailable", "error": "s3://bucket/events: ConnectionRefused"})
    assert status == 503 and "s3://" not in body["error"]["message"] and "incident" in body["error"]["message"] and headers
    status, body, _ = ack_to_http({"status": "unavailable", "error": "event buffer full (9 events waiting for storage; limit 8)"})
    assert status == 503 and body["error"]["message"].startswith("event buffer full")


@pytest.fixture(scope="module")
def minilm():
    from banditroute.policy.encoders import EncoderConfig, make_encoder

    return make_encoder(EncoderConfig(name="minilm", device="cpu"))


def test_long_text_without_whitespace_tokenizes_like_an_ordinary_prompt(minilm, monkeypatch):
    from banditroute.serve.tokens import PromptTokenizer

    tokenizer = PromptTokenizer(minilm)
    window = " ".join(["The quick brown fox jumps over the lazy dog, then weighs its options."] * 25)[-1536:]
    seen_chars: list[int] = []
    real_tokenize = minilm.tokenize

    def counting_tokenize(texts):  # what reaches the tokenizer is what costs time (CJK: a token per character)
        seen_chars.append(max(len(t) for t in texts))
        return real_tokenize(texts)

    monkeypatch.setattr(minilm, "tokenize", counting_tokenize)

    def tokenized_chars(texts) -> int:
        seen_chars.clear()
        batch = tokenizer.tokenize(texts)
        assert bool((batch["attention_mask"].sum(dim=1) == minilm.max_tokens).all())  # the window is full
        return max(seen_chars)

    assert tokenized_chars([window] * 64) == len(window)  # an ordinary prompt is tokenized whole
    for text in ("漢字" * 50_000, "x-" * 50_000):  # 100,000 characters, no whitespace
        assert len(text) == 100_000
        # Sizes, not times (speed is bench/'s): at most 2 characters per window token reach the tokenizer
        # (was 6: 1,536 CJK characters = 1,536 tokens, 15x an ordinary prompt's work).
        assert tokenized_chars([text] * 64) <= 2 * minilm.max_tokens, text[:4]
        clipped = tokenizer.tokenize([text])["input_ids"][0]
        assert clipped.tolist() == minilm.tokenize([text])["input_ids"][0].tolist()  # the ids the encoder keeps anyway
    assert tokenizer.clip_fallbacks == 0
