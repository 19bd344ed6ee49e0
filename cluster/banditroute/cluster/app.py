"""The banditroute Serve application builder: the import path of ``serve run``,
``serve deploy`` and KubeRay's serveConfigV2 (``banditroute.cluster.app:build_app``).

It lives in cluster/ because it wires components together: the serve
deployments, and (with ``online.enabled``) the feedback, learner and
parameter-server actors of the online loop (cluster/online.py).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ray import serve

from banditroute.cluster.online import OnlineConfig, apply_prices, start_online_loop
from banditroute.core.config import from_dict, set_dotted, to_dict
from banditroute.core.data import resolve_data_path
from banditroute.core.names import ActorNames
from banditroute.core.storage import StorageConfig
from banditroute.feedback.service import FeedbackConfig
from banditroute.learner.config import LearnerConfig
from banditroute.policy.model_registry import check_prices
from banditroute.serve.app import ReplayUpstream, Router, RouterIngress
from banditroute.serve.config import RouterConfig, load_router_config


def _absolute(path: str | None) -> str | None:
    if path is None or "://" in path:
        return path
    return str(Path(path).expanduser().resolve())


def resolve_config(cfg: RouterConfig) -> RouterConfig:
    """Make relative paths absolute (replicas may run with another working directory)."""
    cfg.policy = _absolute(cfg.policy)
    if cfg.decision_sink == "local":
        opts = dict(cfg.decision_sink_options)
        opts["path"] = _absolute(str(opts.get("path", "runs/decisions")))
        cfg.decision_sink_options = opts
    if cfg.replay.enabled:
        cfg.replay.data_path = str(resolve_data_path(cfg.replay.data_path).resolve())
    return cfg


def _section_arg(args: dict[str, Any], name: str, cls: type) -> Any:
    """Pop and validate section ``name`` of build_app args (a mapping, or ``name.<key>`` dotted keys); None if absent."""
    section: Any = {}
    if name in args:
        value = args.pop(name)
        if isinstance(value, cls):
            return value
        if not isinstance(value, dict):
            raise ValueError(f"{name}: expected a mapping, got {type(value).__name__}")
        section = dict(value)
    for key in [k for k in args if k.startswith(name + ".")]:
        set_dotted(section, key[len(name) + 1:], args.pop(key))
    if not section:
        return None
    return section if cls is dict else from_dict(cls, section, prefix=name)


def _prices_arg(args: dict[str, Any]) -> dict[str, float]:
    return check_prices(_section_arg(args, "prices", dict) or {})


def build_app(args: dict[str, Any] | RouterConfig | None = None) -> serve.Application:
    """The banditroute Serve application (``banditroute.cluster.app:build_app``).

    ``args``: RouterConfig keys (nested ones as dicts or dotted keys), plus an
    optional ``config`` YAML path that the other keys override, plus the
    application sections the generated Serve config and k8s serveConfigV2
    pass (cluster/launch.py): ``storage`` (StorageConfig), ``online``
    (cluster.online.OnlineConfig), ``feedback`` (FeedbackConfig), ``learner``
    (LearnerConfig) and ``prices`` (model -> USD per call). All are validated
    here, naming the field. With ``online.enabled`` the builder starts (or
    finds) the loop's actors over ``storage`` and wires the routers to them
    (cluster/online.py); ``prices`` become the feedback join's default costs
    and an identity policy's registry prices.
    """
    if isinstance(args, RouterConfig):
        cfg = args
        storage, online, feedback, learner, prices = None, None, None, None, {}
    else:
        args = dict(args or {})
        storage = _section_arg(args, "storage", StorageConfig)
        online = _section_arg(args, "online", OnlineConfig)
        feedback = _section_arg(args, "feedback", FeedbackConfig) or FeedbackConfig()
        learner = _section_arg(args, "learner", LearnerConfig) or LearnerConfig()
        prices = _prices_arg(args)
        if online is not None and online.enabled and "parameter_server_name" not in args:
            args["parameter_server_name"] = ActorNames.for_prefix(online.actor_prefix).parameter_server  # set again when wired
        config_path = args.pop("config", None)
        cfg = load_router_config(config_path, args)
    cfg = resolve_config(cfg)
    if prices:
        apply_prices(cfg, prices, feedback)
    if online is not None and online.enabled:
        if storage is None:
            raise ValueError("storage: required when online.enabled (checkpoints and the event log live there)")
        cfg = start_online_loop(cfg, online, storage, feedback, learner)
    conf = to_dict(cfg)
    conf["num_gpus"] = cfg.resolved_num_gpus()
    router = Router.options(
        num_replicas=cfg.num_replicas,
        max_ongoing_requests=cfg.max_ongoing_requests,
        ray_actor_options={"num_cpus": cfg.num_cpus, "num_gpus": conf["num_gpus"]},
        user_config={"max_batch_size": cfg.max_batch_size, "batch_wait_timeout_s": cfg.batch_wait_timeout_s},
    ).bind(conf)
    replay = None
    if cfg.replay.enabled:
        replay = ReplayUpstream.options(ray_actor_options={"num_cpus": min(0.1, cfg.ingress_num_cpus) or 0.1}).bind(conf)
    return RouterIngress.options(
        num_replicas=cfg.ingress_replicas,
        max_ongoing_requests=cfg.ingress_max_ongoing_requests,
        ray_actor_options={"num_cpus": cfg.ingress_num_cpus},
    ).bind(router, replay, conf)
