"""The Serve application: ``RouterIngress`` (FastAPI, HTTP) -> ``Router`` (batched inference).

``build_app(args)`` is the import path that ``serve run``, ``serve deploy``
and KubeRay's serveConfigV2 use (``banditroute.cluster.app:build_app``). Its
args are RouterConfig keys (serve/config.py) plus an optional ``config``
(YAML path); values may be strings (``serve run ... num_replicas=2``).

Deployments (names are part of the contract):

- ``Router``: one RouterCore per replica (encoder + policy, GPU when given
  one). ``route`` is ``@serve.batch``-ed: concurrent requests are decided in
  one forward and their DecisionRecords appended to the decision sink BEFORE
  any of them is answered. With ``parameter_server_name`` set, a background
  task long-polls the ParameterServer and swaps weights between batches.
- ``RouterIngress``: HTTP API (``/v1/route``, ``/v1/route/batch``,
  ``/v1/chat/completions``, ``/v1/models``, ``/v1/feedback``,
  ``/v1/admin/security``, ``/healthz``), input validation (4xx naming the
  field), upstream proxying with httpx, and security (banditroute/security.py):
  API keys per endpoint group, a body-size cap, and signed decision tokens:
  every decision id a client sees (HTTP or the handle methods) is a token
  minted here from the Router's raw id; /v1/feedback verifies it before the
  feedback actor sees anything (401 unsigned/tampered, 410 expired, 409 a
  replay of a rewarded decision). Rejections are counted by reason.
- ``ReplayUpstream`` (only with replay enabled): runs the replay server.
"""

# No `from __future__ import annotations`: FastAPI must see real annotations (Request) on the routes.

import asyncio
import json
import logging
import os
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Any, AsyncIterator

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from ray import serve
from ray.serve.handle import DeploymentHandle

from banditroute.core.config import from_dict
from banditroute.policy.reward import preference_to_w_cost
from banditroute.core.records import WeightsSnapshot
from banditroute.serve.config import RouterConfig
from banditroute.serve.core import RouteRequest, RouteResult, decisions_table
from banditroute.core.security import Security, TokenError
from banditroute.serve.protocol import (
    RequestError,
    check_length,
    error_body,
    messages_to_text,
    parse_batch_body,
    parse_candidates,
    parse_json_body,
    parse_mode,
    parse_preference,
    parse_route_body,
    short_repr,
)

logger = logging.getLogger("banditroute.serve")

HEADER_DECISION = "x-banditroute-decision-id"
HEADER_MODEL = "x-banditroute-model"
HEADER_VERSION = "x-banditroute-policy-version"
HEADER_FALLBACK = "x-banditroute-fallback-from"
LATENCY_BOUNDARIES_MS = [1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 30000]
BATCH_BOUNDARIES = [1, 2, 4, 8, 16, 32, 64, 128, 256, 512]


# --- metrics ------------------------------------------------------------------------------------------


class _NoMetric:
    def inc(self, *a, **k):
        pass

    def observe(self, *a, **k):
        pass

    def set(self, *a, **k):
        pass


def _metric(kind: str, name: str, description: str, tag_keys: tuple[str, ...] = (), boundaries=None):
    """A ray.serve.metrics metric (exported on each node's Ray metrics port), or a no-op outside Ray."""
    try:
        from ray.serve import metrics

        serve.get_replica_context()  # raises outside a real replica (local testing mode)
        if kind == "counter":
            return metrics.Counter(name, description=description, tag_keys=tag_keys)
        if kind == "gauge":
            return metrics.Gauge(name, description=description, tag_keys=tag_keys)
        return metrics.Histogram(name, description=description, boundaries=boundaries, tag_keys=tag_keys)
    except Exception as exc:  # noqa: BLE001 - e.g. local testing mode without a Ray worker
        logger.debug("metric %s disabled: %s", name, exc)
        return _NoMetric()


def _replica_id() -> str:
    try:
        ctx = serve.get_replica_context()
        return str(getattr(ctx.replica_id, "unique_id", None) or ctx.replica_tag)
    except Exception:  # noqa: BLE001 - local testing mode
        return f"local-{os.getpid()}-{uuid.uuid4().hex[:6]}"


def _router_config(config: dict[str, Any] | RouterConfig) -> RouterConfig:
    return config if isinstance(config, RouterConfig) else from_dict(RouterConfig, config)


def _default_w_cost(cfg: RouterConfig) -> float:
    return preference_to_w_cost(cfg.default_preference.quality, cfg.default_preference.cost)


# NOTE: @serve.deployment pickles a class when it is defined, together with the module
# globals its methods use AT THAT MOMENT: every helper a deployment calls must be
# defined above it.

# --- Router: batched inference --------------------------------------------------------------------------


@serve.deployment(name="Router")
class Router:
    """Batched encoder + policy inference; logs every decision durably before answering."""

    def __init__(self, config: dict[str, Any]):
        from banditroute.serve.core import RouterCore
        from banditroute.serve.decision_sinks import make_decision_sink

        self.cfg = _router_config(config)
        self.replica_id = _replica_id()
        from banditroute.policy.encoders import resolve_device

        on_gpu = resolve_device(self.cfg.device).startswith("cuda")
        parallel = self.cfg.tokenizers_parallelism if self.cfg.tokenizers_parallelism is not None else on_gpu
        os.environ["TOKENIZERS_PARALLELISM"] = "true" if parallel else "false"  # read when the tokenizer first runs
        threads = self.cfg.torch_threads or (0 if on_gpu else max(1, round(self.cfg.num_cpus)))
        bounds = {"exploration_floor": self.cfg.exploration_floor, "exploration_ceiling": self.cfg.exploration_ceiling}
        if self.cfg.policy is not None:
            self.core = RouterCore.from_checkpoint(self.cfg.policy, device=self.cfg.device, seed=self.cfg.seed, torch_threads=threads, **bounds)
        else:
            self.core = RouterCore.from_state(
                *self._initial_state_from_parameter_server(), device=self.cfg.device, seed=self.cfg.seed, torch_threads=threads,
                **bounds,
            )
        self.sink = make_decision_sink(self.cfg.decision_sink, self.cfg.decision_sink_options)
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="router-infer")
        self._poll_task: asyncio.Task | None = None
        self._rejected_version = -1
        self.batches_run = 0
        self.rows_decided = 0
        self.route.set_max_batch_size(self.cfg.max_batch_size)
        self.route.set_batch_wait_timeout_s(self.cfg.batch_wait_timeout_s)

        self.m_decisions = _metric("counter", "banditroute_decisions_total", "Routing decisions by chosen model and mode.", ("model", "mode"))
        self.m_batch = _metric("histogram", "banditroute_batch_size", "Requests per inference batch.", (), BATCH_BOUNDARIES)
        self.m_infer = _metric("histogram", "banditroute_inference_ms", "Encoder + policy + logging time per batch (ms).", (), LATENCY_BOUNDARIES_MS)
        self.m_version = _metric("gauge", "banditroute_policy_version", "Policy version served by this replica.", ("replica_id",))
        self.m_swaps = _metric("counter", "banditroute_weight_swaps_total", "Weight snapshots installed.", ())
        self.m_sink_errors = _metric("counter", "banditroute_decision_sink_errors_total", "Failed decision-log appends.", ())
        self.m_version.set(self.core.policy_version, tags={"replica_id": self.replica_id})
        self._start_poller()
        logger.info("Router replica %s serving policy v%d on %s", self.replica_id, self.core.policy_version, self.core.device)

    def _initial_state_from_parameter_server(self) -> tuple[dict[str, Any]]:
        import ray

        actor = ray.get_actor(self.cfg.parameter_server_name, namespace=self.cfg.parameter_server_namespace)
        snap = ray.get(actor.wait_for_newer.remote(-1, 120.0))
        if snap is None:
            raise RuntimeError(f"no policy: parameter server {self.cfg.parameter_server_name!r} has no weights yet")
        state = dict(snap.state)
        state["meta"] = dict(state["meta"], policy_version=snap.policy_version)
        return (state,)

    def reconfigure(self, user_config: dict[str, Any]) -> None:
        """Live batching knobs (``user_config``: max_batch_size, batch_wait_timeout_s)."""
        if "max_batch_size" in user_config:
            self.route.set_max_batch_size(int(user_config["max_batch_size"]))
        if "batch_wait_timeout_s" in user_config:
            self.route.set_batch_wait_timeout_s(float(user_config["batch_wait_timeout_s"]))

    # -- inference --

    def _decide_and_log(self, reqs: list[RouteRequest]) -> list[RouteResult]:
        """Runs on the inference thread: one batch, then one durable append of its decisions."""
        results = self.core.route_batch(reqs)
        to_log = [r for r, q in zip(results, reqs) if r.ok and q.log]
        if to_log:
            try:
                self._emit(to_log)
            except Exception as exc:  # noqa: BLE001 - never acknowledge what may be lost
                logger.exception("decision sink failed")
                self.m_sink_errors.inc()
                for r, q in zip(results, reqs):
                    if r.ok and q.log:
                        r.error = {"status": 503, "field": None, "message": f"decision log unavailable: {exc}"}
        return results

    def _emit(self, results: list[RouteResult], upstream_costs: list[float | None] | None = None,
              served_models: list[str | None] | None = None) -> None:
        if hasattr(self.sink, "emit_table"):
            self.sink.emit_table(decisions_table(results, upstream_costs, served_models))
        else:
            costs = upstream_costs or [None] * len(results)
            served = served_models or [None] * len(results)
            self.sink.emit([r.record(c, s) for r, c, s in zip(results, costs, served)])

    def _package(self, result: RouteResult, req: RouteRequest) -> dict[str, Any]:
        if not result.ok:
            return {"error": result.error, "replica_id": self.replica_id}
        self.m_decisions.inc(tags={"model": result.model, "mode": result.mode})
        out = {"response": dict(result.response(), replica_id=self.replica_id)}
        if not req.log:
            out["result"] = result  # the caller logs it later (with the upstream's cost)
        return out

    async def _run_batch(self, reqs: list[RouteRequest]) -> list[dict[str, Any]]:
        start = time.perf_counter()
        loop = asyncio.get_running_loop()
        try:
            results = await loop.run_in_executor(self._executor, self._decide_and_log, reqs)
        except Exception as exc:  # noqa: BLE001 - a broken batch must not take the replica down
            logger.exception("routing batch failed")
            return [{"error": {"status": 500, "field": None, "message": f"routing failed: {exc}"}, "replica_id": self.replica_id}] * len(reqs)
        self.m_batch.observe(len(reqs))
        self.batches_run += 1
        self.rows_decided += len(reqs)
        self.m_infer.observe((time.perf_counter() - start) * 1000.0)
        return [self._package(r, q) for r, q in zip(results, reqs)]

    @serve.batch(max_batch_size=64, batch_wait_timeout_s=0.002)
    async def route(self, reqs: list[RouteRequest]) -> list[dict[str, Any]]:
        """One request per call; Serve gathers concurrent calls into ``reqs``."""
        self._start_poller()
        return await self._run_batch(reqs)

    async def route_many(self, reqs: list[RouteRequest]) -> list[dict[str, Any]]:
        """A whole bulk call, decided in chunks of max_batch_size (one forward each)."""
        self._start_poller()
        out: list[dict[str, Any]] = []
        size = self.cfg.max_batch_size
        for start in range(0, len(reqs), size):
            out.extend(await self._run_batch(reqs[start : start + size]))
        return out

    async def log(self, results: list[RouteResult], upstream_costs: list[float | None],
                  served_models: list[str | None] | None = None) -> None:
        """Durably log decisions made with ``log=False`` (raises if the sink fails)."""
        if results:
            await asyncio.get_running_loop().run_in_executor(self._executor, self._emit, results, upstream_costs, served_models)

    async def info(self) -> dict[str, Any]:
        self._start_poller()
        return {
            "replica_id": self.replica_id,
            "policy_version": self.core.policy_version,
            "models": self.core.models,
            "encoder_id": self.core.encoder_id,
            "device": str(self.core.device),
            "default_w_cost": _default_w_cost(self.cfg),
            "default_mode": self.cfg.default_mode,
            "max_prompt_chars": self.cfg.max_prompt_chars,
            "batches_run": self.batches_run,
            "mean_batch_size": self.rows_decided / self.batches_run if self.batches_run else None,
        }

    # -- weights refresh --

    def _start_poller(self) -> None:
        if self.cfg.parameter_server_name is None or (self._poll_task is not None and not self._poll_task.done()):
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return  # no loop yet (constructed outside one): started on the first call
        self._poll_task = loop.create_task(self._poll_weights())

    async def _poll_weights(self) -> None:
        """Long-poll the ParameterServer forever; swap newer weights; report what this replica serves."""
        import ray

        cfg = self.cfg
        actor = None
        backoff = 0.25
        while True:
            try:
                if actor is None:
                    actor = await asyncio.to_thread(ray.get_actor, cfg.parameter_server_name, cfg.parameter_server_namespace)
                known = max(self.core.policy_version, self._rejected_version)
                snap: WeightsSnapshot | None = await actor.wait_for_newer.remote(known, cfg.weights_poll_timeout_s)
                if snap is not None:
                    try:
                        version = await asyncio.to_thread(self.core.swap_weights, snap)
                        self.m_swaps.inc()
                        self.m_version.set(version, tags={"replica_id": self.replica_id})
                        logger.info("replica %s now serves policy v%d", self.replica_id, version)
                    except ValueError as exc:
                        self._rejected_version = snap.policy_version
                        logger.error("rejected weights v%d: %s", snap.policy_version, exc)
                await actor.report_replica.remote(self.replica_id, self.core.policy_version)
                backoff = 0.25
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - actor missing/restarting: retry, never crash
                logger.warning("parameter server %r unavailable (%s); retrying in %.1fs", cfg.parameter_server_name, type(exc).__name__, backoff)
                actor = None
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, cfg.weights_retry_max_s)

    def __del__(self):
        try:
            if self._poll_task is not None:
                self._poll_task.cancel()
            self.sink.close()
        except Exception:  # noqa: BLE001
            pass


# --- Replay upstream ----------------------------------------------------------------------------------------


@serve.deployment(name="ReplayUpstream", num_replicas=1)
class ReplayUpstream:
    """Starts the replay server (serve/replay.py) in this replica; ``url()`` gives its base URL."""

    def __init__(self, config: dict[str, Any]):
        from banditroute.serve.replay import ReplayIndex, ReplayServer

        cfg = _router_config(config).replay
        self.server = ReplayServer(ReplayIndex.from_path(cfg.data_path), cfg.host, cfg.port, cfg.stream_chunk_chars)
        self.server.start()
        logger.info("replay upstream at %s", self.server.base_url)

    async def url(self) -> str:
        return self.server.base_url

    def __del__(self):
        try:
            self.server.stop()
        except Exception:  # noqa: BLE001
            pass


# --- HTTP ingress ---------------------------------------------------------------------------------------------

api = FastAPI(title="banditroute", description="LLM router that learns online from bandit feedback.")


def _error_response(status: int, message: str, field: str | None = None, headers: dict[str, str] | None = None,
                    type_: str = "invalid_request_error") -> JSONResponse:
    return JSONResponse(error_body(message, field, type_), status_code=status, headers=headers)


@api.exception_handler(StarletteHTTPException)
async def _http_exception(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    """Unknown paths (404) and wrong methods (405) answer the same error envelope as everything else."""
    field = {404: "path", 405: "method"}.get(exc.status_code)
    return _error_response(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}", field, getattr(exc, "headers", None))


WWW_AUTHENTICATE = {"WWW-Authenticate": 'Bearer realm="banditroute"'}
# Which API-key group guards each endpoint (/healthz is open).
ENDPOINT_GROUPS = {"route": "route", "route_batch": "route", "chat_completions": "route", "models": "route",
                   "feedback": "feedback", "admin": "admin"}
# Rejections the ingress counts (GET /v1/admin/security, banditroute_security_rejections_total{reason}).
TOKEN_STATUS = {"unsigned": 401, "malformed": 401, "tampered": 401, "expired": 410}


def _usage_cost(data: Any) -> float | None:
    usage = data.get("usage") if isinstance(data, dict) else None
    if not isinstance(usage, dict):
        return None
    for key in ("cost_usd", "cost", "total_cost"):
        value = usage.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    return None


async def _relay_sse(resp, extension: dict[str, Any] | None) -> AsyncIterator[bytes]:
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
        err = {"error": {"message": f"upstream stream broke: {type(exc).__name__}: {exc}", "type": "upstream_error"}}
        yield f"data: {json.dumps(err)}\n\n".encode()
    finally:
        await resp.aclose()


class UpstreamFailure(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


@serve.deployment(name="RouterIngress")
@serve.ingress(api)
class RouterIngress:
    """The HTTP API. Validation happens here; decisions in ``Router``; upstream calls here."""

    def __init__(self, router: DeploymentHandle, replay: DeploymentHandle | None, config: dict[str, Any]):
        self.router = router
        self.replay = replay
        self.cfg = _router_config(config)
        self.replica_id = _replica_id()
        self.default_w_cost = _default_w_cost(self.cfg)
        self._models: list[str] | None = None
        self._models_at = 0.0
        self._client = None
        self._replay_url: str | None = None
        self.m_requests = _metric("counter", "banditroute_requests_total", "HTTP requests by endpoint and status.", ("endpoint", "status"))
        self.m_latency = _metric("histogram", "banditroute_request_latency_ms", "HTTP request latency (ms).", ("endpoint",), LATENCY_BOUNDARIES_MS)
        self.m_upstream_errors = _metric("counter", "banditroute_upstream_errors_total", "Upstream failures by model and kind.", ("model", "kind"))
        # Fails the replica (clear message naming security.token_secret_env / *_api_keys_env) when a secret is missing.
        self.security = Security(self.cfg.security)
        self.rejections: dict[str, int] = {}
        self.m_rejections = _metric("counter", "banditroute_security_rejections_total",
                                    "Requests refused by the ingress's security checks, by reason.", ("reason",))

    # -- security --

    def _reject(self, reason: str) -> None:
        self.rejections[reason] = self.rejections.get(reason, 0) + 1
        self.m_rejections.inc(tags={"reason": reason})

    def _authorize(self, request: Request, endpoint: str) -> JSONResponse | None:
        """None when the request's API key admits it to ``endpoint``'s group; else the 401/403 response to send."""
        group = ENDPOINT_GROUPS[endpoint]
        problem = self.security.check_key(group, request.headers.get("authorization"), request.headers.get("x-api-key"))
        if problem is None:
            return None
        self._reject(f"{group}_{problem}")
        if problem == "disabled":
            return _error_response(403, f"the {group} API is disabled: set security.{group}_api_keys_env to enable it",
                                   "authorization", type_="permission_error")
        what = "is missing" if problem == "missing_key" else "is not valid"
        return _error_response(401, f"the {group} API key {what}: send 'Authorization: Bearer <key>' or 'x-api-key: <key>'",
                               "authorization", WWW_AUTHENTICATE, type_="authentication_error")

    def _signed(self, response: dict[str, Any], now: float | None = None) -> dict[str, Any]:
        """A Router answer with its raw decision id replaced by the client-facing (signed) token."""
        token = self.security.token(response["decision_id"], response["model"], response["policy_version"],
                                    time.time() if now is None else now)
        return dict(response, decision_id=token)

    def _decision_id_from_token(self, token: str) -> str:
        """/v1/feedback: the raw decision id a valid token binds (FeedbackError 401/410 otherwise, counted)."""
        from banditroute.serve.feedback_endpoint import FeedbackError

        if not self.security.signing:
            return token
        try:
            return self.security.verify(token, time.time()).decision_id
        except TokenError as exc:
            self._reject(f"token_{exc.kind}")
            raise FeedbackError(TOKEN_STATUS[exc.kind], exc.message, "decision_id") from None

    # -- helpers --

    async def models(self) -> list[str]:
        """The pool, from a Router replica (cached for 10 s, so weight updates that change it show up)."""
        if self._models is None or time.monotonic() - self._models_at > 10.0:
            info = await self.router.info.remote()
            self._models, self._models_at = list(info["models"]), time.monotonic()
        return self._models

    def _observe(self, endpoint: str, status: int, start: float) -> None:
        self.m_requests.inc(tags={"endpoint": endpoint, "status": str(status)})
        self.m_latency.observe((time.perf_counter() - start) * 1000.0, tags={"endpoint": endpoint})

    async def _json(self, request: Request) -> Any:
        """The JSON body, read with a cap of security.max_body_bytes (413 ``body``; a larger Content-Length is not read)."""
        limit = self.cfg.security.max_body_bytes
        declared = request.headers.get("content-length")
        if declared is not None:
            if not declared.strip().isdigit():
                raise RequestError(400, "body", "the Content-Length header must be a number of bytes")
            if int(declared) > limit:
                self._reject("body_too_large")
                raise RequestError(413, "body", f"the body is {int(declared)} bytes; the limit is {limit} (security.max_body_bytes)")
        chunks, size = [], 0
        async for chunk in request.stream():  # chunked bodies have no Content-Length: count while reading
            size += len(chunk)
            if size > limit:
                self._reject("body_too_large")
                raise RequestError(413, "body", f"the body is over {limit} bytes (security.max_body_bytes)")
            chunks.append(chunk)
        return parse_json_body(b"".join(chunks))

    @staticmethod
    def _router_error(out: dict[str, Any], prefix: str = "") -> RequestError:
        err = out["error"]
        field = err.get("field")
        return RequestError(int(err.get("status", 500)), f"{prefix}{field}" if field else prefix.rstrip(".") or None, err["message"])

    async def _route_one(self, req: RouteRequest) -> dict[str, Any]:
        out = await self.router.route.remote(req)
        if "error" in out:
            raise self._router_error(out)
        return out

    @staticmethod
    def _unavailable(exc: Exception) -> JSONResponse:
        logger.exception("request failed")
        return _error_response(503, f"router unavailable: {type(exc).__name__}: {exc}"[:500], None, type_="unavailable")

    def _finish(self, endpoint: str, start: float, response):
        self._observe(endpoint, response.status_code, start)
        return response

    # -- Python API (DeploymentHandle callers: serve.get_app_handle(app_name).handle_route.remote(body)) --

    async def handle_route(self, body: dict[str, Any]) -> dict[str, Any]:
        """Same as POST /v1/route, for in-cluster callers; raises RequestError on bad input."""
        req = parse_route_body(
            body, models=await self.models(), default_w_cost=self.default_w_cost,
            default_mode=self.cfg.default_mode, max_prompt_chars=self.cfg.max_prompt_chars,
        )
        return self._signed((await self._route_one(req))["response"])

    async def handle_route_batch(self, body: dict[str, Any]) -> dict[str, Any]:
        """Same as POST /v1/route/batch, for in-cluster callers."""
        reqs = parse_batch_body(
            body, models=await self.models(), default_w_cost=self.default_w_cost, default_mode=self.cfg.default_mode,
            max_prompt_chars=self.cfg.max_prompt_chars, max_batch_requests=self.cfg.max_batch_requests,
        )
        outs = await self.router.route_many.remote(reqs)
        now = time.time()
        results = []
        for i, out in enumerate(outs):
            if "error" in out:
                err = out["error"]
                results.append({"error": {"message": err["message"], "field": f"requests[{i}].{err['field']}" if err.get("field") else None}})
            else:
                results.append(self._signed(out["response"], now))
        return {"results": results}

    async def route_requests(self, reqs: list[RouteRequest]) -> list[dict[str, Any]]:
        """Already-parsed requests (serve/client.py RouterClient) -> Router outputs with signed decision ids.

        One request goes through the batched ``Router.route`` (gathered with
        concurrent calls), several through ``route_many``. Outputs keep the
        Router's shape: ``{"response": ...}`` or ``{"error": ...}``.
        """
        outs = [await self.router.route.remote(reqs[0])] if len(reqs) == 1 else await self.router.route_many.remote(reqs)
        now = time.time()
        return [{"response": self._signed(o["response"], now)} if "error" not in o else {"error": o["error"]} for o in outs]

    # -- HTTP --

    async def _endpoint(self, request: Request, endpoint: str, handle, retry_after_on_503: bool = False):
        """What every JSON endpoint does around its handler: the API key check, then ``handle()``
        (a coroutine returning the Response); a RequestError becomes its status, anything else a
        JSON 503 (e.g. no Router replica reachable), never a bare 500; metrics either way."""
        start = time.perf_counter()
        if (denied := self._authorize(request, endpoint)) is not None:
            return self._finish(endpoint, start, denied)
        try:
            response = await handle()
        except RequestError as exc:
            headers = {"Retry-After": "1"} if retry_after_on_503 and exc.status == 503 else None
            response = JSONResponse(exc.to_json(), status_code=exc.status, headers=headers)
        except Exception as exc:  # noqa: BLE001 - never a bare 500
            response = self._unavailable(exc)
        return self._finish(endpoint, start, response)

    @api.post("/v1/route")
    async def http_route(self, request: Request):
        async def handle():
            return JSONResponse(await self.handle_route(await self._json(request)))
        return await self._endpoint(request, "route", handle)

    @api.post("/v1/route/batch")
    async def http_route_batch(self, request: Request):
        async def handle():
            return JSONResponse(await self.handle_route_batch(await self._json(request)))
        return await self._endpoint(request, "route_batch", handle)

    # --- BEGIN feedback route (issue 4; handler logic lives in serve/feedback_endpoint.py) ---
    @api.post("/v1/feedback")
    async def http_feedback(self, request: Request):
        from banditroute.serve.feedback_endpoint import feedback_target, handle_feedback

        start = time.perf_counter()
        if (denied := self._authorize(request, "feedback")) is not None:
            return self._finish("feedback", start, denied)
        try:
            body = await self._json(request)
        except RequestError as exc:
            return self._finish("feedback", start, JSONResponse(exc.to_json(), status_code=exc.status))
        try:
            status, payload, headers = await handle_feedback(
                body, **feedback_target(self.cfg), resolve_decision_id=self._decision_id_from_token,
                max_cost_usd=self.cfg.security.max_reward_cost_usd,
            )
        except Exception as exc:  # noqa: BLE001 - nothing may crash the handler: a JSON 503 (nothing recorded)
            return self._finish("feedback", start, self._unavailable(exc))
        if status == 409:
            self._reject("token_replayed")  # a second reward for a rewarded decision: idempotent, but counted
        return self._finish("feedback", start, JSONResponse(payload, status_code=status, headers=headers))
    # --- END feedback route ---

    # --- admin API: every /v1/admin/* route starts with `self._authorize(request, "admin")` ---
    @api.get("/v1/admin/security")
    async def admin_security(self, request: Request):
        """Security rejections counted by THIS ingress replica (the metric sums all replicas)."""
        start = time.perf_counter()
        if (denied := self._authorize(request, "admin")) is not None:
            return self._finish("admin", start, denied)
        sec = self.cfg.security
        body = {
            "ingress_replica_id": self.replica_id,
            "rejections": dict(sorted(self.rejections.items())),
            "signed_tokens": self.security.signing,
            "token_ttl_s": sec.token_ttl_s,
            "secrets_accepted": len(self.security.secrets),
            "api_keys": {g: ("disabled" if g == "admin" else "open") if k is None else f"{len(k)} key(s)"
                         for g, k in self.security.keys.items()},
            "max_body_bytes": sec.max_body_bytes,
            "max_reward_cost_usd": sec.max_reward_cost_usd,
        }
        return self._finish("admin", start, JSONResponse(body))

    async def _learner_call(self, method: str, *args: Any) -> Any:
        """Call the learner actor's admin method; RequestError 404 (no learner configured) / 503 (unreachable) / 422."""
        import ray

        name = self.cfg.learner_actor_name
        if name is None:
            raise RequestError(404, None, "no learner behind this router: set learner_actor_name (online.enabled does)")
        try:
            handle = await asyncio.to_thread(ray.get_actor, name, self.cfg.parameter_server_namespace)
        except ValueError:
            raise RequestError(503, None, f"the learner actor {name!r} is not running (restarting?); retry") from None
        try:
            return await asyncio.wait_for(getattr(handle, method).remote(*args), timeout=60.0)
        except ray.exceptions.RayTaskError as exc:
            cause = getattr(exc, "cause", None)
            if isinstance(cause, ValueError):  # the learner's own validation, e.g. "version: no checkpoint v7"
                message = str(cause) or "rejected"
                field = message.split(":", 1)[0] if ":" in message else None
                raise RequestError(422, field if field and " " not in field else None, message[:500]) from None
            raise RequestError(503, None, f"the learner failed: {type(cause).__name__}") from None
        except (asyncio.TimeoutError, ray.exceptions.RayActorError) as exc:
            raise RequestError(503, None, f"the learner actor is unavailable: {type(exc).__name__}; retry") from None

    async def _admin(self, request: Request, call) -> JSONResponse:
        async def handle():
            return JSONResponse(await call())
        return await self._endpoint(request, "admin", handle, retry_after_on_503=True)

    @api.get("/v1/admin/policy")
    async def admin_policy(self, request: Request):
        """Promotion gate state: serving vs candidate version, pin, last decisions, checkpointed versions."""
        async def call():
            status = await self._learner_call("promotion_status")
            return dict(status, checkpoints=await self._learner_call("list_checkpoints"))
        return await self._admin(request, call)

    @api.post("/v1/admin/policy/pin")
    async def admin_pin(self, request: Request):
        """``{"version": N}`` (a learner checkpoint: rollback) or ``{"checkpoint": "<URI>"}`` (e.g. an offline
        train-from-log candidate): serve those weights under a new version; hold promotions until unpin."""
        async def call():
            body = await self._json(request)
            if not isinstance(body, dict) or len(body) != 1 or not set(body) <= {"version", "checkpoint"}:
                raise RequestError(422, "version", 'the body must be {"version": <checkpointed version>} or {"checkpoint": "<URI>"}')
            if "checkpoint" in body:
                location = body["checkpoint"]
                if not isinstance(location, str) or not location.strip() or len(location) > 2048:
                    raise RequestError(422, "checkpoint", "checkpoint must be a storage URI or folder of a BaRP checkpoint")
                return await self._learner_call("pin", None, location)
            version = body["version"]
            if isinstance(version, bool) or not isinstance(version, int) or version < 0:
                raise RequestError(422, "version", f"version must be a non-negative integer, got {version!r}")
            return await self._learner_call("pin", version)
        return await self._admin(request, call)

    @api.post("/v1/admin/policy/unpin")
    async def admin_unpin(self, request: Request):
        """Release a pin: the promotion gate decides again at its next evaluation."""
        async def call():
            return await self._learner_call("unpin")
        return await self._admin(request, call)

    @api.get("/healthz")
    async def healthz(self):
        start = time.perf_counter()
        try:
            info = await asyncio.wait_for(self.router.info.remote(), timeout=5.0)
        except Exception as exc:  # noqa: BLE001 - not ready yet
            return self._finish("healthz", start, _error_response(503, f"router not ready: {type(exc).__name__}", None, type_="unavailable"))
        body = {
            "status": "ok",
            "policy_version": info["policy_version"],
            "replica_id": info["replica_id"],
            "ingress_replica_id": self.replica_id,
            "models": info["models"],
            "encoder_id": info["encoder_id"],
            "device": info["device"],
            # of the Router replica that answered: how well @serve.batch groups single requests
            "batches_run": info.get("batches_run"),
            "mean_batch_size": info.get("mean_batch_size"),
        }
        return self._finish("healthz", start, JSONResponse(body))

    @api.get("/v1/models")
    async def list_models(self, request: Request):
        start = time.perf_counter()
        if (denied := self._authorize(request, "models")) is not None:
            return self._finish("models", start, denied)
        try:
            models = await self.models()
        except Exception as exc:  # noqa: BLE001
            return self._finish("models", start, _error_response(503, f"router not ready: {type(exc).__name__}", None, type_="unavailable"))
        data = [{"id": self.cfg.router_model_name, "object": "model", "owned_by": "banditroute"}]
        data += [{"id": m, "object": "model", "owned_by": "upstream"} for m in models]
        return self._finish("models", start, JSONResponse({"object": "list", "data": data}))

    # -- OpenAI-compatible proxy --

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

    def _http(self):
        if self._client is None:
            import httpx

            self._client = httpx.AsyncClient(limits=httpx.Limits(max_connections=1000, max_keepalive_connections=200))
        return self._client

    async def _call_upstream(self, model: str, body: dict[str, Any]):
        """POST to the model's upstream. Non-stream: (status, json); stream: (status, httpx.Response open)."""
        import httpx

        url, headers, upstream_model, timeout_s = await self._upstream(model)
        payload = dict(body, model=upstream_model)
        stream = bool(body.get("stream", False))
        client = self._http()
        try:
            if not stream:
                resp = await client.post(url, json=payload, headers=headers, timeout=timeout_s)
                if resp.status_code >= 500:
                    raise UpstreamFailure(502, f"upstream for {model!r} answered {resp.status_code}: {resp.text[:500]}")
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
                    raise UpstreamFailure(502, f"upstream for {model!r} answered {resp.status_code}: {raw[:500].decode(errors='replace')}")
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
            raise UpstreamFailure(502, f"upstream for {model!r} is unreachable: {type(exc).__name__}: {exc}") from None
        except UpstreamFailure:
            self.m_upstream_errors.inc(tags={"model": model, "kind": "status"})
            raise

    async def _call_with_fallback(self, model: str, body: dict[str, Any]) -> tuple[str, int, Any]:
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

    @api.post("/v1/chat/completions")
    async def chat_completions(self, request: Request):
        async def handle():
            return await self._chat(await self._json(request))
        return await self._endpoint(request, "chat_completions", handle)

    async def _chat(self, body: Any):
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
        pool = await self.models()
        forward = {k: v for k, v in body.items() if k not in ("preference", "candidates", "mode", "banditroute")}
        if model != self.cfg.router_model_name:
            if model not in pool:
                raise RequestError(404, "model", f"unknown model {short_repr(model)}; use {self.cfg.router_model_name!r} or one of {pool}")
            return await self._proxy(model, forward, stream, decision=None)
        req = RouteRequest(
            text=text,
            w_cost=parse_preference(body.get("preference"), self.default_w_cost),
            candidates=parse_candidates(body.get("candidates"), pool),
            mode=parse_mode(body.get("mode"), self.cfg.default_mode),
            log=False,  # logged once the upstream answered (with its cost and the model that served), before replying
        )
        out = await self._route_one(req)
        out = dict(out, response=self._signed(out["response"]))  # headers and the `banditroute` extension carry the token
        return await self._proxy(out["response"]["model"], forward, stream, decision=out)

    async def _log_deferred(self, decision: dict[str, Any] | None, cost: float | None, served: str | None = None) -> None:
        """Log a routed chat's decision with the upstream's cost and, after a fallback, the model that served."""
        if decision is not None and "result" in decision:
            served_model = served if served is not None and served != decision["result"].model else None
            try:
                await self.router.log.remote([decision["result"]], [cost], [served_model])
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
            return _error_response(exc.status, exc.message, None, headers, type_="upstream_error")
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
            cost = _usage_cost(data) if status == 200 else None
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
            _relay_sse(data, extension), media_type="text/event-stream", headers=dict(headers, **{"cache-control": "no-cache"})
        )
