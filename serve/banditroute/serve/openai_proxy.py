"""``POST /v1/chat/completions``: the OpenAI-compatible proxy of the ingress.

A chat whose ``model`` is the router's own name (``router_model_name``) is
routed: the decider decides a pool model (``log=False``), the chat is
forwarded to that model's upstream, and the decision is logged once the
upstream answered, with the cost it reported (``usage.cost_usd`` / ``cost``
/ ``total_cost``) and, after a fallback, the model that actually served.
A pool model's name is served by that model in shadow mode
(serve/experiments.py): the decider still decides, and the decision logs
the router's own choice and probability beside the served model (with
probability 1). The request extensions
(``preference``, ``candidates``, ``mode``) are not forwarded.

Upstreams: ``upstreams.<model>`` (URL, API key from an env var, timeout),
else the replay upstream when it runs. An unreachable upstream, a 5xx or a
non-JSON answer is 502, a timeout 504; then ``fallback_model`` is tried once.
Their messages name the models and the status only; the upstream's text and
transport errors (URLs) go to the log.

Only an allow-list of OpenAI chat fields is forwarded (``FORWARDED_FIELDS``
plus ``limits.chat_extra_fields``), because every call spends the
operator's upstream key: any other field is refused (422 naming it, not
silently dropped, so a client learns its option had no effect);
``max_tokens`` / ``max_completion_tokens`` above ``limits.chat_max_tokens``
and ``n`` above ``limits.chat_max_n`` are refused (422), and a chat giving
neither token field is sent with ``max_tokens = limits.chat_max_tokens``.
An upstream's 4xx is passed through as it is. Answers carry the headers
``x-banditroute-model`` (who served), ``x-banditroute-decision-id`` and
``x-banditroute-policy-version`` (routed chats), ``x-banditroute-fallback-from``
(after a fallback), and routed answers a ``banditroute`` object (decision
token, model, probability, version): in the JSON body, or in the first
chunk of a stream (SSE relayed line by line).
"""

from __future__ import annotations

import json
import logging
from typing import Any, AsyncIterator, Awaitable, Callable

import httpx
from fastapi.responses import JSONResponse, StreamingResponse
from ray.serve.handle import DeploymentHandle

from banditroute.serve.config import RouterConfig
from banditroute.serve.decider import Decider
from banditroute.serve.limits import LimitsConfig
from banditroute.serve.experiments import parse_user
from banditroute.serve.metrics import metric
from banditroute.serve.protocol import (
    RequestError,
    RouteRequest,
    check_length,
    error_body,
    messages_to_text,
    parse_candidates,
    parse_mode,
    parse_preference,
    short_repr,
)
from banditroute.serve.stages import NO_STAGES, StageClock, inject_trace_context

logger = logging.getLogger("banditroute.serve")

HEADER_DECISION = "x-banditroute-decision-id"
HEADER_MODEL = "x-banditroute-model"
HEADER_VERSION = "x-banditroute-policy-version"
HEADER_FALLBACK = "x-banditroute-fallback-from"
# Keys of a chat body that are the router's own (not sent upstream).
ROUTER_KEYS = ("preference", "candidates", "mode", "banditroute")
# OpenAI chat fields forwarded upstream (anything else is refused unless limits.chat_extra_fields lists it).
FORWARDED_FIELDS = ("model", "messages", "stream", "stream_options", "max_tokens", "max_completion_tokens", "temperature",
                    "top_p", "n", "stop", "presence_penalty", "frequency_penalty", "seed", "user", "response_format",
                    "tools", "tool_choice", "parallel_tool_calls", "logprobs", "top_logprobs")
TOKEN_FIELDS = ("max_tokens", "max_completion_tokens")


def _bounded_int(value: Any, field: str, cap: int, cap_name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise RequestError(422, field, f"{field} must be an integer, got {short_repr(value)}")
    if not 1 <= value <= cap:
        raise RequestError(422, field, f"{field} must be in [1, {cap}] ({cap_name}), got {short_repr(value)}")
    return value


def forwarded_body(body: dict[str, Any], limits: LimitsConfig) -> dict[str, Any]:
    """The chat body sent upstream: allow-listed fields only, token count and ``n`` capped (RequestError 422 naming
    the field otherwise); no token field given -> ``max_tokens = limits.chat_max_tokens``."""
    allowed = set(FORWARDED_FIELDS) | set(limits.chat_extra_fields)
    out: dict[str, Any] = {}
    for key, value in body.items():
        if key in ROUTER_KEYS:
            continue
        if key not in allowed:
            raise RequestError(422, key[:200] or "<empty key>", f"{short_repr(key)} is not a chat field this router forwards "
                                                                f"(allowed: {sorted(allowed)}; limits.chat_extra_fields adds more)")
        out[key] = value
    for name in TOKEN_FIELDS:
        if out.get(name) is not None:
            _bounded_int(out[name], name, limits.chat_max_tokens, "limits.chat_max_tokens")
    if all(out.get(name) is None for name in TOKEN_FIELDS):
        out["max_tokens"] = limits.chat_max_tokens
    if out.get("n") is not None:
        _bounded_int(out["n"], "n", limits.chat_max_n, "limits.chat_max_n")
    return out


class UpstreamFailure(Exception):
    """An upstream call failed (502 / 504): the fallback model is tried, then it is answered.

    ``message`` is what the client reads (models and status only); ``detail`` goes to the log."""

    def __init__(self, status: int, message: str, detail: str | None = None):
        super().__init__(message)
        self.status, self.message = status, message
        if detail:
            logger.warning("%s: %s", message, detail[:1000])


def usage_cost(data: Any) -> float | None:
    """The USD cost an upstream reported in ``usage`` (``cost_usd``, ``cost`` or ``total_cost``), if any."""
    usage = data.get("usage") if isinstance(data, dict) else None
    if not isinstance(usage, dict):
        return None
    for key in ("cost_usd", "cost", "total_cost"):
        value = usage.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    return None


async def relay_sse(resp: httpx.Response, extension: dict[str, Any] | None) -> AsyncIterator[bytes]:
    """Pass the upstream's SSE through, adding ``banditroute`` to the first data chunk."""
    pending = extension
    try:
        async for line in resp.aiter_lines():
            if pending is not None and line.startswith("data:") and line[5:].strip() not in ("", "[DONE]"):
                try:
                    chunk = json.loads(line[5:].strip())
                    if isinstance(chunk, dict):
                        chunk["banditroute"] = pending
                        line = "data: " + json.dumps(chunk)
                        pending = None
                except ValueError:
                    pass
            yield (line + "\n").encode()
    except Exception as exc:  # noqa: BLE001 - headers are gone: report in-band and end the stream
        logger.warning("upstream stream broke: %s: %s", type(exc).__name__, exc)
        err = error_body(502, "the upstream stream broke", type_="upstream_error")
        yield f"data: {json.dumps(err)}\n\n".encode()
    finally:
        await resp.aclose()


class ChatProxy:
    """Chat completions for one ingress replica: validation, routing, upstream calls with fallback, relay.

    ``router`` is the ingress's decider (deferred decision logging),
    ``replay`` the ReplayUpstream deployment or None.
    """

    def __init__(self, cfg: RouterConfig, router: Decider, replay: DeploymentHandle | None, stages: StageClock = NO_STAGES):
        self.cfg, self.router, self.replay, self.stages = cfg, router, replay, stages
        self.default_w_cost = cfg.default_w_cost()
        self._client: httpx.AsyncClient | None = None
        self._replay_url: str | None = None
        self.m_upstream_errors = metric("counter", "banditroute_upstream_errors_total", "Upstream failures by model and kind.", ("model", "kind"))

    async def complete(self, body: Any, pool: Callable[[], Awaitable[list[str]]],
                       decide: Callable[[RouteRequest], Awaitable[dict[str, Any]]], headers: Any = None):
        """The response to one chat body. ``pool()``: the pool's models; ``decide(req)``: the decider's
        answer for a request, its decision id already signed (RequestError when refused)."""
        if not isinstance(body, dict):
            raise RequestError(400, "body", "the body must be a JSON object")
        model = body.get("model")
        if not isinstance(model, str) or not model:
            raise RequestError(422, "model", f"model must be a string: {self.cfg.router_model_name!r} to route, or a pool model")
        text = messages_to_text(body.get("messages"))
        check_length(text, self.cfg.max_prompt_chars, "messages")
        stream = body.get("stream", False)
        if not isinstance(stream, bool):
            raise RequestError(422, "stream", "stream must be true or false")
        forward = forwarded_body(body, self.cfg.limits)
        models = await pool()
        shadow = None
        if model != self.cfg.router_model_name:
            if model not in models:
                raise RequestError(404, "model", f"unknown model {short_repr(model)}; use {self.cfg.router_model_name!r} or one of {models}")
            shadow = model  # shadow mode: that model serves, the router decides and logs its own choice beside it
        req = RouteRequest(
            text=text,
            w_cost=parse_preference(body.get("preference"), self.default_w_cost),
            candidates=None if shadow else parse_candidates(body.get("candidates"), models),
            mode=parse_mode(body.get("mode"), self.cfg.default_mode),
            log=False,  # logged once the upstream answered (with its cost and the model that served), before replying
            user=parse_user(body, headers),
            shadow_model=shadow,
        )
        decision = await decide(req)
        return await self._proxy(decision["response"]["model"], forward, stream, decision=decision)

    # -- upstream calls --

    async def _upstream(self, model: str) -> tuple[str, dict[str, str], str, float]:
        """(URL, headers, upstream model id, timeout) for a pool model."""
        up = self.cfg.upstreams.get(model)
        if up is not None:
            headers = {}
            key = up.api_key()
            if key:
                headers["Authorization"] = f"Bearer {key}"
            return up.base_url.rstrip("/") + "/chat/completions", headers, up.model or model, up.timeout_s
        if self.replay is not None:
            if self._replay_url is None:
                self._replay_url = await self.replay.url.remote()
            return self._replay_url.rstrip("/") + "/chat/completions", {}, model, 60.0
        raise UpstreamFailure(502, f"no upstream is configured for model {model!r} (set upstreams.{model}.base_url)")

    def _http(self) -> httpx.AsyncClient:
        if self._client is None:  # created on first use: inside the replica's event loop
            self._client = httpx.AsyncClient(limits=httpx.Limits(max_connections=1000, max_keepalive_connections=200))
        return self._client

    async def _call_upstream(self, model: str, body: dict[str, Any]) -> tuple[int, Any]:
        """POST to the model's upstream. Non-stream: (status, json); stream: (status, httpx.Response open)."""
        url, headers, upstream_model, timeout_s = await self._upstream(model)
        payload = dict(body, model=upstream_model)
        stream = bool(body.get("stream", False))
        client = self._http()
        with self.stages.stage("upstream", model=model):  # until the answer (a stream: its headers)
            inject_trace_context(headers)  # the upstream's spans join this request's trace
            return await self._send_upstream(client, url, headers, payload, stream, model, timeout_s)

    async def _send_upstream(self, client: httpx.AsyncClient, url: str, headers: dict[str, str], payload: dict[str, Any],
                             stream: bool, model: str, timeout_s: float) -> tuple[int, Any]:
        try:
            if not stream:
                resp = await client.post(url, json=payload, headers=headers, timeout=timeout_s)
                if resp.status_code >= 500:
                    raise UpstreamFailure(502, f"upstream for {model!r} answered {resp.status_code}", resp.text[:500])
                try:
                    data = resp.json()
                except ValueError:
                    raise UpstreamFailure(502, f"upstream for {model!r} answered non-JSON (status {resp.status_code})") from None
                return resp.status_code, data
            request = client.build_request("POST", url, json=payload, headers=headers, timeout=timeout_s)
            resp = await client.send(request, stream=True)
            if resp.status_code != 200:
                raw = await resp.aread()
                await resp.aclose()
                if resp.status_code >= 500:
                    raise UpstreamFailure(502, f"upstream for {model!r} answered {resp.status_code}", raw[:500].decode(errors="replace"))
                try:
                    return resp.status_code, json.loads(raw)
                except ValueError:
                    raise UpstreamFailure(502, f"upstream for {model!r} answered {resp.status_code} with a non-JSON body") from None
            return 200, resp
        except httpx.TimeoutException:
            self.m_upstream_errors.inc(tags={"model": model, "kind": "timeout"})
            raise UpstreamFailure(504, f"upstream for {model!r} timed out after {timeout_s:g}s") from None
        except httpx.HTTPError as exc:
            self.m_upstream_errors.inc(tags={"model": model, "kind": "transport"})
            raise UpstreamFailure(502, f"upstream for {model!r} is unreachable", f"{type(exc).__name__}: {exc}") from None
        except UpstreamFailure:
            self.m_upstream_errors.inc(tags={"model": model, "kind": "status"})
            raise

    async def _call_with_fallback(self, model: str, body: dict[str, Any]) -> tuple[str, int, Any]:
        """(model that served, status, data) from ``model``'s upstream, else from ``fallback_model``'s."""
        try:
            status, data = await self._call_upstream(model, body)
            return model, status, data
        except UpstreamFailure as first:
            fb = self.cfg.fallback_model
            if fb is None or fb == model:
                raise
            logger.warning("upstream %s failed (%s); falling back to %s", model, first.message, fb)
            try:
                status, data = await self._call_upstream(fb, body)
            except UpstreamFailure as second:
                raise UpstreamFailure(second.status, f"{first.message}; fallback {fb!r} failed too: {second.message}") from None
            return fb, status, data

    # -- answering --

    async def _log_deferred(self, decision: dict[str, Any] | None, cost: float | None, served: str | None = None) -> None:
        """Log a routed chat's decision with the upstream's cost and, after a fallback, the model that served."""
        if decision is not None and "result" in decision:
            served_model = served if served is not None and served != decision["result"].model else None
            try:
                await self.router.log([decision["result"]], [cost], [served_model])
            except Exception as exc:  # noqa: BLE001 - do not acknowledge a decision that may be lost
                raise RequestError(503, None, f"decision log unavailable: {exc}") from None

    async def _proxy(self, model: str, forward: dict[str, Any], stream: bool, decision: dict[str, Any] | None):
        info = decision["response"] if decision else None
        headers = {HEADER_MODEL: model}
        if info is not None:
            headers[HEADER_DECISION] = info["decision_id"]
            headers[HEADER_VERSION] = str(info["policy_version"])
        try:
            served, status, data = await self._call_with_fallback(model, forward)
        except UpstreamFailure as exc:
            await self._log_deferred(decision, None)
            raise RequestError(exc.status, None, exc.message, type_="upstream_error", headers=headers, public=True) from None
        if served != model:
            headers[HEADER_FALLBACK] = model
            headers[HEADER_MODEL] = served
        extension = None
        if info is not None:
            extension = {
                "decision_id": info["decision_id"],
                "model": served,
                "probability": info["probability"],
                "policy_version": info["policy_version"],
            }
            if served != model:
                extension["fallback_from"] = model
        if not stream or status != 200:
            cost = usage_cost(data) if status == 200 else None
            await self._log_deferred(decision, cost, served)
            if isinstance(data, dict) and extension is not None:
                data = dict(data, banditroute=extension)
            return JSONResponse(data, status_code=status, headers=headers)
        try:
            await self._log_deferred(decision, None, served)  # a stream's cost is unknown until its end
        except RequestError:
            await data.aclose()
            raise
        return StreamingResponse(
            relay_sse(data, extension), media_type="text/event-stream", headers=dict(headers, **{"cache-control": "no-cache"})
        )
