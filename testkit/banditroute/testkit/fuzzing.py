"""Malformed-request generator and runner for the live fuzz (tests/test_fuzz.py and bench/fuzz.py share it).

``generate(rng, n, ctx)`` yields requests against every endpoint: random JSON
values, valid bodies with one field broken (wrong type, huge, empty, unknown
key), invalid UTF-8, wrong content types, truncated JSON, NaN/huge numbers,
deep nesting, oversized bodies, missing/garbage API keys, unsigned /
tampered / expired / replayed decision tokens, unknown paths and wrong
methods. ``run(base_url, requests)`` sends them over real HTTP and checks the
contract: no status >= 500, and every 4xx is ``{"error": {"message", "field"}}``
(an upstream's own 4xx passed through by chat completions is exempt from
``field``). ``deploy_secured_app`` deploys the app they run against: API keys
on every group, a small body limit, the replay upstream, a feedback actor.
Nothing here imports Ray at module level.
"""

from __future__ import annotations

import asyncio
import json
import random
import string
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

# Env var NAMES holding the test keys (tests/conftest.py and bench/fuzz.py put them in the replicas' env).
KEY_ENVS = {"route": "BANDITROUTE_TEST_ROUTE_KEYS", "feedback": "BANDITROUTE_TEST_FEEDBACK_KEYS", "admin": "BANDITROUTE_TEST_ADMIN_KEYS"}
KEYS = {"route": "route-key-1", "feedback": "feedback-key-1", "admin": "admin-key-1"}
KEY_VALUES = {"BANDITROUTE_TEST_ROUTE_KEYS": "route-key-1,route-key-2", "BANDITROUTE_TEST_FEEDBACK_KEYS": "feedback-key-1,route-key-2",
              "BANDITROUTE_TEST_ADMIN_KEYS": "admin-key-1"}
MAX_BODY_BYTES = 64 * 1024
FEEDBACK_MAX_BODY_BYTES = 16 * 1024
MAX_BATCH_CHARS = 30_000
CHAT_MAX_TOKENS = 512
MODELS = ("big-model", "mid-model", "small-model")

ENDPOINTS = {  # path -> (method, key group or None)
    "/v1/route": ("POST", "route"),
    "/v1/route/batch": ("POST", "route"),
    "/v1/chat/completions": ("POST", "route"),
    "/v1/feedback": ("POST", "feedback"),
    "/v1/models": ("GET", "route"),
    "/v1/admin/security": ("GET", "admin"),
    "/healthz": ("GET", None),
}


@dataclass
class FuzzRequest:
    method: str
    path: str
    kind: str
    content: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)


@dataclass
class FuzzContext:
    """What the generator needs from the live app: valid tokens and a way to mint expired/foreign ones."""

    tokens: list[str]
    """Valid decision tokens (routed beforehand); reused ones are replays."""
    sign: Callable[[str, str, int, float], str]
    """sign(decision_id, model, policy_version, expires_at) with the app's secret."""
    prompts: list[str]
    """Prompts the replay upstream knows."""


# --- random values ---------------------------------------------------------------------------------------------


def _text(rng: random.Random, max_len: int = 24) -> str:
    alphabet = string.printable + "éß漢字🙂\u0000\u200b\ud800\udfff"
    return "".join(rng.choice(alphabet) for _ in range(rng.randint(0, max_len)))


def random_json(rng: random.Random, depth: int = 3) -> Any:
    """Any JSON value (strings may hold lone surrogates; json.dumps escapes them as \\udXXX)."""
    choice = rng.randint(0, 9 if depth > 0 else 6)
    if choice == 0:
        return None
    if choice == 1:
        return rng.choice([True, False])
    if choice == 2:
        return rng.choice([0, -1, 1, 2**63, -(2**64), 10**30, rng.randint(-1000, 1000)])
    if choice == 3:
        return rng.choice([0.5, -0.0, 1e308, -1e308, 5e-324, 1.0000001, rng.uniform(-10, 10)])
    if choice in (4, 5, 6):
        return _text(rng)
    if choice in (7, 8):
        return [random_json(rng, depth - 1) for _ in range(rng.randint(0, 4))]
    keys = ["prompt", "messages", "preference", "candidates", "mode", "model", "stream", "decision_id", "score", "cost",
            "prompts", "requests", "role", "content", "quality", "text", "type"]
    return {rng.choice(keys) if rng.random() < 0.7 else _text(rng, 8): random_json(rng, depth - 1) for _ in range(rng.randint(0, 4))}


def _valid_body(rng: random.Random, path: str, ctx: FuzzContext) -> dict[str, Any]:
    prompt = rng.choice(ctx.prompts)
    if path == "/v1/route":
        return {"prompt": prompt, "preference": {"quality": 0.7, "cost": 0.3}, "candidates": list(MODELS[:2]), "mode": "greedy"}
    if path == "/v1/route/batch":
        return rng.choice([{"prompts": [prompt, "second"]}, {"requests": [{"prompt": prompt}, {"messages": [{"role": "user", "content": "x"}]}]}])
    if path == "/v1/chat/completions":
        return {"model": "banditroute", "messages": [{"role": "user", "content": prompt}], "candidates": [rng.choice(MODELS)]}
    if path == "/v1/feedback":
        return {"decision_id": rng.choice(ctx.tokens), "score": 0.5, "cost": 0.001}
    return {}


def _break_field(rng: random.Random, body: dict[str, Any]) -> dict[str, Any]:
    """One field of a valid body made wrong (type, size, emptiness), or an unknown key added."""
    body = json.loads(json.dumps(body))
    target = body
    # sometimes descend into a nested container (messages[0], requests[0], preference)
    for key in ("messages", "requests", "preference"):
        if key in body and rng.random() < 0.4:
            inner = body[key]
            target = inner[0] if isinstance(inner, list) and inner and isinstance(inner[0], dict) else inner if isinstance(inner, dict) else body
            break
    if not target or rng.random() < 0.15:
        target[_text(rng, 10) or "extra"] = random_json(rng, 1)
        return body
    key = rng.choice(list(target))
    target[key] = rng.choice([
        None, 7, -1, 1.5, 1e308, True, "", " ", "x" * rng.randint(1, 3000), [], {}, [None], [1, 2], {"a": 1},
        random_json(rng, 2), "\ud800", float(rng.choice([-1e-9, 1.0000001, 2.0])), 10**25,
    ])
    return body


def _deep(depth: int, rng: random.Random) -> bytes:
    opener, closer = rng.choice([(b"[", b"]"), (b'{"a":', b"}")])
    return opener * depth + b"1" + closer * depth


def _over_a_bound(rng: random.Random, ctx: FuzzContext) -> tuple[str, str, bytes]:
    """(path, method, body) of a request past one of the request bounds (413 or 422 expected)."""
    prompt = rng.choice(ctx.prompts)
    choice = rng.randint(0, 5)
    if choice == 0:  # a feedback body over its 16 KiB (under the route limit)
        body = {"decision_id": rng.choice(ctx.tokens), "score": 0.5, "pad": "z" * (FEEDBACK_MAX_BODY_BYTES + rng.randint(1, 20_000))}
        return "/v1/feedback", "POST", json.dumps(body).encode()
    if choice == 1:  # a batch whose prompts together exceed limits.max_batch_chars
        return "/v1/route/batch", "POST", json.dumps({"prompts": ["w " * 2_500] * 8}).encode()
    chat = {"model": "banditroute", "messages": [{"role": "user", "content": prompt}]}
    if choice == 2:
        chat["n"] = rng.choice([2, 5, 100, 0, -1, "2", 1.5])
    elif choice == 3:
        chat[rng.choice(["max_tokens", "max_completion_tokens"])] = rng.choice([CHAT_MAX_TOKENS + 1, 10**6, 0, "many", True])
    elif choice == 4:
        chat[rng.choice(["logit_bias_x", "functions", "store", "metadata", "prediction"])] = {"a": 1}
    else:  # a big route body, parsed off the event loop (valid JSON; the prompt itself is over max_prompt_chars)
        return "/v1/route", "POST", json.dumps({"prompt": "p" * 30_000, "preference": {"quality": 0.5, "cost": 0.5}}).encode()
    return "/v1/chat/completions", "POST", json.dumps(chat).encode()


# --- the generator ----------------------------------------------------------------------------------------------


def generate(rng: random.Random, n: int, ctx: FuzzContext) -> Iterator[FuzzRequest]:
    """``n`` malformed (and a few valid) requests; the mix covers every endpoint and every way listed above."""
    paths = list(ENDPOINTS)
    posts = [p for p in paths if ENDPOINTS[p][0] == "POST"]
    kinds = ["random_json", "broken_field", "broken_field", "invalid_utf8", "content_type", "truncated", "nonfinite",
             "deep", "oversized", "auth", "token", "token", "path", "method", "valid", "huge_value", "empty",
             "bounds", "docs"]
    for _ in range(n):
        kind = rng.choice(kinds)
        path = rng.choice(posts) if kind not in ("auth", "path", "method") else rng.choice(paths)
        if kind == "token":
            path = "/v1/feedback"
        method, group = ENDPOINTS[path]
        headers = {"content-type": "application/json"}
        if group is not None:
            headers[rng.choice(["authorization", "x-api-key"])] = KEYS[group]
            if headers.get("authorization"):
                headers["authorization"] = "Bearer " + KEYS[group]
        valid = _valid_body(rng, path, ctx)
        content = json.dumps(valid).encode()
        if kind == "random_json":
            content = json.dumps(random_json(rng, 4)).encode()
        elif kind == "broken_field":
            content = json.dumps(_break_field(rng, valid)).encode()
        elif kind == "invalid_utf8":
            pos = rng.randint(0, len(content))
            content = content[:pos] + rng.choice([b"\xff", b"\xc3\x28", b"\xed\xa0\x80", b"\x80\x80", b"\xf0\x28\x8c"]) + content[pos:]
        elif kind == "content_type":
            headers["content-type"] = rng.choice(["text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x",
                                                  "application/xml", "", "application/json; charset=latin-1"])
            if rng.random() < 0.5:
                content = rng.choice([b"prompt=hello&mode=greedy", b"<xml>1</xml>", b"--x\r\nContent-Disposition: form-data\r\n\r\nhi\r\n--x--"])
        elif kind == "truncated":
            content = content[: rng.randint(0, max(0, len(content) - 1))]
        elif kind == "nonfinite":
            key = rng.choice(list(valid) or ["score"])
            token = rng.choice([b"NaN", b"Infinity", b"-Infinity", b"1e999", b"-1e400", b"9" * 5000])
            content = json.dumps(dict(valid, **{key: "@@"})).encode().replace(b'"@@"', token)
        elif kind == "deep":
            content = _deep(rng.choice([50, 900, 1100, 5000, 20000]), rng)
        elif kind == "oversized":
            content = b'{"prompt": "' + b"a" * (MAX_BODY_BYTES + rng.randint(1, 100_000)) + b'"}'
        elif kind == "huge_value":
            key = rng.choice(list(valid) or ["prompt"])
            content = json.dumps(dict(valid, **{key: rng.choice(["y" * 60_000, list(range(6000)), {str(i): i for i in range(3000)}])})).encode()
        elif kind == "bounds":  # the per-request bounds: group body limits, batch text, chat forwarding caps
            path, method, content = _over_a_bound(rng, ctx)
            headers = {"content-type": "application/json", "x-api-key": KEYS[ENDPOINTS[path][1]]}
        elif kind == "docs":
            path, method, content = rng.choice(["/docs", "/redoc", "/openapi.json"]), "GET", b""
        elif kind == "empty":
            content = rng.choice([b"", b" ", b"null", b"{}", b"[]", b'""', b"0"])
        elif kind == "auth":
            headers.pop("authorization", None)
            headers.pop("x-api-key", None)
            choice = rng.randint(0, 5)
            if choice == 1:
                headers["authorization"] = "Bearer " + "".join(rng.choice(string.ascii_letters) for _ in range(rng.randint(1, 40)))
            elif choice == 2:
                headers["authorization"] = rng.choice(["Basic dXNlcjpwYXNz", "Bearer", "bearer route-key-1 x", "BEARER", "Token abc"])
            elif choice == 3:
                headers["x-api-key"] = rng.choice(["-", "route-key-1x", "ROUTE-KEY-1", "feedback-key-1" if group != "feedback" else "admin-key-1"])
            elif choice == 4:
                headers["authorization"] = "Bearer " + "k" * 5000
            # choice 0/5: no key at all
        elif kind == "token":
            token = rng.choice(ctx.tokens)
            head, mac = token.rsplit(".", 1)
            variant = rng.randint(0, 7)
            if variant == 0:
                bad = str(uuid.uuid4())  # unsigned raw id
            elif variant == 1:  # one character of the token changed
                i = rng.randrange(len(token))
                bad = token[:i] + rng.choice([c for c in "ABCxyz019-_" if c != token[i]]) + token[i + 1:]
            elif variant == 2:
                bad = ctx.sign(str(uuid.uuid4()), "big-model", 0, time.time() - rng.uniform(1, 1e6))  # expired
            elif variant == 3:
                bad = head + "." + mac[::-1]
            elif variant == 4:
                bad = rng.choice(["br1.", "br1..", "br1.a.b.c", "br1.%%%.xx", "br1." + "A" * 5000 + ".x", "br1.é.ß"])
            elif variant == 5:
                bad = token  # replayed (or first use)
            elif variant == 6:
                bad = ctx.sign(str(uuid.uuid4()), "big-model", 0, time.time() + 3600)  # authentic, never routed: 404
            else:
                bad = token + "="
            content = json.dumps({"decision_id": bad, "score": rng.choice([0.0, 0.5, 1.0])}).encode()
        elif kind == "path":
            path = rng.choice(["/", "/v1", "/v1/route/", "/v1/routes", "/v1/admin", "/v1/admin/nope", "/v2/route", "/%2e%2e/etc",
                               "/v1/feedback/" + "x" * 100, "/docs/../v1/route"])
            method = rng.choice(["GET", "POST"])
        elif kind == "method":
            method = rng.choice(["PUT", "DELETE", "PATCH", "GET" if method == "POST" else "POST"])
        if method == "GET" and kind not in ("auth", "method"):
            content = b""
        yield FuzzRequest(method=method, path=path, kind=kind, content=content, headers=headers)


# --- running and checking ------------------------------------------------------------------------------------------


@dataclass
class FuzzReport:
    requests: int = 0
    by_status: Counter = field(default_factory=Counter)
    by_kind: Counter = field(default_factory=Counter)
    server_errors: list[dict[str, Any]] = field(default_factory=list)
    """Every response >= 500 (method, path, kind, status, body head)."""
    no_message: list[dict[str, Any]] = field(default_factory=list)
    """4xx answers without error.message."""
    no_field: list[dict[str, Any]] = field(default_factory=list)
    """4xx answers of ours without error.field."""
    transport_errors: list[str] = field(default_factory=list)
    duration_s: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return {
            "requests": self.requests, "by_status": {str(k): v for k, v in sorted(self.by_status.items())},
            "by_kind": dict(sorted(self.by_kind.items())), "status_5xx": len(self.server_errors),
            "4xx_without_message": len(self.no_message), "4xx_without_field": len(self.no_field),
            "transport_errors": len(self.transport_errors), "duration_s": round(self.duration_s, 2),
            "examples": {"5xx": self.server_errors[:5], "no_message": self.no_message[:5], "no_field": self.no_field[:5],
                         "transport": self.transport_errors[:5]},
        }


def check_response(req: FuzzRequest, status: int, headers: Any, body: bytes, report: FuzzReport) -> None:
    report.requests += 1
    report.by_status[status] += 1
    report.by_kind[req.kind] += 1
    where = {"method": req.method, "path": req.path[:60], "kind": req.kind, "status": status, "body": body[:300].decode("utf-8", "replace")}
    if status >= 500:
        report.server_errors.append(where)
    elif 400 <= status < 500:
        try:
            err = json.loads(body).get("error")
        except (ValueError, AttributeError):
            err = None
        message = err.get("message") if isinstance(err, dict) else None
        if not (isinstance(message, str) and message.strip()):
            report.no_message.append(where)
        # an upstream's own 4xx (passed through, x-banditroute-model set) is its format, not ours
        elif not (isinstance(err.get("field"), str) and err["field"]) and "x-banditroute-model" not in headers:
            report.no_field.append(where)


async def run(base_url: str, requests: list[FuzzRequest], concurrency: int = 16, timeout_s: float = 60.0) -> FuzzReport:
    import httpx

    report = FuzzReport()
    sem = asyncio.Semaphore(concurrency)
    start = time.perf_counter()
    async with httpx.AsyncClient(base_url=base_url, timeout=timeout_s, trust_env=False) as client:
        async def one(req: FuzzRequest) -> None:
            async with sem:
                try:
                    r = await client.request(req.method, req.path, content=req.content or None, headers=req.headers)
                    check_response(req, r.status_code, r.headers, r.content, report)
                except httpx.HTTPError as exc:
                    report.transport_errors.append(f"{req.method} {req.path[:60]} {req.kind}: {type(exc).__name__}: {exc}"[:300])

        await asyncio.gather(*(one(r) for r in requests))
    report.duration_s = time.perf_counter() - start
    return report


# --- the app under test -------------------------------------------------------------------------------------------


def deploy_secured_app(folder: Path, port: int, app_name: str, limits: dict[str, Any] | None = None) -> dict[str, Any]:
    """Deploy the router (1 Router + 1 ingress replica, replay upstream, feedback actor) with API keys on
    every group and max_body_bytes = MAX_BODY_BYTES; wait for /healthz. The key and secret env vars must
    already be in the replicas' environment. ``limits``: router.limits (e.g. a rate limit). Returns base
    URL, names and a ``cleanup()``."""
    import httpx
    import ray
    from ray import serve

    from banditroute.core.data import load_routing_data
    from banditroute.feedback.actor import get_or_create_feedback_actor
    from banditroute.core.names import NAMESPACE
    from banditroute.cluster.app import build_app
    from banditroute.serve.testing import write_fixture

    folder = Path(folder)
    policy_path, data_path = write_fixture(folder, n=24)
    feedback_name = f"{app_name}-feedback-{uuid.uuid4().hex[:6]}"
    feedback = get_or_create_feedback_actor({"send_to_learner": False, "unknown_grace_s": 0.2}, str(folder / "storage"),
                                            feedback_name, num_cpus=0.05)
    ray.get(feedback.ping.remote())
    config = {
        "policy": str(policy_path), "app_name": app_name, "num_replicas": 1, "num_cpus": 0.1, "num_gpus": 0.0,
        "ingress_num_cpus": 0.1, "torch_threads": 1, "port": port, "max_prompt_chars": 20_000, "max_batch_requests": 8,
        "decision_sink": "feedback-actor", "decision_sink_options": {"name": feedback_name, "namespace": NAMESPACE},
        "replay": {"enabled": True, "data_path": str(data_path)},
        "security": {"route_api_keys_env": KEY_ENVS["route"], "feedback_api_keys_env": KEY_ENVS["feedback"],
                     "admin_api_keys_env": KEY_ENVS["admin"], "max_body_bytes": MAX_BODY_BYTES, "max_reward_cost_usd": 10.0,
                     "feedback_max_body_bytes": FEEDBACK_MAX_BODY_BYTES},
        "limits": {"max_batch_chars": MAX_BATCH_CHARS, "chat_max_tokens": CHAT_MAX_TOKENS,
                   "json_thread_min_bytes": 16 * 1024, **(limits or {})},
    }
    serve.run(build_app({"router": config}), name=app_name, route_prefix="/")
    base = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    with httpx.Client(base_url=base, timeout=30, trust_env=False) as client:
        while client.get("/healthz").status_code != 200:
            if time.time() > deadline:
                raise RuntimeError("the secured app never became healthy")
            time.sleep(0.2)

    def cleanup() -> None:
        serve.delete(app_name)
        ray.kill(feedback, no_restart=True)

    return {"base": base, "feedback": feedback, "data": load_routing_data(data_path), "cleanup": cleanup, "app_name": app_name}


def route_tokens(base: str, prompts: list[str], n: int) -> list[str]:
    """``n`` decision tokens from /v1/route (with the route key)."""
    import httpx

    with httpx.Client(base_url=base, timeout=30, trust_env=False, headers={"x-api-key": KEYS["route"]}) as client:
        tokens: list[str] = []
        while len(tokens) < n:  # the app allows 8 prompts per batch call
            r = client.post("/v1/route/batch", json={"prompts": [prompts[(len(tokens) + i) % len(prompts)] for i in range(min(8, n - len(tokens)))]})
            r.raise_for_status()
            tokens += [x["decision_id"] for x in r.json()["results"]]
        return tokens


def replica_ids(base: str) -> tuple[str, str]:
    """(Router replica id, ingress replica id) from /healthz: the same pair before and after = no restart (1 replica each)."""
    import httpx

    body = httpx.get(base + "/healthz", timeout=30, trust_env=False).json()
    return body["replica_id"], body["ingress_replica_id"]
