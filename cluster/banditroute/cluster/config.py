"""One typed configuration for the whole application (``AppConfig``).

One schema for `banditroute serve`, `banditroute up`, the generated Serve
config and KubeRay's serveConfigV2 ``args`` (which ``build_app`` parses with
the loader below). A YAML file (see ``configs/app.example.yaml``) holds the
sections; each key has one meaning wherever it is read::

    start:    how to reach Ray: embedded local Ray, or an existing cluster
    router:   the Serve application (serve.config.RouterConfig; upstreams live here)
    serve:    Serve deployment knobs not in RouterConfig: autoscaling, proxy, env vars
    feedback: the feedback actor (feedback.config.FeedbackConfig)
    learner:  the online learner (learner.config.LearnerConfig)
    storage:  checkpoints, event log, registry (core.storage.StorageConfig)
    online:   the loop's actors started with the application (OnlineConfig)
    prices:   expected USD cost of one call per pool model
    up:       what only `banditroute up`'s local run reads: replayed traffic, cold start, output (UpConfig)

Secrets never go in the file: upstreams and storage name the ENVIRONMENT
VARIABLE that holds a key (``api_key_env``, ``access_key_id_env``). Any value
can be overridden from the environment with double-underscore variables:
``BANDITROUTE__STORAGE__ENDPOINT_URL=http://minio:9000`` sets
``storage.endpoint_url`` (lower-cased; values are parsed as YAML scalars).
Precedence: file < environment < explicit ``overrides`` (``--set`` flags,
build_app's args). An override is a dotted key (``router.num_replicas``) or a
whole section as a mapping, merged key by key into what the file says.

Validation goes through ``banditroute.core.config.from_dict``: an unknown key or a
value of the wrong type fails at load time with the dotted field name.
"""

from __future__ import annotations

import os
import posixpath
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Mapping

import yaml

from banditroute.cluster.cold_start import ColdStartConfig
from banditroute.core.config import ConfigError, OverrideText, from_dict, set_dotted
from banditroute.core.names import DEFAULT_PREFIX, ActorNames
from banditroute.core.storage import StorageConfig
from banditroute.feedback.config import FeedbackConfig
from banditroute.learner.config import LearnerConfig
from banditroute.policy.experiments import ExperimentConfig
from banditroute.serve.config import RouterConfig
from banditroute.serve.tenant_config import TenantConfig

ENV_PREFIX = "BANDITROUTE__"
"""Environment variables ``BANDITROUTE__A__B=value`` override config key ``a.b``."""

DEFAULT_MAX_DECISIONS = 4000
"""Decisions a `banditroute up` run routes by default: about 5 minutes on a 2-core CPU box with MiniLM (~15 decisions/s)."""


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
    include_dashboard: bool = False
    """Local mode: serve Ray's dashboard UI (http://127.0.0.1:8265); off saves memory (Ray still runs its API server)."""
    keep_idle_workers: bool = False
    """Local mode: Ray's idle Python workers (prestarted, and kept after tasks, up to one per CPU); off ends them once
    idle, saving ~80-120 MB RSS each (replicas and actors have processes of their own; a later task waits ~1 s for one)."""
    ray_auth: Literal["token", "disabled"] = "token"
    """Local mode: Ray's control-plane auth. 'token': every Ray RPC and the dashboard need the token in ~/.ray/auth_token
    (0600, made on first use); an embedded Ray listens on every interface (docs/reliability.md). An explicit
    RAY_AUTH_MODE in the environment wins (the tests set 'disabled')."""

    def validate(self) -> None:
        if self.ray_auth not in ("token", "disabled"):
            raise ValueError(f"start.ray_auth: must be 'token' or 'disabled', got {self.ray_auth!r}")
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
class OnlineConfig:
    """The loop's actors (feedback, learner, parameter server), started with the application."""

    enabled: bool = False
    """Start (or find) the feedback, learner and parameter-server actors when the app is built, and wire the routers to them."""
    initial_policy: str | None = None
    """BaRP checkpoint that seeds the learner when storage holds no checkpoint yet (folder or storage URI); None = router.policy."""
    actor_prefix: str = DEFAULT_PREFIX
    """Actor names: <prefix>-feedback, <prefix>-learner, <prefix>-parameter-server (Ray namespace 'banditroute')."""
    learner_num_cpus: float = 1.0
    """Logical CPUs reserved for the learner actor (it trains with torch)."""
    feedback_num_cpus: float = 0.5
    """Logical CPUs reserved for the feedback actor (join, Parquet writes)."""

    def validate(self) -> None:
        if not self.actor_prefix:
            raise ValueError("online.actor_prefix must not be empty")
        if self.learner_num_cpus < 0 or self.feedback_num_cpus < 0:
            raise ValueError("online.learner_num_cpus and online.feedback_num_cpus must be >= 0")

    @property
    def names(self) -> ActorNames:
        return ActorNames.for_prefix(self.actor_prefix)


@dataclass
class UpConfig:
    """`banditroute up`'s local run: the replayed traffic, the cold start, the output (nothing else reads it)."""

    data: str | None = None
    """Routing data replayed as traffic (RouterBench layout); None = ../shared/data/routerbench/train.parquet."""
    max_decisions: int = DEFAULT_MAX_DECISIONS
    """Stop after this many routed decisions (0 = run until Ctrl-C)."""
    out: str = "runs/latest"
    """Output folder: summary.json, learning_curve.png, and storage/run-<time> when storage.uri is not given."""
    concurrency: int = 16
    """Requests the replay driver keeps in flight."""
    seed: int = 0
    """Seeds the cold-start weights and the traffic (prompts, preferences); router.seed seeds the replicas' samplers."""
    cold_start: ColdStartConfig = field(default_factory=ColdStartConfig)
    """The random-weight starting policy, used when neither online.initial_policy nor router.policy is set."""
    curve_window: int = 500
    """Running mean reward = mean over the last this-many decisions (fewer at the start)."""
    progress_interval_s: float = 2.0
    """Seconds between progress updates (plain lines when stdout is not a terminal)."""
    settle_timeout_s: float = 60.0
    """At the end: seconds to wait for the learner to drain and every replica to serve the final version."""
    ready_timeout_s: float = 300.0
    """Seconds to wait for the router to answer /healthz."""
    max_error_fraction: float = 0.2
    """Abort when more than this share of requests fail (after at least 50 failures)."""
    scenario: str | None = None
    """A scenario YAML (cluster/scenario.py: withhold, budget_usd_per_1k, events): serve the identity policy
    given as the policy and apply the events through the admin API (cluster/scenario_run.py)."""

    def validate(self) -> None:
        if self.max_decisions < 0:
            raise ValueError("up.max_decisions: must be >= 0")
        if self.concurrency < 1:
            raise ValueError("up.concurrency: must be >= 1")
        if self.curve_window < 1:
            raise ValueError("up.curve_window: must be >= 1")
        if self.progress_interval_s <= 0:
            raise ValueError("up.progress_interval_s: must be > 0")
        if self.settle_timeout_s < 0 or self.ready_timeout_s <= 0:
            raise ValueError("up.settle_timeout_s must be >= 0 and up.ready_timeout_s > 0")
        if not 0 < self.max_error_fraction <= 1:
            raise ValueError("up.max_error_fraction: must be in (0, 1]")


@dataclass
class AppConfig:
    """The whole application: start mode, router, Serve knobs, feedback, learner, storage, online loop, prices, up."""

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
    up: UpConfig = field(default_factory=UpConfig)
    """`banditroute up`'s local run (replayed traffic, cold start, output); ignored by serve and build_app."""
    experiments: list[ExperimentConfig] = field(default_factory=list)
    """A/B experiments (name, arms with weights, a fixed ``model`` per arm or none): copied to ``router.experiments``,
    which the replicas apply; docs/operations.md."""
    tenants: list[TenantConfig] = field(default_factory=list)
    """API key -> tenant (keys, default preference, candidate allow-list, rate limit): copied to ``router.tenants``;
    docs/operations.md."""

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


def merge_app_data(
    data: Mapping[str, Any] | None,
    overrides: Mapping[str, Any] | None = None,
    environ: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """Plain nested data: ``data``, then ``BANDITROUTE__*`` env vars, then ``overrides`` (not validated yet).

    An override key is dotted (``router.num_replicas``); a string value is
    parsed as YAML unless its field is text; a mapping value is merged key by
    key into the section it names (so ``{"router": {...}}`` keeps the
    router keys the file sets and the mapping does not).
    """
    merged: dict = deep_merge({}, data or {})
    for source in (env_overrides(environ), overrides or {}):
        for key, value in source.items():
            _override(merged, key, value)
    return merged


def _pinned_versions_to_checkpoints(experiments: Any, storage: Mapping[str, Any], learner: Any) -> None:
    """An arm's ``policy_version: N`` -> ``checkpoint``: the learner's checkpoint folder of version N under the storage."""
    from banditroute.learner.checkpoint import checkpoint_dir

    uri = storage.get("uri")
    prefix = (learner if isinstance(learner, dict) else {}).get("checkpoint_prefix", LearnerConfig().checkpoint_prefix)
    for experiment in experiments if isinstance(experiments, list) else []:
        for arm in (experiment.get("arms") or []) if isinstance(experiment, dict) else []:
            version = arm.get("policy_version") if isinstance(arm, dict) else None
            if isinstance(version, int) and not isinstance(version, bool) and version >= 0 and uri and not {"checkpoint", "model"} & set(arm):
                arm["checkpoint"] = posixpath.join(str(uri).rstrip("/"), prefix, checkpoint_dir(version))


def app_config_from_merged(merged: Mapping[str, Any]) -> AppConfig:
    """Validate merged data (``merge_app_data``) as an AppConfig; errors are ConfigErrors naming the dotted field."""
    merged = deep_merge({}, merged)
    try:
        if merged.get("experiments") is not None:  # one section in the file; the replicas read it from router
            router_section = merged.setdefault("router", {})
            if isinstance(router_section, dict):
                router_section["experiments"] = merged["experiments"]
                if isinstance(merged.get("storage"), dict):  # pinned arms' checkpoint URIs: the app's storage access
                    router_section.setdefault("pinned_storage", merged["storage"])
                    _pinned_versions_to_checkpoints(merged["experiments"], merged["storage"], merged.get("learner"))
        if merged.get("tenants") is not None:  # likewise: the ingress replicas read it from router
            router_section = merged.setdefault("router", {})
            if isinstance(router_section, dict):
                router_section["tenants"] = merged["tenants"]
        online = merged.get("online")
        if isinstance(online, dict):
            # The loop's parameter server is where the routers get weights: a router
            # section without a policy is complete once the loop is on.
            section = from_dict(OnlineConfig, online, prefix="online")
            router = merged.setdefault("router", {})
            if section.enabled:
                if not isinstance(merged.get("storage"), dict) or "uri" not in merged["storage"]:
                    raise ConfigError("storage: required when online.enabled (checkpoints and the event log live there)")
                if isinstance(router, dict) and router.get("parameter_server_name") is None:
                    router["parameter_server_name"] = section.names.parameter_server
        return from_dict(AppConfig, merged)
    except ConfigError:
        raise
    except ValueError as exc:  # a validate() message; it already names the field
        raise ConfigError(str(exc)) from None


def app_config_from_dict(
    data: Mapping[str, Any] | None,
    overrides: Mapping[str, Any] | None = None,
    environ: Mapping[str, str] | None = None,
) -> AppConfig:
    """AppConfig from a plain mapping, then env-var overrides, then explicit overrides."""
    return app_config_from_merged(merge_app_data(data, overrides, environ))


def read_app_yaml(path: str | os.PathLike | None) -> dict[str, Any]:
    """The mapping in an application config YAML file ({} for no file)."""
    if path is None:
        return {}
    loaded = yaml.safe_load(Path(path).read_text()) or {}
    if not isinstance(loaded, dict):
        raise ConfigError(f"{path}: the top level must be a mapping")
    return loaded


def load_app_config(
    path: str | os.PathLike | None = None,
    overrides: Mapping[str, Any] | None = None,
    environ: Mapping[str, str] | None = None,
) -> AppConfig:
    """Load the application config from YAML (optional), ``BANDITROUTE__*`` env vars and overrides.

    ``environ`` defaults to ``os.environ`` (tests pass their own mapping).
    """
    return app_config_from_dict(read_app_yaml(path), overrides, environ)


def app_config_from_args(args: Mapping[str, Any] | None, environ: Mapping[str, str] | None = None) -> AppConfig:
    """``build_app``'s args (the serveConfigV2 ``args``): AppConfig keys, as sections or dotted keys.

    ``serve run banditroute.cluster.app:build_app router.policy=/ckpt router.num_replicas=2``
    passes strings; a ``config`` key names an application YAML the other keys override.
    """
    args = dict(args or {})
    return load_app_config(args.pop("config", None), args, environ)


def deep_merge(base: Mapping[str, Any], extra: Mapping[str, Any]) -> dict[str, Any]:
    """``base`` with ``extra`` merged in, section by section (copies; neither input changes)."""
    out = {k: _copy(v) for k, v in base.items()}
    for key, value in extra.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = _copy(value)
    return out


def _override(merged: dict, dotted_key: str, value: Any) -> None:
    if not isinstance(value, Mapping):
        set_dotted(merged, dotted_key, OverrideText(value) if isinstance(value, str) else value)
        return
    *parents, last = dotted_key.split(".")
    node = merged
    for part in parents:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"{dotted_key}: {part} is not a section")
    existing = node.get(last)
    node[last] = deep_merge(existing, value) if isinstance(existing, dict) else _copy(value)


def _copy(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {k: _copy(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_copy(v) for v in value]
    return value
