"""`banditroute up`: the whole online-learning loop on a local Ray, driven by replayed traffic.

What runs (all on one Ray; every actor is named, detached and restartable):

  replay driver --HTTP--> Serve ingress --> Router replicas (N) --decisions--> feedback actor
       |                                        ^                                  |  durable Parquet log
       +--POST /v1/feedback (logged outcome)----|--------------------------------->|  then ack
                                                |                                  v batches
                                 parameter server <--publish-- learner actor (RLlib TorchLearner)
                                        (replicas long-poll it and swap weights between batches)

The run reads the application config (cluster/config.py) with this
command's defaults underneath (``UP_DEFAULTS``: 2 CPU replicas on loopback,
a free port, the loop on): start Ray, start the loop and deploy the router
(cluster/online.py, cluster/app.py), wait until it is healthy, drive the
replay traffic (cluster/traffic.py) with a progress view, then settle
(drain the feedback actor, wait for every replica to serve the final
version) and write ``summary.json`` and ``learning_curve.png``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import os
import socket
import time
from datetime import datetime
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from banditroute.cluster.app import resolve_app, router_application
from banditroute.cluster.cold_start import starting_policy
from banditroute.cluster.config import (
    AppConfig, OnlineConfig, UpConfig, app_config_from_merged, deep_merge, merge_app_data, read_app_yaml,
)
from banditroute.cluster.launch import start_ray
from banditroute.cluster.online import OnlineLoop, start_online_loop
from banditroute.cluster.plotting import plot_learning_curve
from banditroute.cluster.progress_view import ProgressView
from banditroute.cluster.traffic import TrafficState, drive_traffic
from banditroute.core.config import ConfigError, from_dict

logger = logging.getLogger(__name__)

UP_DEFAULTS: dict[str, Any] = {
    "router": {
        "app_name": "banditroute-up", "host": "127.0.0.1", "port": 0, "num_replicas": 2, "num_cpus": 0.5,
        "num_gpus": 0.0, "ingress_num_cpus": 0.1, "torch_threads": 1, "seed": 0, "default_mode": "explore",
        "weights_poll_timeout_s": 5.0,
    },
    "online": {"enabled": True, "learner_num_cpus": 0.0, "feedback_num_cpus": 0.0},
}
"""`banditroute up`'s defaults, under the config file: ``router.port`` 0 = a free port (or the running Serve's)."""

LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")
ONLINE_REQUIRED = "online.enabled: `banditroute up` runs the online loop; it cannot be false here"


def load_up_config(
    path: str | os.PathLike | None = None,
    overrides: Mapping[str, Any] | None = None,
    environ: Mapping[str, str] | None = None,
    now: datetime | None = None,
) -> AppConfig:
    """The application config of an `up` run: ``UP_DEFAULTS`` < the YAML file < env vars < overrides.

    Without a ``storage.uri`` anywhere, each run gets fresh storage:
    ``<up.out>/storage/run-<time>`` (absolute).
    """
    merged = merge_app_data(deep_merge(UP_DEFAULTS, read_app_yaml(path)), overrides, environ)
    online = merged.get("online")
    if isinstance(online, dict) and not from_dict(OnlineConfig, online, prefix="online").enabled:
        raise ConfigError(ONLINE_REQUIRED)  # before the router section fails for want of a policy source
    storage = merged.setdefault("storage", {})
    if isinstance(storage, dict) and "uri" not in storage:
        up = merged.get("up") if isinstance(merged.get("up"), dict) else {}
        out = Path(str(up.get("out", UpConfig.out))).expanduser()
        storage["uri"] = str((out / "storage" / (now or datetime.now()).strftime("run-%Y%m%d-%H%M%S")).resolve())
    return app_config_from_merged(merged)


def check_up(app: AppConfig) -> None:
    """What `up` needs beyond a valid AppConfig: the loop on, and the router on loopback (the driver's only route)."""
    if not app.online.enabled:
        raise ValueError(ONLINE_REQUIRED)
    if app.router.host not in LOOPBACK_HOSTS:
        raise ValueError("router.host: the replay driver talks to the router on loopback only (127.0.0.1)")


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def serve_http_port() -> int | None:
    """Port of an already running Serve HTTP proxy in this Ray cluster, if any."""
    try:
        from ray.serve.context import _get_global_client

        client = _get_global_client()
        if client is None:
            return None
        return int(client.http_config.port)
    except Exception:  # noqa: BLE001
        return None


def wait_healthy(base_url: str, timeout_s: float) -> dict[str, Any]:
    """GET ``base_url``/healthz until it answers 200; its JSON (models, policy_version, ...)."""
    import httpx

    deadline = time.monotonic() + timeout_s
    last = None
    while time.monotonic() < deadline:
        try:
            r = httpx.get(base_url + "/healthz", timeout=5.0, trust_env=False)
            if r.status_code == 200:
                return r.json()
            last = f"HTTP {r.status_code}"
        except httpx.HTTPError as exc:
            last = type(exc).__name__
        time.sleep(0.5)
    raise RuntimeError(f"the router at {base_url} did not become healthy within {timeout_s:.0f}s ({last})")


def run_up(app: AppConfig) -> dict[str, Any]:
    """Start everything, drive traffic, stop, write summary.json and learning_curve.png; returns the summary."""
    check_up(app)
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one INFO line per request otherwise
    for var, value in (("RAY_AUTH_MODE", "disabled"), ("RAY_USAGE_STATS_ENABLED", "0"), ("HF_HUB_OFFLINE", "1"),
                       ("TOKENIZERS_PARALLELISM", "false")):
        os.environ.setdefault(var, value)
    from banditroute.core.data import load_routing_data, resolve_data_path

    up = app.up
    out = Path(up.out).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    data_path = resolve_data_path(up.data)
    data = load_routing_data(data_path)
    warm_start = app.online.initial_policy or app.router.policy
    policy = starting_policy(data, up.cold_start, up.seed, warm_start, app.storage)
    print(f"banditroute up: {len(data)} prompts x {data.n_models} models from {data_path}; "
          f"{'warm start from ' + warm_start if warm_start else 'cold start (random weights)'} v{policy.policy_version}, "
          f"encoder {policy.meta.encoder.name}, tau={policy.tau:.6g}; storage {app.storage.uri}", flush=True)

    import ray

    init_kwargs: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False}
    if app.start.mode == "local" and app.start.num_cpus is None:
        needed = app.router.num_replicas * app.router.num_cpus + 2
        init_kwargs["num_cpus"] = int(math.ceil(max(float(os.cpu_count() or 1), needed)))
    owns_ray = start_ray(app, **init_kwargs)
    try:
        return _run_on_ray(app, data, policy, out, owns_ray)
    finally:
        if owns_ray:
            # ray.shutdown() takes Serve down with the cluster (serve.shutdown() first only adds a
            # noisy "graceful_shutdown failed" line from the killed controller).
            ray.shutdown()


def _run_on_ray(app: AppConfig, data, policy, out: Path, owns_ray: bool) -> dict[str, Any]:
    import ray
    from ray import serve

    up = app.up
    app = resolve_app(app)
    loop: OnlineLoop | None = None
    app_deployed = False
    try:
        loop = start_online_loop(app, policy.state())
        router = loop.router
        port = serve_http_port()
        if port is None:
            port = router.port or free_port(router.host)
            serve.start(http_options={"host": router.host, "port": port})
        router.port = port
        serve.run(router_application(router), name=router.app_name, route_prefix=router.route_prefix, blocking=False)
        app_deployed = True
        base_url = f"http://{router.host}:{port}{router.route_prefix.rstrip('/')}"
        health = wait_healthy(base_url, up.ready_timeout_s)
        pool = list(health["models"])
        print(f"router ready at {base_url} ({router.num_replicas} replicas, policy v{health['policy_version']}); "
              f"driving {up.max_decisions or 'unlimited'} decisions with {up.concurrency} in flight", flush=True)

        state = TrafficState(list(data.models), min(up.curve_window, max(1, up.max_decisions or up.curve_window)))
        version_curve: list[list[float]] = []
        view = ProgressView(state, up.max_decisions)
        replica_max_age_s = 3 * router.weights_poll_timeout_s  # live replicas report at least every poll timeout
        started = time.monotonic()
        try:
            asyncio.run(_drive_with_progress(up, base_url, data, policy.tau, pool, state, view, loop, version_curve,
                                             replica_max_age_s))
        except KeyboardInterrupt:  # Ctrl-C: stop the traffic, still drain and write the summary (a 2nd Ctrl-C aborts)
            print("\nbanditroute up: stopping the traffic; draining and writing the summary", flush=True)
        drive_s = time.monotonic() - started

        # Drain: every acknowledged event to the learner, then wait for every replica to serve the final version.
        ray.get(loop.feedback.flush.remote(up.settle_timeout_s))
        final_status = ray.get(loop.learner.status.remote())
        final_version = int(final_status["policy_version"])
        replica_versions = _wait_replicas(loop.parameter_server, final_version, router.num_replicas, up.settle_timeout_s,
                                          replica_max_age_s)
        checkpoint = ray.get(loop.learner.shutdown.remote())
        summary = _summary(app, loop, state, policy, drive_s, final_status, replica_versions, checkpoint)
        (out / "summary.json").write_text(json.dumps(summary, indent=2))
        plot_learning_curve(
            out / "learning_curve.png", state.reward_curve, version_curve,
            f"banditroute up: {'cold' if summary['cold_start'] else 'warm'} start, {policy.meta.encoder.name} encoder, "
            f"{router.num_replicas} replicas",
        )
        _print_done(summary, state)
        print(out / "summary.json", flush=True)
        return summary
    finally:
        if app_deployed and not owns_ray:
            try:
                serve.delete(app.router.app_name)
            except Exception:  # noqa: BLE001
                pass
        for handle in (loop.handles.values() if loop is not None else ()):
            try:
                ray.kill(handle, no_restart=True)
            except Exception:  # noqa: BLE001
                pass


async def _drive_with_progress(up: UpConfig, base_url, data, tau, pool, state, view, loop: OnlineLoop, version_curve,
                               replica_max_age_s: float) -> None:
    stop = asyncio.Event()
    driver = asyncio.create_task(
        drive_traffic(base_url, data, tau, pool, state, up.max_decisions, up.concurrency, up.seed, up.max_error_fraction, stop)
    )
    ps = loop.parameter_server
    try:
        while not driver.done():
            await asyncio.wait({driver}, timeout=up.progress_interval_s)
            try:
                version, replicas, lstat, fstat = await asyncio.gather(
                    ps.latest_version.remote(), ps.replica_versions.remote(replica_max_age_s),
                    loop.learner.status.remote(), loop.feedback.stats.remote(),
                )
            except Exception:  # noqa: BLE001 - an actor restarting: show what we have
                version, replicas, lstat, fstat = -1, {}, None, None
            version_curve.append([state.decisions, version])
            view.update(version, replicas, lstat, fstat)
        await driver
    except (KeyboardInterrupt, asyncio.CancelledError):
        stop.set()
        await driver
    if state.route_errors + state.feedback_errors and stop.is_set() and up.max_decisions and state.decisions < up.max_decisions:
        raise RuntimeError(f"too many failed requests ({state.route_errors} route, {state.feedback_errors} feedback); last: {state.last_error}")


def _summary(app: AppConfig, loop: OnlineLoop, state: TrafficState, policy, drive_s: float, final_status: dict[str, Any],
             replica_versions: dict[str, int], checkpoint: Any) -> dict[str, Any]:
    """summary.json: the run's counts, curve, latencies, learner and feedback state."""
    import ray

    fb_stats = ray.get(loop.feedback.stats.remote())
    return {
        "decisions": state.decisions,
        "rewards_acknowledged": state.rewards_acknowledged,
        "events_in_log": int(ray.get(loop.feedback.events_in_log.remote())),
        "policy_version_start": int(loop.learner_status["start_version"]),
        "policy_version_end": int(final_status["policy_version"]),
        "replica_versions": replica_versions,
        "reward_curve": state.reward_curve,
        "reward_curve_window": state.window,
        "mean_reward": float(np.mean(state.rewards)) if state.rewards else None,
        "final_running_reward": state.running_reward if state.rewards else None,
        "decisions_per_s": state.decisions / drive_s if drive_s > 0 else None,
        "drive_seconds": drive_s,
        "route_latency_ms": _percentiles(state.route_ms),
        "feedback_latency_ms": _percentiles(state.feedback_ms),
        "feedback_status": dict(state.feedback_status),
        "route_errors": state.route_errors,
        "last_error": state.last_error,
        "learner": {k: final_status.get(k) for k in ("updates", "events_trained", "events_held_out", "skipped",
                                                     "publish_errors", "serving_version", "candidate_version")},
        "promotion": _gate_summary(final_status.get("promotion") or {}),
        "feedback": {k: v for k, v in fb_stats.items() if k != "last_learner_metrics"},
        "traffic_share_final": state.share(state.window),
        "encoder": policy.meta.encoder.name,
        "replicas": app.router.num_replicas,
        "cold_start": (app.online.initial_policy or app.router.policy) is None,
        "storage": ray.get(loop.feedback.log_uri.remote()),
        "checkpoint": checkpoint,
        "tau": policy.tau,
    }


def _print_done(summary: dict[str, Any], state: TrafficState) -> None:
    print(f"done: {state.decisions} decisions, {state.rewards_acknowledged} rewards acknowledged, "
          f"{summary['events_in_log']} events in the log, policy v{summary['policy_version_start']} -> "
          f"v{summary['policy_version_end']}, replicas {sorted(set(summary['replica_versions'].values()))}; "
          f"running reward {summary['final_running_reward']}", flush=True)
    gate = summary["promotion"]
    if gate.get("enabled"):
        print(f"promotion gate: candidate v{summary['learner']['candidate_version']}, serving v{summary['policy_version_end']}; "
              f"{gate['promoted_recent']} of the last {gate['checks_recent']} checks promoted; last: {gate['last_reason']}",
              flush=True)


def _gate_summary(promotion: dict[str, Any]) -> dict[str, Any]:
    """The promotion gate in the summary: on/off, how many checks promoted, the last decision's reason."""
    gates = [r for r in promotion.get("history") or [] if r.get("action") == "gate"]
    last = promotion.get("last_decision") or {}
    return {
        "enabled": promotion.get("enabled"),
        "checks_recent": len(gates),
        "promoted_recent": sum(bool(r.get("promote")) for r in gates),
        "holdout_events": promotion.get("holdout_events"),
        "last_reason": last.get("reason"),
    }


def _percentiles(values: list[float]) -> dict[str, float] | None:
    if not values:
        return None
    arr = np.asarray(values)
    return {"p50": float(np.percentile(arr, 50)), "p99": float(np.percentile(arr, 99)), "mean": float(arr.mean())}


def _wait_replicas(ps, version: int, replicas: int, timeout_s: float, max_age_s: float) -> dict[str, int]:
    """Replica -> version it serves, once the newest ``replicas`` of them serve ``version`` (or at the timeout)."""
    import ray

    deadline = time.monotonic() + timeout_s
    versions: dict[str, int] = {}
    while time.monotonic() < deadline:
        versions = ray.get(ps.replica_versions.remote(max_age_s))
        newest = sorted(versions.values())[-replicas:]
        if len(versions) >= replicas and all(v >= version for v in newest):
            break
        time.sleep(0.2)
    return versions
