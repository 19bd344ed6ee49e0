"""One typed configuration for the whole application (``AppConfig``).

A single YAML file (see ``configs/app.example.yaml``) holds every section::

    start:    how to reach Ray: embedded local Ray, or an existing cluster
    router:   the Serve application (serve.config.RouterConfig; upstreams live here)
    serve:    Serve deployment knobs not in RouterConfig: autoscaling, proxy, env vars
    feedback: the feedback actor (feedback.service.FeedbackConfig)
    learner:  the online learner (learner.learner.LearnerConfig)
    storage:  checkpoints, event log, registry (banditroute.core.storage.StorageConfig)
    online:   whether the app starts the loop's actors itself (cluster.online.OnlineConfig)
    prices:   expected USD cost of one call per pool model

Secrets never go in the file: upstreams and storage name the ENVIRONMENT
VARIABLE that holds a key (``api_key_env``, ``access_key_id_env``). Any value
can be overridden from the environment with double-underscore variables:
``BANDITROUTE__STORAGE__ENDPOINT_URL=http://minio:9000`` sets
``storage.endpoint_url`` (lower-cased; values are parsed as YAML scalars).
Precedence: file < environment < explicit ``overrides``.

Validation goes through ``banditroute.core.config.from_dict``: an unknown key or a
value of the wrong type fails at load time with the dotted field name.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Mapping

import yaml

from banditroute.cluster.online import OnlineConfig
from banditroute.core.names import ActorNames
from banditroute.core.config import ConfigError, OverrideText, from_dict, set_dotted
from banditroute.feedback.service import FeedbackConfig
from banditroute.learner.config import LearnerConfig
from banditroute.serve.config import RouterConfig
from banditroute.core.storage import StorageConfig

ENV_PREFIX = "BANDITROUTE__"
"""Environment variables ``BANDITROUTE__A__B=value`` override config key ``a.b``."""


@dataclass
class StartConfig:
    """How the application reaches Ray."""

    mode: Literal["local", "cluster"] = "local"
    """'local': start an embedded Ray in this process (ray.init()); 'cluster': connect to an existing one."""
    address: str | None = None
    """Cluster mode: 'auto' (on a cluster node), 'HOST:6379' (GCS) or 'ray://HOST:10001' (Ray Client)."""
    namespace: str = "banditroute"
    """Ray namespace of the driver (the loop's named actors live in 'banditroute' regardless)."""
    num_cpus: int | None = None
    """Local mode: logical CPUs of the embedded Ray; None = the machine's cores."""

    def validate(self) -> None:
        if self.mode == "cluster" and not self.address:
            raise ValueError("start.address: required when start.mode is 'cluster' (e.g. 'auto' or 'ray://head:10001')")
        if self.mode == "local" and self.address:
            raise ValueError("start.address: only used when start.mode is 'cluster'")
        if self.num_cpus is not None and self.num_cpus < 1:
            raise ValueError("start.num_cpus: must be >= 1")


@dataclass
class AutoscalingConfig:
    """Serve autoscaling of one deployment (Serve's ``autoscaling_config``)."""

    min_replicas: int = 1
    """Fewest replicas (0 = scale to zero)."""
    max_replicas: int = 2
    """Most replicas; the cluster's worker groups must be able to hold them."""
    target_ongoing_requests: float = 8.0
    """In-flight requests per replica Serve aims for."""
    upscale_delay_s: float | None = None
    """Seconds load must stay high before replicas are added; None = Serve's default."""
    downscale_delay_s: float | None = None
    """Seconds load must stay low before replicas are removed; None = Serve's default."""

    def check(self, where: str) -> None:
        if self.min_replicas < 0:
            raise ValueError(f"{where}.min_replicas: must be >= 0")
        if self.max_replicas < max(1, self.min_replicas):
            raise ValueError(f"{where}.max_replicas: must be >= 1 and >= min_replicas")
        if not self.target_ongoing_requests > 0:
            raise ValueError(f"{where}.target_ongoing_requests: must be > 0")
        for name in ("upscale_delay_s", "downscale_delay_s"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise ValueError(f"{where}.{name}: must be >= 0")

    def to_serve(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "min_replicas": self.min_replicas,
            "max_replicas": self.max_replicas,
            "target_ongoing_requests": self.target_ongoing_requests,
        }
        for name in ("upscale_delay_s", "downscale_delay_s"):
            if getattr(self, name) is not None:
                out[name] = getattr(self, name)
        return out


@dataclass
class ServeDeployConfig:
    """Serve knobs of the generated Serve config that RouterConfig does not hold.

    Replica counts, max_ongoing_requests, num_cpus and num_gpus come from the
    ``router`` section (num_replicas / ingress_replicas, ...), so there is one
    source for each; an autoscaling section replaces the fixed replica count.
    """

    proxy_location: Literal["EveryNode", "HeadOnly", "Disabled"] = "EveryNode"
    """Where Serve runs HTTP proxies."""
    router_autoscaling: AutoscalingConfig | None = None
    """Autoscaling of the Router deployment (batched inference; GPU replicas); None = router.num_replicas."""
    ingress_autoscaling: AutoscalingConfig | None = None
    """Autoscaling of the RouterIngress deployment; None = router.ingress_replicas."""
    env_vars: dict[str, str] = field(default_factory=lambda: {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"})
    """runtime_env env_vars of the application (never secrets: those come from the pods' environment)."""

    def validate(self) -> None:
        if self.router_autoscaling is not None:
            self.router_autoscaling.check("serve.router_autoscaling")
        if self.ingress_autoscaling is not None:
            self.ingress_autoscaling.check("serve.ingress_autoscaling")


@dataclass
class AppConfig:
    """The whole application: start mode, router, Serve knobs, feedback, learner, storage, prices."""

    start: StartConfig = field(default_factory=StartConfig)
    """How to reach Ray."""
    router: RouterConfig = field(default_factory=RouterConfig)
    """The Serve application (policy, batching, upstreams per model, decision sink, weights refresh)."""
    serve: ServeDeployConfig = field(default_factory=ServeDeployConfig)
    """Serve deployment knobs beyond the router section (autoscaling, proxy, env vars)."""
    feedback: FeedbackConfig = field(default_factory=FeedbackConfig)
    """The feedback actor."""
    learner: LearnerConfig = field(default_factory=LearnerConfig)
    """The online learner."""
    storage: StorageConfig = field(default_factory=StorageConfig)
    """Durable state: s3://bucket/prefix on a cluster, a local folder in local mode."""
    online: OnlineConfig = field(default_factory=OnlineConfig)
    """The online loop (feedback, learner, parameter server) started with the application."""
    prices: dict[str, float] = field(default_factory=dict)
    """Expected USD cost of one call per pool model (model -> USD/call): feedback's default cost, identity registries."""

    def validate(self) -> None:
        from banditroute.policy.model_registry import check_prices

        check_prices(self.prices)
        security, window = self.router.security, self.feedback.join.window_s
        if security.require_signed_tokens and security.token_ttl_s < window:
            raise ValueError(
                f"router.security.token_ttl_s: {security.token_ttl_s:g}s is shorter than feedback.join.window_s "
                f"({window:g}s): tokens would expire (410) while their reward window is still open"
            )
        if self.start.mode == "cluster" and not (self.storage.is_s3 or self.storage.uri.startswith("file:///")):
            raise ValueError(
                f"storage.uri: cluster mode needs shared storage (s3://bucket/prefix or an absolute file:// "
                f"URI on a shared volume), got {self.storage.uri!r}"
            )


def env_overrides(environ: Mapping[str, str] | None = None, prefix: str = ENV_PREFIX) -> dict[str, str]:
    """``{"storage.endpoint_url": "..."}`` from ``BANDITROUTE__STORAGE__ENDPOINT_URL=...`` variables."""
    environ = os.environ if environ is None else environ
    out: dict[str, str] = {}
    for name, value in environ.items():
        if not name.startswith(prefix) or len(name) == len(prefix):
            continue
        parts = [p.lower() for p in name[len(prefix):].split("__")]
        if any(not p for p in parts):
            raise ConfigError(f"environment variable {name}: empty key part (use {prefix}SECTION__KEY)")
        out[".".join(parts)] = value
    return out


def app_config_from_dict(
    data: Mapping[str, Any] | None,
    overrides: Mapping[str, Any] | None = None,
    environ: Mapping[str, str] | None = None,
) -> AppConfig:
    """AppConfig from a plain mapping, then env-var overrides, then explicit dotted overrides."""
    merged: dict = _deep_copy(dict(data or {}))
    for source in (env_overrides(environ), overrides or {}):
        for key, value in source.items():
            set_dotted(merged, key, OverrideText(value) if isinstance(value, str) else value)
    try:
        online = merged.get("online")
        if isinstance(online, dict):
            # The loop's parameter server is where the routers get weights: a router
            # section without a policy is complete once the loop is on.
            section = from_dict(OnlineConfig, online, prefix="online")
            router = merged.setdefault("router", {})
            if section.enabled and isinstance(router, dict) and router.get("parameter_server_name") is None:
                router["parameter_server_name"] = ActorNames.for_prefix(section.actor_prefix).parameter_server
        return from_dict(AppConfig, merged)
    except ConfigError:
        raise
    except ValueError as exc:  # a validate() message; it already names the field
        raise ConfigError(str(exc)) from None


def load_app_config(
    path: str | os.PathLike | None = None,
    overrides: Mapping[str, Any] | None = None,
    environ: Mapping[str, str] | None = None,
) -> AppConfig:
    """Load the application config from YAML (optional), ``BANDITROUTE__*`` env vars and dotted overrides.

    ``environ`` defaults to ``os.environ`` (tests pass their own mapping).
    """
    data: dict = {}
    if path is not None:
        loaded = yaml.safe_load(Path(path).read_text()) or {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: the top level must be a mapping")
        data = loaded
    return app_config_from_dict(data, overrides, environ)


def _deep_copy(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _deep_copy(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_deep_copy(v) for v in value]
    return value
