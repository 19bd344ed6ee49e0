"""The banditroute Serve application builder: the import path of ``serve run``,
``serve deploy`` and KubeRay's serveConfigV2 (``banditroute.cluster.app:build_app``).

It lives in cluster/ because it wires components together: the serve
deployments, and (with ``online.enabled``) the feedback, learner and
parameter-server actors of the online loop (cluster/online.py). Its args are
the application config (cluster/config.py: ``router``, ``storage``,
``online``, ``feedback``, ``learner``, ``prices``), parsed by the same loader
as `banditroute serve` / `up` and the generated Serve config.

``router.placement`` decides the deployments: ``replica`` is RouterIngress
over a Router deployment; ``inline`` is RouterIngress alone, each replica
deciding itself (``num_replicas`` of them, with the Router's resources);
``auto`` is inline on CPU (for every encoder: measured, docs/serving.md) and
for a cheap encoder (hashing, static) on a GPU; MiniLM on a GPU keeps the
Router, the encoder read from the checkpoint or the parameter server's
newest weights (``serving_encoder_name``). ``deployment_options`` gives each deployment's
Serve options; the generated Serve config should take them from there too.
"""

from __future__ import annotations

import copy
import json
import logging
from pathlib import Path
from typing import Any, Mapping

import ray
from ray import serve

from banditroute.cluster.config import AppConfig, app_config_from_args
from banditroute.cluster.online import start_online_loop
from banditroute.core.config import to_dict
from banditroute.core.data import resolve_data_path
from banditroute.feedback.config import FeedbackConfig
from banditroute.policy.base import read_meta
from banditroute.serve.config import RouterConfig, resolve_placement
from banditroute.serve.ingress import RouterIngress
from banditroute.serve.replay_upstream import ReplayUpstream
from banditroute.serve.router import Router

logger = logging.getLogger(__name__)


def _absolute(path: str | None) -> str | None:
    if path is None or "://" in path:
        return path
    return str(Path(path).expanduser().resolve())


def resolve_paths(router: RouterConfig) -> RouterConfig:
    """A copy of ``router`` with relative paths made absolute (replicas may run with another working directory)."""
    cfg = copy.deepcopy(router)
    cfg.policy = _absolute(cfg.policy)
    for exp in cfg.experiments:  # pinned arms' checkpoint folders (a storage URI is left as it is)
        for arm in exp.arms:
            arm.checkpoint = _absolute(arm.checkpoint)
    if cfg.decision_sink == "local":
        opts = dict(cfg.decision_sink_options)
        opts["path"] = _absolute(str(opts.get("path", "runs/decisions")))
        cfg.decision_sink_options = opts
    if cfg.replay.enabled:
        cfg.replay.data_path = str(resolve_data_path(cfg.replay.data_path).resolve())
    return cfg


def apply_prices(router: RouterConfig, prices: Mapping[str, float], feedback: FeedbackConfig) -> None:
    """Put ``prices`` (USD per call) where they act.

    - The feedback join uses them as a model's cost when neither the reward nor
      the upstream reported one (``feedback.join.prices``; explicit entries there win).
    - An identity policy's model registry (its live pool and prices) gets them
      before any replica loads it; an unknown model is an error naming ``prices.<model>``.
    A BaRP policy learns costs from rewards; prices for models outside its pool are ignored with a warning.
    """
    if not prices:
        return
    feedback.join.prices = {**dict(prices), **feedback.join.prices}
    if router.policy is None:
        return
    from banditroute.policy.checkpoint import checkpoint_kind, load_policy

    if checkpoint_kind(router.policy) != "identity":
        pool = set(load_policy(router.policy).models)
        unknown = sorted(set(prices) - pool)
        if unknown:
            logger.warning("prices: %s are not in the policy's pool %s; ignored by routing", unknown, sorted(pool))
        return
    from banditroute.policy.model_registry import REGISTRY_FILE, ModelRegistry, UnknownModelError

    meta = json.loads((Path(router.policy) / "meta.json").read_text())
    registry = ModelRegistry.load(meta.get("registry_uri") or Path(router.policy) / REGISTRY_FILE)
    try:
        registry.set_prices(dict(prices))
    except UnknownModelError as exc:
        bad = next((m for m in prices if m not in registry.models), None)
        raise ValueError(f"prices.{bad}: {exc}") from None
    registry.save()


def resolve_app(app: AppConfig) -> AppConfig:
    """A copy of ``app`` ready to deploy: absolute router paths, ``prices`` applied (feedback join, identity registry)."""
    app = copy.deepcopy(app)
    app.router = resolve_paths(app.router)
    apply_prices(app.router, app.prices, app.feedback)
    return app


PARAMETER_SERVER_TIMEOUT_S = 10.0
"""How long ``serving_encoder_name`` waits for the parameter server's newest weights."""


def serving_encoder_name(router: RouterConfig) -> str | None:
    """Name of the encoder the deciding replicas will run: the checkpoint's, else that of the parameter
    server's newest weights; None when neither can tell (then ``placement: auto`` keeps the Router)."""
    try:
        if router.policy is not None:
            return read_meta(router.policy)["encoder"]["name"]
        if router.parameter_server_name is not None:
            actor = ray.get_actor(router.parameter_server_name, namespace=router.parameter_server_namespace)
            snap = ray.get(actor.latest.remote(), timeout=PARAMETER_SERVER_TIMEOUT_S)
            return snap.state["meta"]["encoder"]["name"] if snap is not None else None
    except Exception as exc:  # noqa: BLE001 - unreadable here: the replicas report it; auto stays safe
        logger.warning("placement auto: cannot tell the serving encoder (%s: %s); keeping the Router deployment",
                       type(exc).__name__, exc)
    return None


def placement_of(router: RouterConfig) -> str:
    """'inline' or 'replica': ``router.placement``, with 'auto' decided from the device and (on a GPU) the encoder."""
    on_gpu = router.decides_on_gpu()
    encoder = serving_encoder_name(router) if router.placement == "auto" and on_gpu else None
    return resolve_placement(router.placement, encoder, on_gpu)


def deciding_deployment(placement: str) -> str:
    """Name of the deployment whose replicas decide (and log) under ``placement`` ('inline' or 'replica')."""
    return RouterIngress.name if placement == "inline" else Router.name


def deployment_options(router: RouterConfig, placement: str) -> dict[str, dict[str, Any]]:
    """Serve options of each deployment of ``placement`` ('inline' or 'replica'), by deployment name.

    The deciding replicas (Router, or the inline ingress) get ``num_replicas``,
    ``num_cpus``/``num_gpus`` and the live batching knobs (``user_config``);
    an ingress in front of Router replicas gets ``ingress_*``.
    """
    deciding = {
        "num_replicas": router.num_replicas,
        "ray_actor_options": {"num_cpus": router.num_cpus, "num_gpus": router.resolved_num_gpus()},
        "user_config": {"max_batch_size": router.max_batch_size, "batch_wait_timeout_s": router.batch_wait_timeout_s},
    }
    if placement == "inline":
        return {RouterIngress.name: dict(deciding, max_ongoing_requests=router.ingress_max_ongoing_requests)}
    return {
        RouterIngress.name: {"num_replicas": router.ingress_replicas, "max_ongoing_requests": router.ingress_max_ongoing_requests,
                             "ray_actor_options": {"num_cpus": router.ingress_num_cpus}},
        Router.name: dict(deciding, max_ongoing_requests=router.max_ongoing_requests),
    }


def router_application(router: RouterConfig) -> serve.Application:
    """The Serve deployments of one router config: RouterIngress, over N Router replicas unless the
    placement is inline (+ the replay upstream)."""
    conf = to_dict(router)
    conf["num_gpus"] = router.resolved_num_gpus()
    placement = placement_of(router)
    options = deployment_options(router, placement)
    logger.info("placement %s (router.placement %s): deployments %s", placement, router.placement, sorted(options))
    replicas = Router.options(**options[Router.name]).bind(conf) if placement == "replica" else None
    replay = None
    if router.replay.enabled:
        replay = ReplayUpstream.options(ray_actor_options={"num_cpus": min(0.1, router.ingress_num_cpus) or 0.1}).bind(conf)
    return RouterIngress.options(**options[RouterIngress.name]).bind(replicas, replay, conf)


def build_app(args: Mapping[str, Any] | AppConfig | None = None) -> serve.Application:
    """The banditroute Serve application (``banditroute.cluster.app:build_app``).

    ``args``: the application config (an AppConfig, or its keys as the
    serveConfigV2 ``args`` give them: sections as mappings or dotted keys,
    values possibly strings, plus an optional ``config`` YAML path that the
    other keys override), validated by cluster/config.py naming the field.
    Of it the builder reads ``router``, ``prices``, and, with
    ``online.enabled``, ``online``, ``storage``, ``feedback`` and ``learner``:
    it then starts (or finds) the loop's actors over ``storage`` and wires the
    routers to them (cluster/online.py). ``prices`` become the feedback
    join's default costs and an identity policy's registry prices.
    """
    app = resolve_app(args if isinstance(args, AppConfig) else app_config_from_args(args))
    router = start_online_loop(app).router if app.online.enabled else app.router
    return router_application(router)
