"""RouterService: what a replica that decides runs around its RouterCore.

One class, hosted by whichever replica decides (``RouterConfig.placement``):
the ``Router`` deployment (serve/router.py, ``placement: replica``) or the
``RouterIngress`` itself (serve/ingress.py, ``placement: inline``). Both get
the same behaviour from here:

- the RouterCore, from a checkpoint or the parameter server's newest snapshot;
- batching: ``route`` is ``@serve.batch``-ed, so concurrent single requests
  are decided in one forward (``max_batch_size``, ``batch_wait_timeout_s``,
  live through :meth:`set_batching`); ``route_group`` does the same for
  groups of requests that ingress replicas gathered (one call per group, so
  a Router replica pays per group, not per request, and groups from several
  ingresses share a forward); ``route_many`` decides a bulk call in chunks
  of ``max_batch_size``;
- the decision log BEFORE the answer: a batch's decisions are appended to the
  decision sink before any of them is answered; a failed append answers 503
  to every request of the batch (never acknowledge what may be lost). Two
  batches are in flight at most (``PIPELINE_DEPTH``): one thread decides the
  next batch while another makes the previous one's decisions durable (an
  fsync, a call to the feedback actor), in the order they were decided;
  ``log`` appends decisions made with ``log=False`` (chat completions: once
  the upstream answered, with its cost);
- the weights refresh: a background task long-polls the parameter server and
  swaps newer weights between batches (every row of a batch is decided by one
  version), reporting the version this replica serves (also its heartbeat);
- metrics, and the ``info`` fields of /healthz.

Answers are ``{"response": ...}`` or ``{"error": {"status", "field",
"message"}}`` (``protocol.router_error`` turns the latter into the HTTP
error); decision ids are raw here, the ingress signs them.

``@serve.batch`` keeps ONE queue per process (per decorated function, not per
object): a replica hosts one RouterService. It needs a Serve replica to run
in; outside one (tests, local testing mode) call ``route_many``.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import ray
from ray import serve

from banditroute.core.records import NonFiniteWeightsError, WeightsSnapshot
from banditroute.policy.encoders import resolve_device
from banditroute.serve.config import RouterConfig
from banditroute.serve.core import RouteResult, RouterCore, decision_batch
from banditroute.serve.decision_sinks import make_decision_sink
from banditroute.serve.pinned_arms import load_pinned_arms
from banditroute.serve.metrics import BATCH_BOUNDARIES, LATENCY_BOUNDARIES_MS, metric, stage_histogram
from banditroute.serve.protocol import RequestError, RouteRequest
from banditroute.serve.stages import StageClock
from banditroute.serve.tokens import PromptTokenizer

logger = logging.getLogger("banditroute.serve")

INITIAL_WEIGHTS_TIMEOUT_S = 120.0
"""How long a replica without a checkpoint waits for the parameter server's first weights."""
PIPELINE_DEPTH = 2
"""Batches in flight per replica: one being decided, one being logged (decide and log run on one thread each)."""


def group_rows(groups: list[list[RouteRequest]]) -> int:
    """Size of a batch of request groups for ``@serve.batch``: its requests."""
    return sum(len(group) for group in groups)


def thread_settings(cfg: RouterConfig) -> int:
    """Set the tokenizer's parallelism for this process and return torch's thread count (0 = untouched)."""
    on_gpu = resolve_device(cfg.device).startswith("cuda")
    parallel = cfg.tokenizers_parallelism if cfg.tokenizers_parallelism is not None else on_gpu
    os.environ["TOKENIZERS_PARALLELISM"] = "true" if parallel else "false"  # read when the tokenizer first runs
    return cfg.torch_threads or (0 if on_gpu else max(1, round(cfg.num_cpus)))


def initial_snapshot(cfg: RouterConfig) -> WeightsSnapshot:
    """The parameter server's newest weights (waits up to INITIAL_WEIGHTS_TIMEOUT_S for a first publish)."""
    actor = ray.get_actor(cfg.parameter_server_name, namespace=cfg.parameter_server_namespace)
    snap = ray.get(actor.wait_for_newer.remote(-1, INITIAL_WEIGHTS_TIMEOUT_S))
    if snap is None:
        raise RuntimeError(f"no policy: parameter server {cfg.parameter_server_name!r} has no weights yet")
    return snap


def build_core(cfg: RouterConfig) -> RouterCore:
    """The RouterCore ``cfg`` describes: its checkpoint, else the parameter server's newest snapshot."""
    options = {"device": cfg.device, "seed": cfg.seed, "torch_threads": thread_settings(cfg),
               "exploration_floor": cfg.exploration_floor, "exploration_ceiling": cfg.exploration_ceiling}
    if cfg.policy is not None:
        return RouterCore.from_checkpoint(cfg.policy, **options)
    return RouterCore.from_snapshot(initial_snapshot(cfg), **options)


class RouterService:
    """A RouterCore with batching, the decision log before the answer, the weights refresh and metrics."""

    def __init__(self, cfg: RouterConfig, replica_id: str, core: RouterCore | None = None):
        self.cfg = cfg
        self.replica_id = replica_id
        self.core = core if core is not None else build_core(cfg)
        self.core.experiments = list(cfg.experiments)
        self.core.pinned = load_pinned_arms(cfg.experiments, cfg.pinned_storage, self.core)  # errors name the arm
        self.stages = StageClock(stage_histogram())
        self.core.stages = self.stages
        self.sink = make_decision_sink(cfg.decision_sink, cfg.decision_sink_options)
        # One thread each, so decisions are made, and logged, in order; the two stages overlap across batches.
        self._decide_executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="router-decide")
        self._log_executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="router-log")
        self._poll_task: asyncio.Task | None = None
        self._rejected_version = -1
        self.batches_run = 0
        self.rows_decided = 0
        self.set_batching(cfg.max_batch_size, cfg.batch_wait_timeout_s)

        self.m_decisions = metric("counter", "banditroute_decisions_total", "Routing decisions by chosen model, mode and tenant.",
                                  ("model", "mode", "tenant"))
        self.m_batch = metric("histogram", "banditroute_batch_size", "Requests per inference batch.", (), BATCH_BOUNDARIES)
        self.m_infer = metric("histogram", "banditroute_inference_ms", "Encoder + policy + logging time per batch (ms).", (), LATENCY_BOUNDARIES_MS)
        self.m_version = metric("gauge", "banditroute_policy_version", "Policy version served by this replica.", ("replica_id",))
        self.m_swaps = metric("counter", "banditroute_weight_swaps_total", "Weight snapshots installed.", ())
        self.m_rejected = metric("counter", "banditroute_weights_rejected_total",
                                 "Weight snapshots refused (non-finite values, another encoder or width); the old weights kept serving.",
                                 ("reason",))
        self.weights_rejected = 0
        self.m_sink_errors = metric("counter", "banditroute_decision_sink_errors_total", "Failed decision-log appends.", ())
        self.m_version.set(self.core.policy_version, tags={"replica_id": self.replica_id})
        self.start_poller()
        logger.info("replica %s serving policy v%d on %s", self.replica_id, self.core.policy_version, self.core.device)

    def set_batching(self, max_batch_size: int | None = None, batch_wait_timeout_s: float | None = None) -> None:
        """The batching knobs (live: the Router deployment's ``reconfigure`` calls this)."""
        for batched in (self.route, self._route_groups):
            if max_batch_size is not None:
                self.cfg.max_batch_size = int(max_batch_size)
                batched.set_max_batch_size(int(max_batch_size))
            if batch_wait_timeout_s is not None:
                self.cfg.batch_wait_timeout_s = float(batch_wait_timeout_s)
                batched.set_batch_wait_timeout_s(float(batch_wait_timeout_s))

    # -- deciding --

    async def _decide_and_log(self, reqs: list[RouteRequest]) -> list[RouteResult]:
        """One batch decided on the decide thread, then one durable append of its decisions on the log thread."""
        loop = asyncio.get_running_loop()
        results = await loop.run_in_executor(self._decide_executor, self.core.route_batch, reqs)
        to_log = [r for r, q in zip(results, reqs) if r.ok and q.log]
        if to_log:
            try:
                await loop.run_in_executor(self._log_executor, self._emit, to_log)
            except Exception as exc:  # noqa: BLE001 - never acknowledge what may be lost
                logger.exception("decision sink failed")
                self.m_sink_errors.inc()
                error = RequestError(503, None, f"decision log unavailable: {exc}").to_router()
                for r, q in zip(results, reqs):
                    if r.ok and q.log:
                        r.error = error
        return results

    def _emit(self, results: list[RouteResult], upstream_costs: list[float | None] | None = None,
              served_models: list[str | None] | None = None) -> None:
        with self.stages.stage("log"):
            self.sink.emit_table(decision_batch(results, upstream_costs, served_models))

    def _package(self, result: RouteResult, req: RouteRequest) -> dict[str, Any]:
        if not result.ok:
            return {"error": result.error, "replica_id": self.replica_id}
        out = {"response": dict(result.response(), replica_id=self.replica_id)}
        if not req.log:
            out["result"] = result  # the caller logs it later (with the upstream's cost)
        return out

    async def _run_batch(self, reqs: list[RouteRequest]) -> list[dict[str, Any]]:
        start = time.perf_counter()
        try:
            results = await self._decide_and_log(reqs)
        except Exception as exc:  # noqa: BLE001 - a broken batch must not take the replica down
            logger.exception("routing batch failed")
            error = RequestError(500, None, f"routing failed: {exc}").to_router()
            return [{"error": error, "replica_id": self.replica_id}] * len(reqs)
        self.m_batch.observe(len(reqs))
        self.batches_run += 1
        self.rows_decided += len(reqs)
        self.m_infer.observe((time.perf_counter() - start) * 1000.0)
        counts = Counter((r.model, r.mode, r.decision.tenant) for r in results if r.ok)  # type: ignore[union-attr]
        for (model, mode, tenant), n in counts.items():  # one metric update per (model, mode, tenant) of the batch
            self.m_decisions.inc(n, tags={"model": model, "mode": mode, "tenant": tenant})
        return [self._package(r, q) for r, q in zip(results, reqs)]

    @serve.batch(max_batch_size=64, batch_wait_timeout_s=0.002, max_concurrent_batches=PIPELINE_DEPTH)
    async def route(self, reqs: list[RouteRequest]) -> list[dict[str, Any]]:
        """One request per call; Serve gathers concurrent calls into ``reqs``."""
        self.start_poller()
        return await self._run_batch(reqs)

    async def route_group(self, reqs: list[RouteRequest]) -> list[dict[str, Any]]:
        """Requests an ingress gathered: batched with concurrent groups (a group larger than a batch goes alone)."""
        if len(reqs) > self.cfg.max_batch_size:  # @serve.batch refuses an item larger than its batch
            return await self.route_many(reqs)
        return await self._route_groups(reqs)

    @serve.batch(max_batch_size=64, batch_wait_timeout_s=0.002, max_concurrent_batches=PIPELINE_DEPTH, batch_size_fn=group_rows)
    async def _route_groups(self, groups: list[list[RouteRequest]]) -> list[list[dict[str, Any]]]:
        """One group per call; Serve gathers concurrent groups into ``groups`` (max_batch_size requests at most)."""
        self.start_poller()
        flat = await self.route_many([req for group in groups for req in group])
        out, start = [], 0
        for group in groups:
            out.append(flat[start : start + len(group)])
            start += len(group)
        return out

    async def route_many(self, reqs: list[RouteRequest]) -> list[dict[str, Any]]:
        """A whole bulk call, decided in chunks of max_batch_size (one forward each)."""
        self.start_poller()
        out: list[dict[str, Any]] = []
        size = self.cfg.max_batch_size
        for start in range(0, len(reqs), size):
            out.extend(await self._run_batch(reqs[start : start + size]))
        return out

    async def log(self, results: list[RouteResult], upstream_costs: list[float | None],
                  served_models: list[str | None] | None = None) -> None:
        """Durably log decisions made with ``log=False`` (raises if the sink fails)."""
        if results:
            await asyncio.get_running_loop().run_in_executor(self._log_executor, self._emit, results, upstream_costs, served_models)

    async def info(self) -> dict[str, Any]:
        self.start_poller()
        return {
            "replica_id": self.replica_id,
            "policy_version": self.core.policy_version,
            "policy_kind": getattr(self.core.policy, "kind", None),  # barp | value | identity
            "models": self.core.models,
            "encoder_id": self.core.encoder_id,
            "device": str(self.core.device),
            "tau": getattr(self.core.policy, "tau", None),  # the reward's cost scale (experiment reports)
            "default_w_cost": self.cfg.default_w_cost(),
            "default_mode": self.cfg.default_mode,
            "max_prompt_chars": self.cfg.max_prompt_chars,
            "batches_run": self.batches_run,
            "weights_rejected": self.weights_rejected,
            "mean_batch_size": self.rows_decided / self.batches_run if self.batches_run else None,
            "tokenizes": self.core.tokenizer is not None,
        }

    def host_tokenizer(self) -> PromptTokenizer | None:
        """This replica's tokenizer without the encoder's weights (for ingress replicas); None when the encoder takes text."""
        return self.core.tokenizer.without_model() if self.core.tokenizer is not None else None

    # -- weights refresh --

    def start_poller(self) -> None:
        """Start the weights long-poll once an event loop runs (idempotent; restarted if it ended)."""
        if self.cfg.parameter_server_name is None or (self._poll_task is not None and not self._poll_task.done()):
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return  # no loop yet (constructed outside one): started on the first call
        self._poll_task = loop.create_task(self._poll_weights())

    async def _poll_weights(self) -> None:
        """Long-poll the ParameterServer forever; swap newer weights; report what this replica serves."""
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
                        self.weights_rejected += 1
                        self.m_rejected.inc(tags={"reason": "non_finite" if isinstance(exc, NonFiniteWeightsError) else "incompatible"})
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

    def close(self) -> None:
        if self._poll_task is not None:
            self._poll_task.cancel()
        self.sink.close()
