"""Start modes and the Serve config file generated from the application config.

- :func:`start_ray`: embedded local Ray (``ray.init()``) or an existing
  cluster (``ray.init(address=...)``: ``auto``, ``HOST:6379`` or Ray Client
  ``ray://HOST:10001``), as ``start.mode`` says.
- :func:`serve_config_from_app`: the Serve config in the format ``serve
  build`` writes and ``serve deploy`` / KubeRay ``serveConfigV2`` read
  (``applications[].import_path/args/deployments``), validated with Ray
  Serve's own ``ServeDeploySchema``. ``banditroute serve-config`` writes it.
- :func:`deploy`: applies that config on the connected cluster through the
  Serve controller's declarative ``apply_config`` -- the call ``serve
  deploy`` makes through the dashboard's REST API, without needing the
  dashboard.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import os
from typing import Any

from banditroute.cluster.config import AppConfig
from banditroute.core.config import to_dict
from banditroute.serve.config import RouterConfig

logger = logging.getLogger(__name__)

IMPORT_PATH = "banditroute.cluster.app:build_app"
"""The Serve application builder every config points at."""
INGRESS_DEPLOYMENT = "RouterIngress"
ROUTER_DEPLOYMENT = "Router"

# RouterConfig keys that only `banditroute serve` (the HTTP proxy) reads; in a
# Serve config they are http_options, not application args.
_PROXY_KEYS = ("host", "port")


IDLE_WORKERS_OFF = {"enable_worker_prestart": False, "prestart_worker_first_driver": False, "num_workers_soft_limit": 0}
"""Ray system config of a local run without idle workers (``start.keep_idle_workers`` false): none prestarted, and a
task's worker ends once idle (Ray keeps up to one per CPU otherwise). Measured: -2 processes, -249 MB RSS."""


def start_ray(app: AppConfig, **init_kwargs: Any) -> bool:
    """Connect this process to Ray as ``app.start`` says; False if Ray was already initialised."""
    import ray

    if ray.is_initialized():
        return False
    env_vars = dict(app.serve.env_vars)
    if app.start.mode == "local":
        from banditroute.core.security import ensure_local_secret

        # An embedded Ray's processes inherit this environment: a missing token
        # secret is generated here (ephemeral), never written to any config.
        ensure_local_secret(app.router.security)
        kwargs: dict[str, Any] = {"namespace": app.start.namespace, "runtime_env": {"env_vars": env_vars}}
        if not os.environ.get("RAY_ADDRESS"):  # else ray.init joins that cluster, which refuses node settings
            from banditroute.cluster.ray_auth import enable_local_token_auth

            # Before ray.init: the embedded cluster's processes inherit the mode and the token path.
            auth = enable_local_token_auth(app.start.ray_auth)
            (logger.info if auth.mode == "token" else logger.warning)(auth.describe())
            kwargs["include_dashboard"] = app.start.include_dashboard
            if not app.start.keep_idle_workers:
                kwargs["_system_config"] = dict(IDLE_WORKERS_OFF)
        if app.start.num_cpus is not None:
            kwargs["num_cpus"] = app.start.num_cpus
    else:
        kwargs = {"address": app.start.address, "namespace": app.start.namespace}
    kwargs.update(init_kwargs)
    ray.init(**kwargs)
    return True


def _router_args(router: RouterConfig) -> dict[str, Any]:
    """The ``router`` keys that differ from the defaults (build_app fills in the rest), minus the proxy's."""
    changed = _diff(to_dict(router), to_dict(RouterConfig()))
    return {k: v for k, v in changed.items() if k not in _PROXY_KEYS}


def _diff(current: dict[str, Any], default: dict[str, Any]) -> dict[str, Any]:
    """Keys of ``current`` that differ from ``default``; nested sections keep only their changed keys."""
    out: dict[str, Any] = {}
    for key, value in current.items():
        base = default.get(key)
        if isinstance(value, dict) and isinstance(base, dict) and base:
            nested = _diff(value, base)
            if nested:
                out[key] = nested
        elif value != base:
            out[key] = value
    return out


def _changed(section: Any, keep: tuple[str, ...] = ()) -> dict[str, Any]:
    """The keys of a config section that differ from its defaults (plus ``keep``)."""
    current, default = to_dict(section), to_dict(type(section)())
    return {k: v for k, v in current.items() if k in keep or v != default[k]}


def serve_deployments(app: AppConfig) -> tuple[str, list[dict[str, Any]]]:
    """The placement ('inline' or 'replica') and the ``deployments`` entries of the Serve config.

    The options are build_app's own (``cluster.app.deployment_options``), so
    a generated config and ``serve run`` deploy the same thing. ``placement:
    auto`` is decided here, from the checkpoint (or ``online.initial_policy``,
    which seeds the loop) and the GPUs this process sees; when neither
    checkpoint is readable here it keeps the Router deployment. A
    ``serve.*_autoscaling`` section replaces a fixed replica count: with
    ``placement: inline`` the ingress replicas are the deciding ones, so
    ``router_autoscaling`` applies to them (else ``ingress_autoscaling``).
    ``num_gpus: auto`` is left out, for build_app to decide on the cluster.
    """
    from banditroute.cluster.app import deployment_options, placement_of  # Serve + the deployments: only when needed

    r = app.router
    probe = r if r.policy is not None else dataclasses.replace(r, policy=app.online.initial_policy)
    placement = placement_of(probe) if r.placement == "auto" and probe.policy is not None else r.placement
    if placement == "auto":
        placement = "replica"
    autoscaling = {ROUTER_DEPLOYMENT: app.serve.router_autoscaling, INGRESS_DEPLOYMENT: app.serve.ingress_autoscaling}
    if placement == "inline":
        autoscaling[INGRESS_DEPLOYMENT] = app.serve.router_autoscaling or app.serve.ingress_autoscaling
    out = []
    options_by_name = deployment_options(r, placement)
    for name in (INGRESS_DEPLOYMENT, ROUTER_DEPLOYMENT):
        options = options_by_name.get(name)
        if options is None:
            continue
        entry: dict[str, Any] = {"name": name, **copy.deepcopy(options)}
        if isinstance(r.num_gpus, str):
            entry["ray_actor_options"].pop("num_gpus", None)
        if autoscaling[name] is not None:
            entry.pop("num_replicas", None)
            entry["autoscaling_config"] = autoscaling[name].to_serve()
        out.append(entry)
    return placement, out


def serve_config_from_app(app: AppConfig) -> dict[str, Any]:
    """The Serve deploy config (``serve deploy`` / serveConfigV2 format) for ``app``, as plain data.

    Replica counts, max_ongoing_requests and CPUs/GPUs come from ``router``
    (``serve_deployments``: RouterIngress, plus Router unless the placement
    is inline); ``serve.*_autoscaling`` replaces a fixed replica count.
    ``router.num_gpus: auto`` leaves num_gpus out of the deciding replicas'
    ray_actor_options, so build_app decides it where the application is built
    (on the cluster: 0 unless the builder sees a GPU) -- set a number for GPU workers.
    """
    r = app.router
    # The builder's args are the application config itself (cluster.config), limited to what it reads.
    args: dict[str, Any] = {"router": _router_args(r), "storage": _changed(app.storage, keep=("uri", "region"))}
    if app.prices:
        args["prices"] = dict(app.prices)
    if app.online.enabled:
        # The builder starts the loop's actors: it needs their settings too.
        args["online"] = _changed(app.online, keep=("enabled",))
        args["feedback"] = to_dict(app.feedback)
        args["learner"] = to_dict(app.learner)

    placement, deployments = serve_deployments(app)
    # The builder on the cluster must make the deployments this config names: pin the placement decided here.
    args["router"]["placement"] = placement

    application: dict[str, Any] = {
        "name": r.app_name,
        "route_prefix": r.route_prefix,
        "import_path": IMPORT_PATH,
        "args": args,
        "deployments": deployments,
    }
    if app.serve.env_vars:
        application["runtime_env"] = {"env_vars": dict(app.serve.env_vars)}
    config = {
        "proxy_location": app.serve.proxy_location,
        "http_options": {"host": r.host, "port": r.port},
        "applications": [application],
    }
    serve_schema(config)  # fail here, not at deploy time
    return config


def serve_schema(config: dict[str, Any]):
    """``config`` validated as Ray Serve's ``ServeDeploySchema`` (raises ValueError naming the problem)."""
    from pydantic import ValidationError
    from ray.serve.schema import ServeDeploySchema

    try:
        return ServeDeploySchema.model_validate(config)
    except ValidationError as exc:
        raise ValueError(f"generated Serve config is invalid: {exc}") from None


def deploy(app: AppConfig, blocking: bool = True, init_kwargs: dict[str, Any] | None = None) -> dict[str, Any]:
    """Start/connect Ray, start Serve and apply the generated config declaratively; returns the config.

    Equivalent to ``serve deploy`` of the ``banditroute serve-config`` output,
    but through the Serve controller directly (no dashboard needed).
    """
    from ray.serve._private import api as serve_api

    config = serve_config_from_app(app)
    schema = serve_schema(config)
    start_ray(app, **(init_kwargs or {}))
    client = serve_api.serve_start(
        http_options=schema.http_options.model_dump(),
        proxy_location=schema.proxy_location,
    )
    client.deploy_apps(schema, _blocking=blocking)
    return config
