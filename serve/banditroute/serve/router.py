"""The ``Router`` deployment: batched inference, decisions logged before they are answered.

One RouterCore per replica (encoder + policy, GPU when given one).
``route`` is ``@serve.batch``-ed: concurrent requests are decided in one
forward and their DecisionRecords appended to the decision sink BEFORE any
of them is answered; a failed append answers 503 to every request of the
batch (never acknowledge what may be lost). ``route_many`` decides a bulk
call in chunks of ``max_batch_size``. With ``parameter_server_name`` set, a
background task long-polls the ParameterServer and swaps weights between
batches (every row of a batch is decided by one version).

Answers are ``{"response": ...}`` or ``{"error": {"status", "field",
"message"}}`` (``protocol.router_error`` turns the latter into the HTTP
error); the ingress (serve/ingress.py) signs the decision ids.
"""

# NOTE: @serve.deployment pickles the class when it is defined, together with the module
# globals its methods use AT THAT MOMENT: every helper it calls must be defined (or imported) above it.

from __future__ import annotations

import asyncio
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import ray
from ray import serve

from banditroute.core.records import WeightsSnapshot
from banditroute.policy.encoders import resolve_device
from banditroute.serve.config import RouterConfig, as_router_config
from banditroute.serve.core import RouteRequest, RouteResult, RouterCore, decision_batch
from banditroute.serve.decision_sinks import make_decision_sink
from banditroute.serve.metrics import BATCH_BOUNDARIES, LATENCY_BOUNDARIES_MS, metric, replica_id

logger = logging.getLogger("banditroute.serve")


def _thread_settings(cfg: RouterConfig) -> int:
    """Set the tokenizer's parallelism for this process and return torch's thread count (0 = untouched)."""
    on_gpu = resolve_device(cfg.device).startswith("cuda")
    parallel = cfg.tokenizers_parallelism if cfg.tokenizers_parallelism is not None else on_gpu
    os.environ["TOKENIZERS_PARALLELISM"] = "true" if parallel else "false"  # read when the tokenizer first runs
    return cfg.torch_threads or (0 if on_gpu else max(1, round(cfg.num_cpus)))


def _initial_state_from_parameter_server(cfg: RouterConfig) -> dict[str, Any]:
    """The parameter server's newest weights as a policy state (waits up to 120 s for a first publish)."""
    actor = ray.get_actor(cfg.parameter_server_name, namespace=cfg.parameter_server_namespace)
    snap = ray.get(actor.wait_for_newer.remote(-1, 120.0))
    if snap is None:
        raise RuntimeError(f"no policy: parameter server {cfg.parameter_server_name!r} has no weights yet")
    state = dict(snap.state)
    state["meta"] = dict(state["meta"], policy_version=snap.policy_version)
    return state


@serve.deployment(name="Router")
class Router:
    """Batched encoder + policy inference; logs every decision durably before answering."""

    def __init__(self, config: dict[str, Any]):
        self.cfg = as_router_config(config)
        self.replica_id = replica_id()
        threads = _thread_settings(self.cfg)
        options = {"device": self.cfg.device, "seed": self.cfg.seed, "torch_threads": threads,
                   "exploration_floor": self.cfg.exploration_floor, "exploration_ceiling": self.cfg.exploration_ceiling}
        if self.cfg.policy is not None:
            self.core = RouterCore.from_checkpoint(self.cfg.policy, **options)
        else:
            self.core = RouterCore.from_state(_initial_state_from_parameter_server(self.cfg), **options)
        self.sink = make_decision_sink(self.cfg.decision_sink, self.cfg.decision_sink_options)
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="router-infer")
        self._poll_task: asyncio.Task | None = None
        self._rejected_version = -1
        self.batches_run = 0
        self.rows_decided = 0
        self.route.set_max_batch_size(self.cfg.max_batch_size)
        self.route.set_batch_wait_timeout_s(self.cfg.batch_wait_timeout_s)

        self.m_decisions = metric("counter", "banditroute_decisions_total", "Routing decisions by chosen model and mode.", ("model", "mode"))
        self.m_batch = metric("histogram", "banditroute_batch_size", "Requests per inference batch.", (), BATCH_BOUNDARIES)
        self.m_infer = metric("histogram", "banditroute_inference_ms", "Encoder + policy + logging time per batch (ms).", (), LATENCY_BOUNDARIES_MS)
        self.m_version = metric("gauge", "banditroute_policy_version", "Policy version served by this replica.", ("replica_id",))
        self.m_swaps = metric("counter", "banditroute_weight_swaps_total", "Weight snapshots installed.", ())
        self.m_sink_errors = metric("counter", "banditroute_decision_sink_errors_total", "Failed decision-log appends.", ())
        self.m_version.set(self.core.policy_version, tags={"replica_id": self.replica_id})
        self._start_poller()
        logger.info("Router replica %s serving policy v%d on %s", self.replica_id, self.core.policy_version, self.core.device)

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
            self.sink.emit_table(decision_batch(results, upstream_costs, served_models))
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
            "default_w_cost": self.cfg.default_w_cost(),
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
