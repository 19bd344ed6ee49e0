"""`banditroute up`: the whole online-learning loop on a local Ray, driven by replayed traffic.

What runs (all on one Ray; every actor is named, detached and restartable):

  replay driver --HTTP--> Serve ingress --> Router replicas (N) --decisions--> feedback actor
       |                                        ^                                  |  durable Parquet log
       +--POST /v1/feedback (logged outcome)----|--------------------------------->|  then ack
                                                |                                  v batches
                                 parameter server <--publish-- learner actor (RLlib TorchLearner)
                                        (replicas long-poll it and swap weights between batches)

`up` is `banditroute serve` plus the replay traffic driver, on the same
AppConfig (cluster/config.py) with this command's defaults underneath
(``UP_DEFAULTS``: 2 CPU replicas on loopback, a free port, the loop on):
start Ray, the loop and the router exactly as `serve` does
(cluster/runner.py), drive the replay traffic (cluster/traffic.py) with a
progress view, then settle (drain the feedback actor, wait for every
replica to serve the final version) and write ``summary.json`` (with the
verdict against every fixed model, cluster/summary.py) and
``learning_curve.png`` (cluster/plotting.py).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import posixpath
import time
from datetime import datetime
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from banditroute.cluster.cold_start import starting_policy
from banditroute.cluster.config import (
    AppConfig, OnlineConfig, UpConfig, app_config_from_merged, deep_merge, merge_app_data, read_app_yaml,
)
from banditroute.cluster.online import OnlineLoop
from banditroute.cluster.plotting import plot_learning_curve, version_steps
from banditroute.cluster.progress_view import ProgressView
from banditroute.cluster.runner import (  # noqa: F401  (free_port, wait_healthy: also imported from here by tests, benches)
    RunningApplication, absolute_local_storage, free_port, running_application, wait_healthy,
)
from banditroute.cluster.summary import (
    compare_with_fixed_models, experiments_summary, gate_checks, gate_summary, percentiles, promotions_from_versions,
    verdict_line,
)
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
    # The value learner: measured above BaRP's on the same traffic (docs/online_learning.md, "Both learners online").
    "up": {"cold_start": {"kind": "value"}},
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
    absolute_local_storage(merged)
    return app_config_from_merged(merged)


def check_up(app: AppConfig) -> None:
    """What `up` needs beyond a valid AppConfig: the loop on, and the router on loopback (the driver's only route)."""
    if not app.online.enabled:
        raise ValueError(ONLINE_REQUIRED)
    if app.router.host not in LOOPBACK_HOSTS:
        raise ValueError("router.host: the replay driver talks to the router on loopback only (127.0.0.1)")


def run_up(app: AppConfig) -> dict[str, Any]:
    """Start everything, drive traffic, stop, write summary.json and learning_curve.png; returns the summary."""
    if app.up.scenario is not None:  # a scripted run over an identity policy (cluster/scenario_run.py)
        from banditroute.cluster.scenario_run import run_scenario

        return run_scenario(app)
    check_up(app)
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one INFO line per request otherwise
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
    # The same start and stop as `banditroute serve`; the learner's final checkpoint is taken while settling.
    with running_application(app, policy.state(), up.ready_timeout_s, final_checkpoint=False,
                             include_dashboard=False, log_to_driver=False) as running:
        return _drive_and_settle(running, data, policy, out)


def _drive_and_settle(running: RunningApplication, data, policy, out: Path) -> dict[str, Any]:
    import ray

    app, router, loop = running.app, running.router, running.loop
    assert loop is not None  # check_up: the loop is on
    up = app.up
    pool = list(running.health["models"])
    print(f"router ready at {running.base_url} ({router.num_replicas} replicas, policy v{running.health['policy_version']}); "
          f"driving {up.max_decisions or 'unlimited'} decisions with {up.concurrency} in flight", flush=True)

    state = TrafficState(list(data.models), min(up.curve_window, max(1, up.max_decisions or up.curve_window)))
    view = ProgressView(state, up.max_decisions)
    replica_max_age_s = 3 * router.weights_poll_timeout_s  # live replicas report at least every poll timeout
    started = time.monotonic()
    try:
        asyncio.run(_drive_with_progress(up, running.base_url, data, policy.tau, pool, state, view, loop, replica_max_age_s))
    except KeyboardInterrupt:  # Ctrl-C: stop the traffic, still drain and write the summary (a 2nd Ctrl-C aborts)
        print("\nbanditroute up: stopping the traffic; draining and writing the summary", flush=True)
    drive_s = time.monotonic() - started

    # Drain: every acknowledged event to the learner, then wait for every replica to serve the final version.
    ray.get(loop.feedback.flush.remote(up.settle_timeout_s))
    final_status = ray.get(loop.learner.status.remote())
    final_version = int(final_status["policy_version"])
    replica_versions = _wait_replicas(loop.parameter_server, final_version, router.num_replicas, up.settle_timeout_s,
                                      replica_max_age_s)
    promotion = ray.get(loop.learner.promotion_status.remote())  # the whole gate history (status() keeps the last 10)
    checkpoint = ray.get(loop.learner.shutdown.remote())
    candidates = [m for m in pool if m in data.models]
    summary = _summary(app, loop, state, policy, drive_s, final_status, promotion, replica_versions, checkpoint, data,
                       candidates)
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    best = summary["best_fixed_model"]
    plot_learning_curve(
        out / "learning_curve.png", state.reward_curve,
        version_steps(summary["promotions"], summary["policy_version_start"], state.decisions),
        f"banditroute up: {'cold' if summary['cold_start'] else 'warm'} start, {policy.meta.encoder.name} encoder, "
        f"{router.num_replicas} replicas",
        reference={f"best fixed model ({best['model']}, same requests)": best["reward"]} if best else None,
        promotions=summary["promotions"], gate_checks=summary["promotion"]["checks"],
    )
    _print_done(summary, state)
    print(out / "summary.json", flush=True)
    return summary


async def _drive_with_progress(up: UpConfig, base_url, data, tau, pool, state, view, loop: OnlineLoop,
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
            view.update(version, replicas, lstat, fstat)
        await driver
    except (KeyboardInterrupt, asyncio.CancelledError):
        stop.set()
        await driver
    if state.route_errors + state.feedback_errors and stop.is_set() and up.max_decisions and state.decisions < up.max_decisions:
        raise RuntimeError(f"too many failed requests ({state.route_errors} route, {state.feedback_errors} feedback); last: {state.last_error}")


def _summary(app: AppConfig, loop: OnlineLoop, state: TrafficState, policy, drive_s: float, final_status: dict[str, Any],
             promotion: dict[str, Any], replica_versions: dict[str, int], checkpoint: Any, data,
             candidates: list[str]) -> dict[str, Any]:
    """summary.json: the run's counts, curve, latencies, learner and feedback state, and the verdict against fixed models."""
    import ray

    fb_stats = ray.get(loop.feedback.stats.remote())
    log_uri = ray.get(loop.feedback.log_uri.remote())
    versus = compare_with_fixed_models(state.rewards, data.scores_filled, data.costs, state.rows, state.w_costs, policy.tau,
                                       candidates, [list(data.models).index(m) for m in candidates])
    return {
        "decisions": state.decisions,
        "rewards_acknowledged": state.rewards_acknowledged,
        "events_in_log": int(ray.get(loop.feedback.events_in_log.remote())),
        "policy_version_start": int(loop.learner_status["start_version"]),
        "policy_version_end": int(final_status["policy_version"]),
        "replica_versions": replica_versions,
        "promotions": promotions_from_versions(state.versions),
        "reward_curve": state.reward_curve,
        "reward_curve_window": state.window,
        "mean_reward": float(np.mean(state.rewards)) if state.rewards else None,
        "final_running_reward": state.running_reward if state.rewards else None,
        **versus,
        "decisions_per_s": state.decisions / drive_s if drive_s > 0 else None,
        "drive_seconds": drive_s,
        "route_latency_ms": percentiles(state.route_ms),
        "feedback_latency_ms": percentiles(state.feedback_ms),
        "feedback_status": dict(state.feedback_status),
        "route_errors": state.route_errors,
        "last_error": state.last_error,
        "learner": {k: final_status.get(k) for k in ("updates", "events_trained", "events_held_out", "skipped",
                                                     "publish_errors", "serving_version", "candidate_version")},
        "promotion": gate_summary(promotion, gate_checks(promotion.get("history") or [], state.times)),
        "feedback": {k: v for k, v in fb_stats.items() if k != "last_learner_metrics"},
        "traffic_share_final": state.share(state.window),
        "encoder": policy.meta.encoder.name,
        "policy_kind": policy.kind,
        "replicas": app.router.num_replicas,
        "cold_start": (app.online.initial_policy or app.router.policy) is None,
        "storage": log_uri,
        "experiments": experiments_summary(app.router.experiments, log_uri, policy.tau)["experiments"],
        "checkpoint": checkpoint,
        "served_checkpoint": served_checkpoint(checkpoint, final_status.get("serving_version")),
        "tau": policy.tau,
    }


def served_checkpoint(last_checkpoint: Any, serving_version: Any) -> str | None:
    """The checkpoint of the version replicas serve at the end (``v<version>`` beside the learner's last one; the gate
    protects it from pruning): what to hand to `banditroute eval --policy`, not the last, unpromoted candidate."""
    if not isinstance(last_checkpoint, str) or serving_version is None:
        return None
    return posixpath.join(posixpath.dirname(last_checkpoint.rstrip("/")), f"v{int(serving_version)}")


def _print_done(summary: dict[str, Any], state: TrafficState) -> None:
    print(f"done: {state.decisions} decisions, {state.rewards_acknowledged} rewards acknowledged, "
          f"{summary['events_in_log']} events in the log, policy v{summary['policy_version_start']} -> "
          f"v{summary['policy_version_end']}, replicas {sorted(set(summary['replica_versions'].values()))}; "
          f"running reward {summary['final_running_reward']}", flush=True)
    gate = summary["promotion"]
    if gate.get("enabled"):
        served = ", ".join(f"v{v} from decision {d}" for d, v in summary["promotions"]) or "none"
        print(f"promotion gate: candidate v{summary['learner']['candidate_version']}, serving v{summary['policy_version_end']}; "
              f"{gate['promoted_recent']} of the last {gate['checks_recent']} checks promoted; last: {gate['last_reason']}",
              flush=True)
        print(f"promotions (served version by decision): {served}", flush=True)
    print(verdict_line(summary), flush=True)


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
