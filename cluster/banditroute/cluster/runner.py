"""Run the application from this process: `banditroute serve` (until Ctrl-C), and the start/stop `up` shares.

One path for both commands: ``running_application`` connects to Ray
(``start.mode``), starts (or finds) the loop's actors when
``online.enabled`` (cluster/online.py), starts the Serve HTTP proxy, deploys
the router app (cluster/app.py) and waits for ``/healthz``; on exit it
drains the feedback actor, writes the learner's final checkpoint (so the
next start resumes from storage) and takes the app and the loop down.
`banditroute up` adds the replay traffic driver on the same AppConfig;
`banditroute serve` blocks until Ctrl-C (:func:`serve_until_stopped`).

`banditroute serve` runs the whole loop by default (``SERVE_DEFAULTS``:
``online.enabled`` true, storage ``runs/serve/storage``): rewards posted to
``/v1/feedback`` train the learner and replicas take each promoted version.
Frozen (``online.enabled`` false, ``--frozen``): replicas serve
``router.policy`` as it is and ``/v1/feedback`` answers 405.
"""

from __future__ import annotations

import contextlib
import math
import os
import signal
import socket
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping

from banditroute.cluster.app import resolve_app, router_application
from banditroute.cluster.config import AppConfig, app_config_from_merged, deep_merge, merge_app_data, read_app_yaml
from banditroute.cluster.launch import start_ray
from banditroute.cluster.online import OnlineLoop, has_checkpoint, start_online_loop
from banditroute.core.config import ConfigError, set_dotted
from banditroute.learner.config import ONLINE_KINDS
from banditroute.policy.checkpoint import checkpoint_kind
from banditroute.serve.config import RouterConfig

DEFAULT_SERVE_STORAGE = "runs/serve/storage"
"""`banditroute serve`'s storage (event log, checkpoints) when none is configured; kept across restarts."""

SERVE_DEFAULTS: dict[str, Any] = {"online": {"enabled": True}, "storage": {"uri": DEFAULT_SERVE_STORAGE}}
"""`banditroute serve`'s defaults, under the config file: the online loop on, over local storage."""

RUNTIME_ENV_DEFAULTS = {"RAY_USAGE_STATS_ENABLED": "0", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
"""Environment a local run sets unless the caller's environment says otherwise (Ray's auth mode is start.ray_auth:
it must never be set here or in a runtime_env, where 'disabled' on a token cluster stops workers registering)."""

WILDCARD_HOSTS = ("0.0.0.0", "::")


class NotHealthy(RuntimeError):
    """The router did not answer GET /healthz in time."""


def absolute_local_storage(merged: dict[str, Any]) -> None:
    """Make a local ``storage.uri`` path absolute in merged config data (the loop's actors may run elsewhere)."""
    storage = merged.get("storage")
    if isinstance(storage, dict) and isinstance(storage.get("uri"), str) and "://" not in storage["uri"]:
        storage["uri"] = str(Path(storage["uri"]).expanduser().resolve())


def load_serve_config(
    path: str | os.PathLike | None = None,
    overrides: Mapping[str, Any] | None = None,
    environ: Mapping[str, str] | None = None,
    frozen: bool = False,
) -> AppConfig:
    """The application config of `banditroute serve`: ``SERVE_DEFAULTS`` < the YAML file < env vars < overrides.

    ``frozen`` turns the loop off (``online.enabled`` false): replicas serve
    ``router.policy`` and take no feedback. A relative local ``storage.uri``
    becomes absolute.
    """
    merged = merge_app_data(deep_merge(SERVE_DEFAULTS, read_app_yaml(path)), overrides, environ)
    if frozen:
        set_dotted(merged, "online.enabled", False)
        if not (merged.get("router") or {}).get("policy"):
            raise ConfigError("router.policy: --frozen serves a fixed checkpoint; give it with --policy CKPT")
    absolute_local_storage(merged)
    return app_config_from_merged(merged)


def check_serve(app: AppConfig) -> None:
    """Fail before Ray starts when the loop has nothing to start from, or cannot train the policy it was given."""
    if not app.online.enabled:
        return
    seed = app.online.initial_policy or app.router.policy
    if seed is None:
        if not has_checkpoint(app.storage, app.learner):
            raise ValueError(f"online.initial_policy: storage {app.storage.uri} holds no checkpoint yet; give the "
                             f"starting policy with --policy CKPT (`banditroute train` makes one)")
        return
    if "://" not in seed and Path(seed).expanduser().is_dir():
        kind = checkpoint_kind(Path(seed).expanduser())
        if kind not in ONLINE_KINDS:
            raise ValueError(f"--policy {seed}: the online learner trains {' and '.join(ONLINE_KINDS)} policies, this one "
                             f"is {kind!r}; serve it as it is with --frozen")


def seed_policy_state(app: AppConfig) -> dict[str, Any] | None:
    """``state()`` of the starting policy (``online.initial_policy`` or ``router.policy``), of any kind the learner trains.

    None without one (``start_online_loop`` then names the missing field).
    """
    from banditroute.policy.checkpoint import load_policy_at

    seed = app.online.initial_policy or app.router.policy
    if seed is None:
        return None
    state = load_policy_at(seed, app.storage, field="online.initial_policy", kinds=ONLINE_KINDS).state()
    meta = state["meta"]
    if meta.get("kind") == "identity" and not meta.get("registry_uri") and "://" not in seed:
        # the learner and the replicas must share ONE live registry: the seed checkpoint's own (the pool admin's too)
        meta["registry_uri"] = str((Path(seed).expanduser() / "registry.json").resolve())
    return state


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
    raise NotHealthy(f"the router at {base_url} did not become healthy within {timeout_s:.0f}s ({last})")


def local_ray_kwargs(app: AppConfig) -> dict[str, Any]:
    """``ray.init`` arguments of an embedded Ray: enough logical CPUs for everything the app reserves."""
    if app.start.mode != "local" or app.start.num_cpus is not None:
        return {}
    r = app.router
    needed = r.num_replicas * r.num_cpus + r.ingress_replicas * r.ingress_num_cpus + 1.0  # + Serve controller, proxy
    if app.online.enabled:
        needed += app.online.learner_num_cpus + app.online.feedback_num_cpus
    if r.replay.enabled:
        needed += 0.1
    return {"num_cpus": int(math.ceil(max(float(os.cpu_count() or 1), needed)))}


@dataclass
class RunningApplication:
    """The deployed application: its config, the router config replicas run, the loop's actors, where it answers."""

    app: AppConfig
    """The resolved application config (absolute paths, prices applied)."""
    router: RouterConfig
    """The deployed router config (wired to the loop's actors when it runs; ``port`` the real one)."""
    loop: OnlineLoop | None = None
    """The loop's actors (None: a frozen router)."""
    owns_ray: bool = False
    """This process started Ray (shutting it down takes everything with it)."""
    deployed: bool = False
    base_url: str = ""
    """``http://host:port/prefix`` of the router (loopback when it listens on every interface)."""
    health: dict[str, Any] = field(default_factory=dict)
    """GET /healthz once ready (models, policy_version, ...)."""


def start_application(app: AppConfig, initial_state: dict[str, Any] | None = None, ready_timeout_s: float = 300.0,
                      owns_ray: bool = False) -> RunningApplication:
    """Start the loop (with ``online.enabled``) and the router app on the connected Ray; wait until healthy.

    ``initial_state`` seeds the learner when storage holds no checkpoint
    (cluster/online.py). ``router.port`` 0 = a free port; a Serve proxy
    already running in the cluster keeps its port. On failure, what was
    started is taken down again.
    """
    from ray import serve

    app = resolve_app(app)
    running = RunningApplication(app, app.router, owns_ray=owns_ray)
    try:
        if app.online.enabled:
            seeded = initial_state is None and not has_checkpoint(app.storage, app.learner)
            if seeded:  # loaded here, not in start_online_loop: a seed of any kind the learner trains
                initial_state = seed_policy_state(app)
            running.loop = start_online_loop(app, initial_state)
            if seeded and initial_state is not None:
                running.loop.started_from = app.online.initial_policy or app.router.policy
            running.router = running.loop.router
        router = running.router
        port = serve_http_port()
        if port is None:
            port = router.port or free_port(router.host)
            serve.start(http_options={"host": router.host, "port": port})
        router.port = port
        serve.run(router_application(router), name=router.app_name, route_prefix=router.route_prefix, blocking=False)
        running.deployed = True
        host = "127.0.0.1" if router.host in WILDCARD_HOSTS else router.host
        running.base_url = f"http://{host}:{port}{router.route_prefix.rstrip('/')}"
        running.health = wait_healthy(running.base_url, ready_timeout_s)
    except BaseException:
        stop_application(running, final_checkpoint=False)
        raise
    return running


def stop_application(running: RunningApplication, final_checkpoint: bool = True, drain_timeout_s: float = 10.0) -> None:
    """Take the application down: drain feedback and checkpoint the learner (``final_checkpoint``), then
    delete the app (unless Ray goes down with this process anyway) and kill the loop's actors."""
    import ray
    from ray import serve

    loop = running.loop
    if loop is not None and final_checkpoint:
        try:  # acknowledged rewards reach the learner; its final checkpoint is where the next start resumes
            ray.get(loop.feedback.flush.remote(drain_timeout_s), timeout=drain_timeout_s + 5)
            ray.get(loop.learner.shutdown.remote(), timeout=60)
        except Exception as exc:  # noqa: BLE001 - the acknowledged events are durable in the log regardless
            print(f"banditroute: final checkpoint skipped ({type(exc).__name__}: {exc})", flush=True)
    if running.deployed and not running.owns_ray:
        with contextlib.suppress(Exception):
            serve.delete(running.router.app_name)
    for handle in loop.handles.values() if loop is not None else ():
        with contextlib.suppress(Exception):
            ray.kill(handle, no_restart=True)


@contextlib.contextmanager
def running_application(app: AppConfig, initial_state: dict[str, Any] | None = None, ready_timeout_s: float = 300.0,
                        final_checkpoint: bool = True, **ray_init_kwargs: Any) -> Iterator[RunningApplication]:
    """Ray (``start``), the loop and the router app for the ``with`` block; all taken down after it."""
    import ray

    for var, value in RUNTIME_ENV_DEFAULTS.items():
        os.environ.setdefault(var, value)
    owns_ray = start_ray(app, **{**local_ray_kwargs(app), **ray_init_kwargs})
    try:
        running = start_application(app, initial_state, ready_timeout_s, owns_ray)
        try:
            yield running
        finally:
            stop_application(running, final_checkpoint)
    finally:
        if owns_ray:
            # ray.shutdown() takes Serve down with the cluster (serve.shutdown() first only adds a
            # noisy "graceful_shutdown failed" line from the killed controller).
            ray.shutdown()


def describe_learning(running: RunningApplication) -> str:
    """One line: is this router learning, over which storage, from which starting point."""
    loop, app = running.loop, running.app
    if loop is None:
        return (f"frozen (online.enabled false, --frozen): serving {app.router.policy} as it is; "
                f"POST /v1/feedback answers 405")
    start = ("resumed from the newest checkpoint in storage" if loop.started_from == "storage"
             else f"started from {loop.started_from}")
    gate = app.learner.promotion
    promotion = (f"replicas take a version once the promotion gate passes it (after >= {gate.min_holdout_events} "
                 f"held-out rewards; learner.promotion.*)" if gate.enabled else "replicas take every learner update")
    return (f"learning online: storage {app.storage.uri}; learner {start} (v{loop.learner_status['policy_version']}); "
            f"{promotion}")


def serve_until_stopped(app: AppConfig, ready_timeout_s: float = 300.0, metrics_port: int | None = None) -> int:
    """`banditroute serve`: start everything, print where it answers, block until Ctrl-C / SIGTERM; exit code."""
    if threading.current_thread() is threading.main_thread():
        def _terminate(signum, frame):  # SIGTERM: the same clean shutdown as Ctrl-C
            raise KeyboardInterrupt

        signal.signal(signal.SIGTERM, _terminate)
        # A shell starts background jobs with SIGINT ignored, and Python then keeps it
        # ignored: re-arm it so Ctrl-C / kill -INT always stops the server cleanly.
        signal.signal(signal.SIGINT, signal.default_int_handler)
    init_kwargs: dict[str, Any] = {"include_dashboard": False}
    if metrics_port:
        init_kwargs["_metrics_export_port"] = metrics_port
    try:
        with running_application(app, ready_timeout_s=ready_timeout_s, **init_kwargs) as running:
            _print_ready(running)
            try:
                while True:
                    time.sleep(1.0)
            except KeyboardInterrupt:
                print("banditroute serve: shutting down" + (" (draining feedback, final checkpoint)" if running.loop else ""),
                      flush=True)
    except NotHealthy as exc:
        print(f"banditroute serve: {exc}", flush=True)
        return 1
    return 0


def _print_ready(running: RunningApplication) -> None:
    import ray

    base, health = running.base_url, running.health
    print(f"banditroute router ready at {base} (policy v{health['policy_version']}, models {health['models']})", flush=True)
    print(f"  {describe_learning(running)}", flush=True)
    print(f"  POST {base}/v1/route  POST {base}/v1/chat/completions  POST {base}/v1/feedback  GET {base}/healthz  "
          f"(Ctrl-C stops)", flush=True)
    metrics_port = next((n.get("MetricsExportPort") for n in ray.nodes() if n.get("Alive")), None)
    if metrics_port:
        host = base.split("//", 1)[1].split(":", 1)[0]
        print(f"  Prometheus metrics (ray_banditroute_*): http://{host}:{metrics_port}/metrics", flush=True)
