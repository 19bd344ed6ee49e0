"""The ``RouterIngress`` deployment: the HTTP API (FastAPI) and the Python API of the application.

Endpoints: ``/v1/route``, ``/v1/route/batch``, ``/v1/chat/completions``
(serve/openai_proxy.py), ``/v1/models``, ``/v1/feedback``
(serve/feedback_endpoint.py), ``/v1/admin/*`` (serve/admin.py) and
``/healthz``. Decisions are made through a ``Decider`` (serve/decider.py):
this replica's own ``RouterService`` (``placement: inline``: built when the
app gives no Router handle) or the ``Router`` deployment (``placement:
replica``; texts tokenized here for encoders with a tokenizer). Here happen
input validation (serve/protocol.py: a 4xx naming the field), upstream
proxying and security (core/security.py; the checks live in
serve/admission.py's ``Admission``):

- API keys per endpoint group (``ENDPOINT_GROUPS``; /healthz is open),
  tenants' own keys too, and rate limits (per key, or per tenant),
- a body-size cap (``security.max_body_bytes``, also for chunked bodies),
- signed decision tokens: every decision id a client sees (HTTP or the
  handle methods) is a token minted here from the decider's raw id;
  /v1/feedback verifies it before the feedback actor sees anything (401
  unsigned/tampered, 410 expired, 409 a replay of a rewarded decision).

Rejections are counted by reason (``GET /v1/admin/security``,
``banditroute_security_rejections_total{reason}``). Every JSON endpoint runs
through ``RouterIngress._endpoint``: the key check, the handler, a
RequestError answered as its status and error body (``error_response``, the
only place a RequestError becomes an HTTP answer), anything else as a JSON
503 (never a bare 500), and metrics either way.
"""

# No `from __future__ import annotations`: FastAPI must see real annotations (Request) on the routes.
# NOTE: @serve.deployment pickles the class when it is defined, together with the module
# globals its methods use AT THAT MOMENT: every helper it calls must be defined (or imported) above it.

import asyncio
import logging
import time
import uuid
from typing import Any, Awaitable, Callable

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from ray import serve
from ray.serve.handle import DeploymentHandle
from starlette.exceptions import HTTPException as StarletteHTTPException

from banditroute.serve.admission import Admission
from banditroute.serve.api_docs import api_docs_page
from banditroute.serve.body import parse_json_off_loop, read_body
from banditroute.serve.caller import current_caller, set_caller
from banditroute.serve.admin import LearnerAdmin, PoolAdmin, security_report
from banditroute.serve.budget import BudgetClient, pool_registry_path
from banditroute.serve.config import as_router_config
from banditroute.serve.decider import Decider, RouterHandle
from banditroute.serve.experiments import parse_shadow, parse_user
from banditroute.serve.ops_admin import ExperimentsAdmin
from banditroute.serve.feedback_endpoint import feedback_target, handle_feedback
from banditroute.serve.metrics import LATENCY_BOUNDARIES_MS, metric, replica_id, stage_histogram
from banditroute.serve.openai_proxy import ChatProxy
from banditroute.serve.protocol import (
    RequestError,
    RouteRequest,
    error_body,
    parse_batch_body,
    parse_route_body,
    public_error,
    router_error,
)
from banditroute.serve.service import RouterService
from banditroute.serve.stages import StageClock, incoming_trace_context
from banditroute.serve.tenants import apply_tenant, apply_tenant_batch, preference_given, with_tenant_budgets

logger = logging.getLogger("banditroute.serve")

# Which API-key group guards each endpoint (None: open).
ENDPOINT_GROUPS = {"route": "route", "route_batch": "route", "chat_completions": "route", "models": "route",
                   "feedback": "feedback", "admin": "admin", "healthz": None, "docs": None}
ROUTER_INFO_TIMEOUT_S = 5.0


def error_response(err: RequestError) -> JSONResponse:
    """The HTTP answer of a RequestError: its error body, status and headers."""
    return JSONResponse(err.to_json(), status_code=err.status, headers=err.headers or None)


# No schema or UIs unless security.api_docs (RouterIngress.api_docs serves them then, serve/api_docs.py).
api = FastAPI(title="banditroute", description="LLM router that learns online from bandit feedback.",
              docs_url=None, redoc_url=None, openapi_url=None)


@api.exception_handler(StarletteHTTPException)
async def _http_exception(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    """Unknown paths (404) and wrong methods (405) answer the same error envelope as everything else."""
    field = {404: "path", 405: "method"}.get(exc.status_code)
    return error_response(RequestError(exc.status_code, field, f"{request.method} {request.url.path}: {exc.detail}",
                                       headers=getattr(exc, "headers", None)))


@serve.deployment(name="RouterIngress")
@serve.ingress(api)
class RouterIngress:
    """The HTTP API. Validation and upstream calls happen here; decisions in this replica or in ``Router``."""

    def __init__(self, router: DeploymentHandle | None, replay: DeploymentHandle | None, config: dict[str, Any]):
        self.cfg = as_router_config(config)
        self.replica_id = replica_id()
        # No Router handle: placement inline, this replica decides (one hop per route).
        self.router: Decider = RouterService(self.cfg, self.replica_id) if router is None \
            else RouterHandle(router, self.cfg.tokenize_in_ingress, self.cfg.max_batch_size, self.cfg.batch_wait_timeout_s)
        self.default_w_cost = self.cfg.default_w_cost()
        self._models: list[str] | None = None
        self._models_at = 0.0
        self.stages = StageClock(stage_histogram())
        # Accepted rewards as they arrive (dashboards: quality and spend over time; k8s/overlays/prod).
        self.m_feedback_score = metric("histogram", "banditroute_feedback_score", "Scores of accepted rewards.", (),
                                       [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0])
        self.m_feedback_cost = metric("counter", "banditroute_feedback_cost_usd_total", "USD cost reported with accepted rewards.", ())
        self.chat = ChatProxy(self.cfg, self.router, replay, self.stages)
        self.experiments = ExperimentsAdmin(self.cfg)
        self.learner = LearnerAdmin(self.cfg.learner_actor_name, self.cfg.parameter_server_namespace)
        self.pool = PoolAdmin(self.cfg.policy or self.cfg.pool_policy)  # /v1/admin/models: an identity policy's registry
        # Budget pacing (serve/budget.py): spend targets move each request's w_cost; one shared actor per app.
        self.budget = BudgetClient(with_tenant_budgets(self.cfg.budget, self.cfg.tenants), self.cfg.app_name, self.cfg.parameter_server_namespace,
                                   pool_registry_path(self.cfg.policy or self.cfg.pool_policy))
        self.m_requests = metric("counter", "banditroute_requests_total", "HTTP requests by endpoint, status and tenant.",
                                 ("endpoint", "status", "tenant"))
        self.m_latency = metric("histogram", "banditroute_request_latency_ms", "HTTP request latency (ms).", ("endpoint",), LATENCY_BOUNDARIES_MS)
        # API keys (tenants' too), rate limits, decision tokens (serve/admission.py); fails the replica on a missing secret.
        self.admission = Admission(self.cfg)
        self.tenants = self.admission.tenants
        self.m_server_errors = metric("counter", "banditroute_server_errors_total",
                                      "5xx answers by endpoint and status (details in the log under the incident id).",
                                      ("endpoint", "status"))

    def reconfigure(self, user_config: dict[str, Any]) -> None:
        """Live batching knobs of an inline replica (``user_config``: max_batch_size, batch_wait_timeout_s)."""
        if isinstance(self.router, RouterService):
            self.router.set_batching(user_config.get("max_batch_size"), user_config.get("batch_wait_timeout_s"))

    # -- errors --

    def _public(self, err: RequestError, endpoint: str) -> RequestError:
        """A 5xx as the client sees it (generic text + incident id); its details are logged and counted."""
        if err.status < 500 or err.public:
            return err
        incident = uuid.uuid4().hex[:12]
        logger.error("%s answered %d (incident %s): %s", endpoint, err.status, incident, err.message)
        self.m_server_errors.inc(tags={"endpoint": endpoint, "status": str(err.status)})
        return public_error(err, incident)

    # -- the wrapper of every endpoint --

    async def _endpoint(self, request: Request, endpoint: str, handle: Callable[[], Awaitable[Any]]) -> Response:
        """The key check of the endpoint's group, then ``handle()`` (a Response, or a value answered as
        JSON); a RequestError becomes its error response, anything else a JSON 503 (e.g. no Router
        replica reachable), never a bare 500; metrics either way."""
        start = time.perf_counter()
        group = ENDPOINT_GROUPS[endpoint]
        set_caller(group, request.headers)
        try:
            if group is not None:
                self.admission.authorize(request.headers, group)
                self.admission.rate_limit(request.headers, request.client.host if request.client else None, group)
            with incoming_trace_context(request.headers):  # the caller's trace is the parent of our stage spans
                response = await handle()
            if not isinstance(response, Response):
                response = JSONResponse(response)
        except RequestError as exc:
            response = error_response(self._public(exc, endpoint))
        except Exception as exc:  # noqa: BLE001 - never a bare 500
            logger.exception("request failed")
            response = error_response(self._public(RequestError(503, None, f"router unavailable: {type(exc).__name__}: {exc}"[:500]), endpoint))
        tenant = self.admission.tenant()
        self.m_requests.inc(tags={"endpoint": endpoint, "status": str(response.status_code), "tenant": tenant.name if tenant else ""})
        self.m_latency.observe((time.perf_counter() - start) * 1000.0, tags={"endpoint": endpoint})
        return response

    async def _json(self, request: Request) -> Any:
        """The JSON body within the endpoint group's limit (security.*max_body_bytes: 413 ``body``, a larger
        Content-Length is not read); large bodies parsed off the event loop (serve/body.py)."""
        limit, limit_name = self.cfg.security.body_limit(current_caller().group or "route")
        raw = await read_body(request.headers, request.stream(), limit, limit_name, lambda: self.admission.reject("body_too_large"))
        return await parse_json_off_loop(raw, self.cfg.limits.json_thread_min_bytes)

    # -- routing helpers --

    async def models(self) -> list[str]:
        """The pool, from the deciding replica (cached for 10 s, so weight updates that change it show up)."""
        if self._models is None or time.monotonic() - self._models_at > 10.0:
            info = await self.router.info()
            self._models, self._models_at = list(info["models"]), time.monotonic()
        return self._models

    async def _ready_models(self) -> list[str]:
        """The pool, or RequestError 503 while no deciding replica answers."""
        try:
            return await self.models()
        except Exception as exc:  # noqa: BLE001 - not ready yet
            raise RequestError(503, None, f"router not ready: {type(exc).__name__}") from None

    async def _route_one(self, req: RouteRequest) -> dict[str, Any]:
        key = self.budget.pace_all([req], self._budget_key(), req.tenant)  # budget pacing (serve/budget.py): never waits
        out = await self.router.route(req)
        if "error" in out:
            raise router_error(out["error"])
        self.budget.spent([out], key, req.tenant)
        return out

    def _budget_key(self) -> str | None:
        return self.admission.routing_key_id() if self.budget.enabled else None

    async def _decide_signed(self, req: RouteRequest) -> dict[str, Any]:
        """One routed chat's decision, its id signed (headers and the ``banditroute`` extension carry it)."""
        out = await self._route_one(req)
        return dict(out, response=self.admission.signed(out["response"]))

    # -- Python API (DeploymentHandle callers: serve.get_app_handle(app_name).handle_route.remote(body)) --

    async def handle_route(self, body: dict[str, Any], headers: Any = None) -> dict[str, Any]:
        """Same as POST /v1/route, for in-cluster callers; raises RequestError on bad input."""
        models = await self.models()
        with self.stages.stage("parse"):
            req = parse_route_body(
                body, models=models, default_w_cost=self.default_w_cost,
                default_mode=self.cfg.default_mode, max_prompt_chars=self.cfg.max_prompt_chars,
            )
            req.user, req.shadow_model = parse_user(body, headers), parse_shadow(body, models)
            apply_tenant(req, self.admission.tenant(), models, preference_given(body))
        return self.admission.signed((await self._route_one(req))["response"])

    async def handle_route_batch(self, body: dict[str, Any]) -> dict[str, Any]:
        """Same as POST /v1/route/batch, for in-cluster callers."""
        models = await self.models()
        reqs = parse_batch_body(
            body, models=models, default_w_cost=self.default_w_cost, default_mode=self.cfg.default_mode,
            max_prompt_chars=self.cfg.max_prompt_chars, max_batch_requests=self.cfg.max_batch_requests,
            max_batch_chars=self.cfg.limits.max_batch_chars,
        )
        tenant = self.admission.tenant()
        apply_tenant_batch(reqs, body, tenant, models)
        key = self.budget.pace_all(reqs, self._budget_key(), tenant.name if tenant else None)
        outs = await self.router.route_many(reqs)
        self.budget.spent(outs, key, tenant.name if tenant else None)
        now = time.time()
        results = []
        for i, out in enumerate(outs):
            if "error" in out:  # one item refused: its error envelope in place of its answer, field prefixed
                err = out["error"]
                field = f"requests[{i}].{err['field']}" if err.get("field") else None
                results.append(error_body(int(err.get("status", 500)), err["message"], field))
            else:
                results.append(self.admission.signed(out["response"], now))
        return {"results": results}

    async def router_info(self) -> dict[str, Any]:
        """Pool, defaults and served version of the deciding replica (serve/client.py RouterClient)."""
        return await self.router.info()

    async def route_requests(self, reqs: list[RouteRequest]) -> list[dict[str, Any]]:
        """Already-parsed requests (serve/client.py RouterClient) -> decisions with signed decision ids.

        One request goes through the batched ``route`` (gathered with
        concurrent calls), several through ``route_many``. Outputs keep the
        deciders' shape: ``{"response": ...}`` or ``{"error": ...}``.
        """
        if self.tenants:  # an in-cluster caller may name a configured tenant (no HTTP key to take it from)
            models = await self.models()
            for req in reqs:
                apply_tenant(req, self.tenants.resolve(self.admission.tenant(), req.tenant), models, True)
        outs = [await self.router.route(reqs[0])] if len(reqs) == 1 else await self.router.route_many(reqs)
        now = time.time()
        return [{"response": self.admission.signed(o["response"], now)} if "error" not in o else {"error": o["error"]} for o in outs]

    # -- HTTP: routing --

    @api.post("/v1/route")
    async def http_route(self, request: Request):
        async def handle():
            return await self.handle_route(await self._json(request), request.headers)
        return await self._endpoint(request, "route", handle)

    @api.post("/v1/route/batch")
    async def http_route_batch(self, request: Request):
        async def handle():
            return await self.handle_route_batch(await self._json(request))
        return await self._endpoint(request, "route_batch", handle)

    @api.post("/v1/chat/completions")
    async def chat_completions(self, request: Request):
        async def handle():
            body, tenant = await self._json(request), self.admission.tenant()

            async def decide(req: RouteRequest) -> dict[str, Any]:  # the tenant's defaults and allow-list first
                return await self._decide_signed(apply_tenant(req, tenant, await self.models(), preference_given(body)))
            return await self.chat.complete(body, self.models, decide, request.headers)
        return await self._endpoint(request, "chat_completions", handle)

    @api.get("/v1/models")
    async def list_models(self, request: Request):
        async def handle():
            models = await self._ready_models()
            data = [{"id": self.cfg.router_model_name, "object": "model", "owned_by": "banditroute"}]
            return {"object": "list", "data": data + [{"id": m, "object": "model", "owned_by": "upstream"} for m in models]}
        return await self._endpoint(request, "models", handle)

    @api.get("/healthz")
    async def healthz(self, request: Request):
        async def handle():
            try:
                info = await asyncio.wait_for(self.router.info(), timeout=ROUTER_INFO_TIMEOUT_S)
            except Exception as exc:  # noqa: BLE001 - not ready yet
                raise RequestError(503, None, f"router not ready: {type(exc).__name__}") from None
            return {
                "status": "ok",
                "policy_version": info["policy_version"],
                "policy_kind": info.get("policy_kind"),  # which kind serves: barp, value or identity
                "replica_id": info["replica_id"],
                "ingress_replica_id": self.replica_id,
                "models": info["models"],
                "encoder_id": info["encoder_id"],
                "device": info["device"],
                # of the deciding replica that answered: how well @serve.batch groups single requests
                "batches_run": info.get("batches_run"),
                "mean_batch_size": info.get("mean_batch_size"),
            }
        return await self._endpoint(request, "healthz", handle)

    # -- HTTP: API docs (security.api_docs; off: 404 like any unknown path) --

    @api.get("/openapi.json", include_in_schema=False)
    @api.get("/docs", include_in_schema=False)
    @api.get("/redoc", include_in_schema=False)
    async def api_docs(self, request: Request):
        return await self._endpoint(request, "docs", lambda: api_docs_page(api, request.url.path, self.cfg.security.api_docs))

    # -- HTTP: feedback --

    @api.post("/v1/feedback")
    async def http_feedback(self, request: Request):
        async def handle():
            body = await self._json(request)
            status, payload, headers = await handle_feedback(
                body, **feedback_target(self.cfg), resolve_decision_id=self.admission.decision_id_from_token,
                max_cost_usd=self.cfg.security.max_reward_cost_usd,
            )
            if status == 409:
                self.admission.reject("token_replayed")  # a second reward for a rewarded decision: idempotent, but counted
            if status == 200 and payload.get("status") == "accepted":
                self._observe_reward(body)
                if self.budget.enabled and isinstance(body.get("cost"), (int, float)):  # the upstream's reported cost
                    self.budget.record_cost(self.admission.decision_id_from_token(body["decision_id"]), float(body["cost"]))
            return JSONResponse(payload, status_code=status, headers=headers)
        return await self._endpoint(request, "feedback", handle)

    def _observe_reward(self, body: dict[str, Any]) -> None:
        """An accepted reward's score and cost into the metrics (the body was validated by handle_feedback)."""
        self.m_feedback_score.observe(float(body["score"]))
        cost = body.get("cost")
        if isinstance(cost, (int, float)) and cost > 0:
            self.m_feedback_cost.inc(float(cost))

    # -- HTTP: admin (key group "admin") --

    @api.get("/v1/admin/security")
    async def admin_security(self, request: Request):
        """Security rejections counted by THIS ingress replica (the metric sums all replicas)."""
        async def handle():
            return security_report(self.replica_id, self.admission.security, self.cfg.security, self.admission.rejections)
        return await self._endpoint(request, "admin", handle)

    @api.get("/v1/admin/experiments")
    async def admin_experiments(self, request: Request):
        """Per experiment and arm: decisions, rewards, mean reward with its 95% CI, served models' shares."""
        async def handle():
            return await self.experiments.report(await self.router.info())
        return await self._endpoint(request, "admin", handle)

    @api.get("/v1/admin/policy")
    async def admin_policy(self, request: Request):
        """Promotion gate state: serving vs candidate version, pin, last decisions, checkpointed versions."""
        return await self._endpoint(request, "admin", self.learner.status)

    @api.post("/v1/admin/policy/pin")
    async def admin_pin(self, request: Request):
        """``{"version": N}`` or ``{"checkpoint": "<URI>"}``: serve those weights; hold promotions until unpin."""
        async def handle():
            return await self.learner.pin(await self._json(request))
        return await self._endpoint(request, "admin", handle)

    @api.post("/v1/admin/policy/unpin")
    async def admin_unpin(self, request: Request):
        """Release a pin: the promotion gate decides again at its next evaluation."""
        return await self._endpoint(request, "admin", self.learner.unpin)

    @api.get("/v1/admin/models")
    async def admin_models(self, request: Request):
        """The pool (identity policies): models, prices, fresh or not, registry version."""
        return await self._endpoint(request, "admin", self.pool.list)

    @api.post("/v1/admin/models")
    async def admin_add_model(self, request: Request):
        """Add a model from quiz answers, a live quiz through its upstream, or an identity (serve/pool_admin.py)."""
        async def handle():
            return JSONResponse(await self.pool.add(await self._json(request)), status_code=201)
        return await self._endpoint(request, "admin", handle)

    @api.patch("/v1/admin/models/{name:path}")
    async def admin_price_model(self, request: Request, name: str):
        """``{"price": USD per call}``."""
        async def handle():
            return await self.pool.set_price(name, await self._json(request))
        return await self._endpoint(request, "admin", handle)

    @api.delete("/v1/admin/models/{name:path}")
    async def admin_remove_model(self, request: Request, name: str):
        async def handle():
            return await self.pool.remove(name)
        return await self._endpoint(request, "admin", handle)

    def __del__(self):
        if isinstance(getattr(self, "router", None), RouterService):
            try:
                self.router.close()
            except Exception:  # noqa: BLE001
                pass
