"""Fault scenarios on a local Ray (loopback only), shared by tests/test_faults.py and bench/faults.py.

Each scenario starts the whole loop (parameter server, learner, feedback
actor, a 2-replica Router app), drives traffic with the documented client
retry policy (``serve/http_client.py``), injects one fault mid-stream and
returns one row: the fault, requests sent (route + feedback), failed (after
retries), rewards acknowledged (first answer "accepted"), rewards found in
the durable log (of the recorded ones, each exactly once), seconds to
recover, plus scenario details. Callers need Ray initialised and Serve
running on ``127.0.0.1:<port>``.
"""

from __future__ import annotations

import asyncio
import os
import threading
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from banditroute.feedback.log import EventLog
from banditroute.serve.http_client import RequestFailed, RetryPolicy, RouterClient
from banditroute.core.storage import StorageConfig, open_storage
from banditroute.testkit.synthetic import make_routing_data


def wait_for(predicate: Callable[[], Any], timeout_s: float, interval_s: float = 0.1, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout_s
    last = None
    while time.monotonic() < deadline:
        try:
            last = predicate()
        except Exception as exc:  # noqa: BLE001 - an actor restarting
            last = exc
        if last and not isinstance(last, Exception):
            return last
        time.sleep(interval_s)
    raise AssertionError(f"timed out after {timeout_s:.0f}s waiting for {what} (last: {last!r})")


def raw_id(decision_id: str) -> str:
    """The logged decision id behind what a client holds (a signed ``br1.`` token or the raw id)."""
    if not decision_id.startswith("br1."):
        return decision_id
    from banditroute.core.security import verify

    secrets_ = [s for s in os.environ.get("BANDITROUTE_TOKEN_SECRET", "").split(",") if s]
    return verify(decision_id, secrets_, time.time()).decision_id


def learner_version(status: dict[str, Any]) -> int:
    """The learner's newest trained version (its candidate, where a promotion gate holds serving back)."""
    return int(status.get("candidate_version", status["policy_version"]))


def wait_restarted(call: Callable[[], Any], timeout_s: float = 60.0) -> Any:
    """After ray.kill(..., no_restart=False): wait until a call fails (the old process is gone), then succeeds."""
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        try:
            call()
        except Exception:  # noqa: BLE001 - the kill has taken effect
            break
        time.sleep(0.02)
    return wait_for(call, timeout_s, 0.05, what="the actor's restart")


# --- the loop under test ---------------------------------------------------------------


@dataclass
class Loop:
    base: str
    names: dict[str, str]
    ps: Any
    learner: Any
    feedback: Any
    storage: StorageConfig
    feedback_storage: StorageConfig
    app: str
    data: Any
    start_version: int

    def stop(self) -> None:
        import ray
        from ray import serve

        try:
            serve.delete(self.app)
        except Exception:  # noqa: BLE001
            pass
        for handle in (self.feedback, self.learner, self.ps):
            try:
                ray.kill(handle, no_restart=True)
            except Exception:  # noqa: BLE001
                pass


def start_loop(port: int, workdir: str, feedback_storage: StorageConfig | None = None,
               feedback: dict[str, Any] | None = None, replicas: int = 2, router: dict[str, Any] | None = None,
               before_serve: Callable[[], Any] | None = None, learner_config: dict[str, Any] | None = None) -> Loop:
    """Parameter server + learner + feedback actor with unique names, and a Router app on ``port``.

    ``router`` / ``learner_config`` override RouterConfig / learner config fields; ``before_serve`` runs after the actors exist and before the
    app is deployed (the two-node scenario adds its worker node there, so the actors stay on the head)."""
    import ray
    from ray import serve

    from banditroute.cluster.app import router_application
    from banditroute.cluster.online import wire_router
    from banditroute.cluster.up import wait_healthy
    from banditroute.core.actors import get_or_create_detached_actor
    from banditroute.core.names import NAMESPACE, ActorNames
    from banditroute.feedback.actor import FeedbackActor
    from banditroute.learner.actor_handles import get_or_create_learner_actor
    from banditroute.learner.param_server import get_or_create_parameter_server
    from banditroute.serve.config import RouterConfig
    from banditroute.serve.testing import hashing_policy

    # The actors by hand, not cluster.online.start_online_loop: the faults need the feedback actor on its own
    # storage and without task retries. The router is wired to them the one way (wire_router).
    prefix = f"f{uuid.uuid4().hex[:8]}"
    names = ActorNames.for_prefix(prefix)
    data = make_routing_data(60, seed=3)
    policy = hashing_policy(models=data.models, dim=64)
    storage = StorageConfig(uri=os.path.join(workdir, prefix, "storage"))
    feedback_storage = feedback_storage or storage
    ps = get_or_create_parameter_server(names.parameter_server, NAMESPACE, storage)
    learner_settings = {"checkpoint_every": 3, "replay_sample": 16, **(learner_config or {})}
    learner = get_or_create_learner_actor(
        learner_settings, storage, policy.state(), name=names.learner,
        parameter_server_name=names.parameter_server, num_cpus=0.1,
    )
    start = ray.get(learner.status.remote())["policy_version"]
    settings = {"learner_batch_size": 8, "learner_max_delay_s": 0.05, "unknown_grace_s": 0.5,
                "spool_uri": os.path.join(workdir, prefix, "spool"), "spool_drain_interval_s": 0.2}
    settings.update(feedback or {})
    fb = get_or_create_detached_actor(
        FeedbackActor, names.feedback, NAMESPACE, settings, feedback_storage, names.learner, NAMESPACE,
        max_concurrency=10_000, num_cpus=0.1, max_task_retries=0,
    )
    ray.get(fb.ping.remote())
    router_settings = dict(app_name=prefix, num_replicas=replicas, num_cpus=0.1, num_gpus=0.0, ingress_num_cpus=0.1,
                           torch_threads=1, seed=0, weights_poll_timeout_s=1.0)
    router_settings.update(router or {})
    router = RouterConfig(**router_settings)
    if before_serve is not None:
        before_serve()
    serve.run(router_application(wire_router(router, names)), name=prefix, route_prefix=f"/{prefix}", blocking=False)
    base = f"http://127.0.0.1:{port}/{prefix}"
    wait_healthy(base, 120)
    return Loop(base, names.as_dict(), ps, learner, fb, storage, feedback_storage, prefix, data, start)


# --- traffic with the client retry policy ---------------------------------------------------


@dataclass
class Traffic:
    sent: int = 0
    """Logical requests (route + feedback), each counted once however many tries it took."""
    failed: int = 0
    """Requests that failed for good (retries exhausted or a final error)."""
    retries: int = 0
    accepted: list[str] = field(default_factory=list)
    """Decision ids whose reward's answer was 'accepted'."""
    recorded: list[str] = field(default_factory=list)
    """Decision ids whose reward is recorded ('accepted', or 'duplicate' after a retry)."""
    duplicates: int = 0
    errors: list[str] = field(default_factory=list)
    done: int = 0
    routed: list[str] = field(default_factory=list)


async def drive(base: str, data, n: int, concurrency: int = 8, seed: int = 0, policy: RetryPolicy | None = None,
                pause_s: float = 0.0, inject: Callable[[Traffic], Any] | None = None) -> tuple[Traffic, Any]:
    """Route then reward ``n`` prompts with ``concurrency`` workers; ``inject(traffic)`` runs in a thread meanwhile."""
    rng = np.random.default_rng(seed)
    rows = rng.integers(len(data), size=n)
    w_cost = rng.uniform(size=n)
    traffic = Traffic()
    next_item = iter(range(n))

    async with RouterClient(base, policy or RetryPolicy(), timeout_s=30.0, seed=seed) as client:
        async def worker() -> None:
            for i in next_item:
                row = int(rows[i])
                traffic.sent += 1
                try:
                    d = await client.route({"prompt": data.prompts[row], "preference": {"quality": 1 - float(w_cost[i]), "cost": float(w_cost[i])},
                                            "mode": "explore"})
                except RequestFailed as exc:
                    traffic.failed += 1
                    traffic.errors.append(str(exc)[:300])
                    continue
                traffic.routed.append(d["decision_id"])
                k = data.models.index(d["model"])
                traffic.sent += 1
                try:
                    out = await client.feedback(d["decision_id"], float(data.scores[row, k]), float(data.costs[row, k]))
                except RequestFailed as exc:
                    traffic.failed += 1
                    traffic.errors.append(str(exc)[:300])
                    continue
                if out.status == "accepted":
                    traffic.accepted.append(d["decision_id"])
                elif out.status == "duplicate":
                    traffic.duplicates += 1
                if out.recorded:
                    traffic.recorded.append(d["decision_id"])
                traffic.done += 1
                if pause_s:
                    await asyncio.sleep(pause_s)

        fault = asyncio.create_task(asyncio.to_thread(inject, traffic)) if inject is not None else None
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        traffic.retries = client.retries
        injected = await fault if fault is not None else None
    return traffic, injected


def wait_until_done(traffic: Traffic, count: int, timeout_s: float = 60.0) -> None:
    wait_for(lambda: traffic.done >= count, timeout_s, 0.02, what=f"{count} rewarded requests")


def log_counts(storage: StorageConfig) -> Counter:
    # raw rows (no de-duplication by the reader): a reward written twice must show up here
    rows = EventLog(open_storage(storage)).read_events(columns=["decision_id"], dedupe=False)
    return Counter(rows.column("decision_id").to_pylist())


def in_log(traffic: Traffic, counts: Counter) -> tuple[int, int]:
    """(recorded rewards found in the log, recorded rewards found more than once)."""
    ids = [raw_id(t) for t in traffic.recorded]
    return sum(1 for i in ids if counts[i] >= 1), sum(1 for i in ids if counts[i] > 1)


def row(fault: str, traffic: Traffic, found: int, twice: int, recover_s: float, **extra: Any) -> dict[str, Any]:
    return {
        "fault": fault,
        "requests_sent": traffic.sent,
        "failed": traffic.failed,
        "retries": traffic.retries,
        "rewards_acknowledged": len(traffic.accepted),
        "rewards_recorded": len(traffic.recorded),
        "rewards_found_in_log": found,
        "rewards_logged_twice": twice,
        "duplicates_answered": traffic.duplicates,
        "recover_s": round(recover_s, 2),
        "errors": traffic.errors[:5],
        **extra,
    }


# --- the scenarios ------------------------------------------------------------------------


def router_replica_actors(app: str) -> list[tuple[str, str]]:
    """(name, namespace) of the app's Router replica actors."""
    import ray

    return [(a["name"], a["namespace"]) for a in ray.util.list_named_actors(all_namespaces=True)
            if a["name"].startswith("SERVE_REPLICA::") and f"{app}#Router#" in a["name"]]


def kill_router_replica(port: int, workdir: str, n: int = 120, concurrency: int = 8) -> dict[str, Any]:
    """Kill one of 2 Router replicas under load: no failed request; Serve restores it on the newest weights.

    The Router deployment exists with ``placement: replica`` (the GPU default for heavy encoders); on CPU
    the default is inline, where the deciding replica is the ingress (docs/serving.md, fault behaviour)."""
    import ray

    loop = start_loop(port, workdir, router={"placement": "replica"})
    try:
        before = router_replica_actors(loop.app)
        assert len(before) == 2, before

        def inject(traffic: Traffic) -> dict[str, Any]:
            wait_until_done(traffic, n // 3)
            name, namespace = before[0]
            t0 = time.monotonic()
            ray.kill(ray.get_actor(name, namespace=namespace), no_restart=True)

            def restored():
                now = router_replica_actors(loop.app)
                return len(now) == 2 and name not in {a for a, _ in now} and now

            now = wait_for(restored, 60, 0.1, what="Serve to restore the Router replica")
            return {"killed": name, "replaced_after_s": time.monotonic() - t0, "t0": t0, "replicas": now}

        traffic, info = asyncio.run(drive(loop.base, loop.data, n, concurrency, inject=inject))
        ray.get(loop.feedback.flush.remote(30.0))
        newest = ray.get(loop.ps.latest_version.remote())  # what replicas must serve (a promotion gate may hold back)

        def on_newest():
            versions = ray.get(loop.ps.replica_versions.remote(3.0))
            fresh = {k: v for k, v in versions.items() if k not in info["killed"]}
            return len(fresh) == 2 and all(v >= newest for v in fresh.values()) and fresh

        versions = wait_for(on_newest, 60, 0.2, what="both replicas (the new one included) on the newest version")
        recover_s = time.monotonic() - info["t0"]
        found, twice = in_log(traffic, log_counts(loop.storage))
        return row("router replica killed (ray.kill, 1 of 2)", traffic, found, twice, recover_s,
                   replica_replaced_s=round(info["replaced_after_s"], 2), newest_version=newest, replica_versions=versions)
    finally:
        loop.stop()


def kill_feedback_actor(port: int, workdir: str, n: int = 120, concurrency: int = 8) -> dict[str, Any]:
    """Kill the feedback actor mid-stream: every acknowledged reward is in the log once; retries are duplicates."""
    import ray

    loop = start_loop(port, workdir)
    try:
        def inject(traffic: Traffic) -> dict[str, Any]:
            wait_until_done(traffic, n // 3)
            t0 = time.monotonic()
            ray.kill(loop.feedback, no_restart=False)
            wait_restarted(lambda: ray.get(loop.feedback.ping.remote(), timeout=2) == "ok")
            return {"t0": t0, "actor_back_s": time.monotonic() - t0}

        traffic, info = asyncio.run(drive(loop.base, loop.data, n, concurrency, inject=inject))
        recover_s = info["actor_back_s"]
        # Replay every recorded reward once more through HTTP: all must be 'already recorded'.
        replay, _ = asyncio.run(_replay(loop.base, traffic.recorded[: min(20, len(traffic.recorded))]))
        counts = log_counts(loop.feedback_storage)
        found, twice = in_log(traffic, counts)
        stats = ray.get(loop.feedback.stats.remote())
        return row("feedback actor killed (ray.kill, restarted by Ray)", traffic, found, twice, recover_s,
                   replayed=len(replay), replayed_not_duplicate=[s for s in replay if s != "duplicate"],
                   recovered=stats.get("recovered"), log_rows=sum(counts.values()))
    finally:
        loop.stop()


async def _replay(base: str, ids: list[str]) -> tuple[list[str], None]:
    async with RouterClient(base, RetryPolicy()) as client:
        outs = [await client.feedback(i, 0.0) for i in ids]
    return [o.status for o in outs], None


def kill_learner(port: int, workdir: str, n: int = 120, concurrency: int = 8) -> dict[str, Any]:
    """Kill the learner: it resumes from the latest checkpoint; the policy version never goes backwards."""
    import ray

    loop = start_loop(port, workdir)
    samples: list[tuple[float, str, int]] = []
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            for what, fn in (("ps", lambda: ray.get(loop.ps.latest_version.remote(), timeout=2)),
                             ("learner", lambda: learner_version(ray.get(loop.learner.status.remote(), timeout=2)))):
                try:
                    samples.append((time.monotonic(), what, int(fn())))
                except Exception:  # noqa: BLE001 - restarting
                    pass
            time.sleep(0.05)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        def inject(traffic: Traffic) -> dict[str, Any]:
            wait_until_done(traffic, n // 2)
            before = ray.get(loop.learner.status.remote())
            checkpoint = ray.get(loop.learner.checkpoint.remote())  # the latest checkpoint is the state at the kill
            t0 = time.monotonic()
            ray.kill(loop.learner, no_restart=False)
            resumed = wait_restarted(lambda: ray.get(loop.learner.status.remote(), timeout=2))
            return {"t0": t0, "back_s": time.monotonic() - t0, "before": learner_version(before),
                    "checkpoint_version": int(str(checkpoint).rstrip("/").rsplit("v", 1)[-1]),
                    "resumed": learner_version(resumed), "resumed_start": resumed["start_version"]}

        traffic, info = asyncio.run(drive(loop.base, loop.data, n, concurrency, inject=inject))
        # More rewards after the restart, so the resumed learner must train on (and publish) new ones.
        extra, _ = asyncio.run(drive(loop.base, loop.data, 16, 4, seed=1))
        for name in ("sent", "failed", "retries", "duplicates", "done"):
            setattr(traffic, name, getattr(traffic, name) + getattr(extra, name))
        for name in ("accepted", "recorded", "errors", "routed"):
            getattr(traffic, name).extend(getattr(extra, name))
        ray.get(loop.feedback.flush.remote(30.0))
        after = wait_for(lambda: learner_version(s := ray.get(loop.learner.status.remote())) > info["resumed"] and s, 30, 0.2,
                         what="an update after the restart")
        stop.set()
        sampler.join(5)

        def went_back(which: str) -> int:
            seq = [v for _, w, v in sorted(samples) if w == which]
            return sum(1 for a, b in zip(seq, seq[1:]) if b < a)

        found, twice = in_log(traffic, log_counts(loop.storage))
        return row("learner killed (ray.kill, restarted by Ray)", traffic, found, twice, info["back_s"],
                   version_before_kill=info["before"], checkpoint_version=info["checkpoint_version"], version_resumed=info["resumed"], version_after=learner_version(after),
                   ps_version_decreases=went_back("ps"), learner_version_decreases=went_back("learner"),
                   version_samples=len(samples))
    finally:
        stop.set()
        loop.stop()


def s3_outage(port: int, workdir: str, proxy: Any, n: int = 120, concurrency: int = 8, outage_s: float = 4.0,
              spool_max_events: int = 60) -> dict[str, Any]:
    """S3 (moto behind a proxy) refuses connections for ``outage_s`` during traffic; the spool fills (503) and drains."""
    import httpx
    import ray

    feedback_storage = proxy.storage_config()
    loop = start_loop(port, workdir, feedback_storage=feedback_storage, feedback={"spool_max_events": spool_max_events})
    try:
        held = None
        with httpx.Client(base_url=loop.base, timeout=30, trust_env=False) as http:
            r = http.post("/v1/route", json={"prompt": loop.data.prompts[0], "mode": "explore"})
            assert r.status_code == 200, r.text
            held = r.json()["decision_id"]  # its reward is posted while the buffer is full

        def inject(traffic: Traffic) -> dict[str, Any]:
            wait_until_done(traffic, n // 4)
            proxy.down()
            t_down = time.monotonic()
            full = wait_for(lambda: (s := ray.get(loop.feedback.stats.remote()))["spool_full_rejections"] > 0 and s,
                            outage_s + 20, 0.05, what="the spool to fill")
            with httpx.Client(base_url=loop.base, timeout=30, trust_env=False) as http:
                pressure = http.post("/v1/feedback", json={"decision_id": held, "score": 1.0})
            time.sleep(max(0.0, outage_s - (time.monotonic() - t_down)))
            proxy.up()
            t_up = time.monotonic()
            drained = wait_for(lambda: (s := ray.get(loop.feedback.stats.remote()))["spool_depth"] == 0 and s, 60, 0.1,
                               what="the spool to drain")
            return {"t_up": t_up, "drain_s": time.monotonic() - t_up, "outage_s": t_up - t_down,
                    "pressure": (pressure.status_code, pressure.json(), pressure.headers.get("retry-after")),
                    "spool_full_rejections": full["spool_full_rejections"], "drained": drained["drained"]}

        traffic, info = asyncio.run(drive(loop.base, loop.data, n, concurrency, inject=inject))
        stats = wait_for(lambda: (s := ray.get(loop.feedback.stats.remote()))["spool_depth"] == 0 and s, 60, 0.1, what="final drain")
        found, twice = in_log(traffic, log_counts(feedback_storage))
        status, body, retry_after = info["pressure"]
        return row(f"S3 unavailable ({info['outage_s']:.1f} s, connections refused)", traffic, found, twice, info["drain_s"],
                   backpressure_status=status, backpressure_message=body.get("error", {}).get("message"),
                   backpressure_retry_after=retry_after, spool_max_events=spool_max_events,
                   spooled=stats["spooled"], drained=stats["drained"], spool_full_rejections=stats["spool_full_rejections"])
    finally:
        loop.stop()
