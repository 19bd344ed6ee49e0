"""Typed configuration of the serving side (`banditroute serve`, `build_app`).

``RouterConfig`` is the ``router:`` section of the application config
(cluster/config.py ``AppConfig``); ``load_router_config`` loads one from a
YAML file holding just these keys. Secrets never go in the YAML: an upstream
names the ENVIRONMENT VARIABLE that holds its API key.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Mapping

from banditroute.core.config import from_dict, load_config
from banditroute.core.security import SecurityConfig
from banditroute.core.storage import StorageConfig
from banditroute.serve.budget import BudgetConfig
from banditroute.policy.experiments import ExperimentConfig, check_experiments
from banditroute.policy.exploration import DEFAULT_EXPLORATION_CEILING, DEFAULT_EXPLORATION_FLOOR, check_bounds
from banditroute.policy.reward import PreferenceError, preference_to_w_cost
from banditroute.serve.decision_sinks import DECISION_SINKS
from banditroute.serve.limits import LimitsConfig
from banditroute.serve.tenant_config import TenantConfig, check_tenants

ROUTE_MODES = ("explore", "greedy")
"""Decision modes: sample from the policy (propensity logged) or take its argmax."""
PLACEMENTS = ("inline", "replica", "auto")
"""Where decisions are made: in the ingress replicas, in a Router deployment behind them, or chosen (resolve_placement)."""
CHEAP_ENCODERS = ("hashing", "static")
"""Encoders with no forward pass worth a GPU: ``placement: auto`` decides inline with them, on GPUs too."""


def resolve_placement(placement: str, encoder_name: str | None, on_gpu: bool) -> str:
    """'inline' or 'replica' for ``placement``: 'auto' is inline on CPU, and on a GPU for a cheap encoder.

    On CPU the deciding process is bound by the encoder whatever the
    placement, and a Router deployment only adds a hop, a process and its
    memory (MiniLM, measured: 65 ms of CPU per request either way, plus
    3-5 ms in the ingress with a Router; docs/serving.md). On a GPU an
    encoder with a real forward pass (MiniLM), or one not known yet, keeps
    the Router deployment: its replicas batch the forward passes from every
    ingress (which tokenize) and scale apart from the HTTP front.
    """
    if placement not in PLACEMENTS:
        raise ValueError(f"placement must be one of {list(PLACEMENTS)}, got {placement!r}")
    if placement != "auto":
        return placement
    return "inline" if not on_gpu or encoder_name in CHEAP_ENCODERS else "replica"


@dataclass
class UpstreamConfig:
    """An OpenAI-compatible endpoint that serves one model of the pool."""

    base_url: str
    """Base URL; requests go to ``base_url + '/chat/completions'`` (e.g. https://api.openai.com/v1)."""
    api_key_env: str | None = None
    """Name of the environment variable holding the API key (sent as a Bearer token); None = no auth."""
    model: str | None = None
    """Model id the upstream expects in the request body; None = the pool model's own name."""
    timeout_s: float = 60.0
    """Total time allowed for one upstream call (a stream: until the first byte); then 504."""

    def check(self, name: str) -> None:
        """Validation with the pool model's name in the message (called by RouterConfig.validate)."""
        if not self.base_url.startswith(("http://", "https://")):
            raise ValueError(f"upstreams.{name}.base_url must start with http:// or https://, got {self.base_url!r}")
        if self.timeout_s <= 0:
            raise ValueError(f"upstreams.{name}.timeout_s must be > 0")

    def api_key(self) -> str | None:
        return os.environ.get(self.api_key_env) if self.api_key_env else None


@dataclass
class ReplayConfig:
    """The replay upstream: answers as "model X" with X's logged response (demos, tests, benches)."""

    enabled: bool = False
    """Start the replay server with the app; models without an explicit upstream are sent to it."""
    data_path: str | None = None
    """Routing data with ``<model>|model_response`` columns; None = ../shared/data/routerbench/train.parquet."""
    host: str = "127.0.0.1"
    """Interface the replay server binds (loopback by default)."""
    port: int = 0
    """Port of the replay server; 0 = a free port chosen at start."""
    stream_chunk_chars: int = 48
    """Characters of the logged answer per SSE chunk when the client asks for stream=true."""

    def validate(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ValueError("replay.port must be in [0, 65535]")
        if self.stream_chunk_chars < 1:
            raise ValueError("replay.stream_chunk_chars must be >= 1")


@dataclass
class PreferenceConfig:
    """Quality/cost weights; normalised onto the simplex (w_cost = cost / (quality + cost))."""

    quality: float = 0.7
    """Weight of answer quality."""
    cost: float = 0.3
    """Weight of USD cost."""

    def validate(self) -> None:
        try:
            preference_to_w_cost(self.quality, self.cost)
        except PreferenceError as exc:
            raise ValueError(f"default_{exc}") from None


@dataclass
class RouterConfig:
    """The router application: policy, replicas, batching, HTTP, upstreams, logging, weights refresh."""

    policy: str | None = None
    """Policy checkpoint folder (policy.pt + meta.json); None = take the newest weights from the parameter server."""
    pool_policy: str | None = None
    """Identity checkpoint folder whose registry the pool admin API changes while ``policy`` is None (the online
    loop serves an identity policy: its seed checkpoint; its meta.registry_uri is the live registry replicas read)."""
    app_name: str = "banditroute"
    """Serve application name (``serve.get_app_handle(app_name)``)."""
    route_prefix: str = "/"
    """HTTP route prefix of the application."""
    host: str = "127.0.0.1"
    """Interface Serve's HTTP proxy binds (`banditroute serve` only; Serve has one proxy per node)."""
    port: int = 8000
    """Port of Serve's HTTP proxy (`banditroute serve`; also used to reach the replay server through it)."""
    router_model_name: str = "banditroute"
    """Model name clients send (OpenAI API) to be routed; any pool model name is passed through unrouted."""
    placement: str = "auto"
    """Where decisions are made: 'inline' (each ingress replica decides itself: one hop per route, no Router
    deployment; num_replicas ingress replicas with num_cpus/num_gpus each), 'replica' (ingress -> Router
    deployment; the ingress tokenizes for encoders with a tokenizer) or 'auto' (inline on CPU and for a
    hashing/static encoder; replica for MiniLM or an unknown encoder on a GPU; decided where the app is built)."""
    num_replicas: int = 1
    """Replicas that decide (batched inference): Router replicas, or with placement inline the ingress replicas."""
    ingress_replicas: int = 1
    """HTTP ingress replicas in front of the Router replicas (placement replica; inline: num_replicas decide and serve HTTP)."""
    max_batch_size: int = 64
    """Most requests one deciding replica encodes in one forward pass."""
    batch_wait_timeout_s: float = 0.002
    """How long a deciding replica waits to fill a batch once the first request is queued (0 = take what is queued)."""
    max_ongoing_requests: int = 512
    """Requests one Router replica accepts at once (>= max_batch_size; the rest queue in the caller)."""
    ingress_max_ongoing_requests: int = 1024
    """Requests one ingress replica accepts at once (inline: >= max_batch_size)."""
    tokenize_in_ingress: bool = True
    """Placement replica, encoders with a tokenizer (MiniLM): ingress replicas send token ids, not text, so the
    Router replica (a GPU) only runs forward passes; False sends text."""
    device: str = "auto"
    """Torch device of the encoder and policy: 'auto' (CUDA when the replica sees one), 'cpu', 'cuda[:N]'."""
    num_cpus: float = 1.0
    """Logical CPUs reserved per deciding replica (Router, or inline ingress)."""
    num_gpus: float | str = "auto"
    """GPUs per deciding replica; 'auto' = 1 when the process building the app sees CUDA, else 0."""
    ingress_num_cpus: float = 0.5
    """Logical CPUs reserved per ingress replica in front of Router replicas (placement replica)."""
    torch_threads: int = 0
    """torch.set_num_threads in each deciding replica; 0 = max(1, round(num_cpus)) on CPU, untouched on GPU."""
    tokenizers_parallelism: bool | None = None
    """Rust tokenizer threads in deciding replicas; None = on for CUDA replicas (the host tokenizer bounds them), off on CPU."""
    seed: int | None = None
    """Seed of the exploration sampler (tests); None = fresh randomness per replica."""
    exploration_floor: float = DEFAULT_EXPLORATION_FLOOR
    """Least probability of each candidate in explore mode (policy.exploration; min(floor, 1/K) with K candidates)."""
    exploration_ceiling: float = DEFAULT_EXPLORATION_CEILING
    """Largest probability of any candidate in explore mode (max(ceiling, 1/K)); keep equal to learner.promotion's."""
    default_preference: PreferenceConfig = field(default_factory=PreferenceConfig)
    """Preference used when a request gives none."""
    # Explore is the default: the system learns online, and only sampled decisions
    # (with their propensity < 1 logged) give the learner unbiased off-policy
    # signal about the models it did not pick; greedy traffic teaches it nothing
    # about alternatives. The sampler is the policy's own softmax, which the
    # training entropy schedule keeps sharp, so the cost of exploring is small.
    # Callers that need determinism send "mode": "greedy".
    default_mode: str = "explore"
    """'explore' (sample from the policy, propensity logged) or 'greedy' (argmax) when a request gives none."""
    max_prompt_chars: int = 100_000
    """Longest prompt (or concatenated chat messages) accepted, in characters; longer -> 413."""
    max_batch_requests: int = 256
    """Most prompts in one /v1/route/batch call; more -> 413."""
    fallback_model: str | None = None
    """Pool model to forward to when the chosen model's upstream fails (None = return 502/504)."""
    decision_sink: str = "local"
    """Registered decision sink (serve.decision_sinks.DECISION_SINKS): 'local', 'null', ..."""
    decision_sink_options: dict[str, Any] = field(default_factory=lambda: {"path": "runs/decisions"})
    """Options handed to the sink's constructor (local: path, fsync, max_rows_per_file)."""
    parameter_server_name: str | None = None
    """Named ParameterServer actor to long-poll for new weights; None = serve static weights."""
    parameter_server_namespace: str | None = "banditroute"
    """Ray namespace of that actor (= learner.param_server.NAMESPACE; replicas themselves run in 'serve')."""
    learner_actor_name: str | None = None
    """Named learner actor (namespace parameter_server_namespace) behind /v1/admin/policy/*; None = those routes answer 404."""
    weights_poll_timeout_s: float = 10.0
    """Long-poll timeout of one wait_for_newer call (also the replica's heartbeat period)."""
    weights_retry_max_s: float = 30.0
    """Longest back-off between attempts while the parameter server is missing or restarting."""
    upstreams: dict[str, UpstreamConfig] = field(default_factory=dict)
    """Per pool model: its OpenAI-compatible upstream."""
    replay: ReplayConfig = field(default_factory=ReplayConfig)
    """The replay upstream (answers with logged responses)."""
    budget: BudgetConfig = field(default_factory=BudgetConfig)
    """Budget pacing: spend targets (USD per 1,000 requests, global and per API key) that move the cost weight (serve/budget.py)."""
    security: SecurityConfig = field(default_factory=SecurityConfig)
    """Signed decision tokens (secret from an env var), API keys per endpoint group, body and reward limits."""
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    """What one request may cost: JSON parsing off the event loop, text per batch call, chat fields forwarded, rate per API key."""
    experiments: list[ExperimentConfig] = field(default_factory=list)
    """A/B experiments applied to every decision (policy/experiments.py; the application config's top-level
    ``experiments:`` section lands here)."""
    pinned_storage: StorageConfig | None = None
    """Storage settings (endpoint, region, key env vars) to read pinned experiment arms' checkpoints given as
    storage URIs; None = the default settings. The cluster layer copies the application's ``storage:`` here."""
    tenants: list[TenantConfig] = field(default_factory=list)
    """API key -> tenant with a default preference, a candidate allow-list and a rate limit (serve/tenants.py; the
    application config's top-level ``tenants:`` section lands here)."""

    def validate(self) -> None:
        if self.policy is None and self.parameter_server_name is None:
            raise ValueError("policy: a checkpoint path is required unless parameter_server_name is set")
        if not 0 <= self.port <= 65535:
            raise ValueError("port must be in [0, 65535]")
        if not self.router_model_name:
            raise ValueError("router_model_name must not be empty")
        for name in ("num_replicas", "ingress_replicas", "max_batch_size", "max_ongoing_requests",
                     "ingress_max_ongoing_requests", "max_prompt_chars", "max_batch_requests"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")
        if self.max_ongoing_requests < self.max_batch_size:
            raise ValueError("max_ongoing_requests must be >= max_batch_size")
        if self.placement not in PLACEMENTS:
            raise ValueError(f"placement must be one of {list(PLACEMENTS)}, got {self.placement!r}")
        self.budget.validate()
        if self.placement == "inline" and self.ingress_max_ongoing_requests < self.max_batch_size:
            raise ValueError("ingress_max_ongoing_requests must be >= max_batch_size when placement is inline")
        if self.batch_wait_timeout_s < 0:
            raise ValueError("batch_wait_timeout_s must be >= 0")
        if self.num_cpus < 0 or self.ingress_num_cpus < 0:
            raise ValueError("num_cpus and ingress_num_cpus must be >= 0")
        if isinstance(self.num_gpus, str):
            if self.num_gpus != "auto":
                raise ValueError(f"num_gpus must be a number or 'auto', got {self.num_gpus!r}")
        elif self.num_gpus < 0:
            raise ValueError("num_gpus must be >= 0")
        if self.torch_threads < 0:
            raise ValueError("torch_threads must be >= 0")
        check_bounds(self.exploration_floor, self.exploration_ceiling)
        if self.default_mode not in ROUTE_MODES:
            raise ValueError(f"default_mode must be one of {list(ROUTE_MODES)}, got {self.default_mode!r}")
        if self.weights_poll_timeout_s <= 0 or self.weights_retry_max_s <= 0:
            raise ValueError("weights_poll_timeout_s and weights_retry_max_s must be > 0")
        if not self.route_prefix.startswith("/"):
            raise ValueError("route_prefix must start with '/'")
        if self.decision_sink not in DECISION_SINKS:
            raise ValueError(f"decision_sink: unknown sink {self.decision_sink!r}; known: {sorted(DECISION_SINKS)}")
        for name, up in self.upstreams.items():
            up.check(name)
        self.limits.validate()
        check_experiments(self.experiments)
        check_tenants(self.tenants)
        if self.fallback_model is not None and self.fallback_model == self.router_model_name:
            raise ValueError("fallback_model must be a pool model, not the router's own name")

    def default_w_cost(self) -> float:
        """w_cost of ``default_preference`` (requests that give no preference)."""
        return preference_to_w_cost(self.default_preference.quality, self.default_preference.cost)

    def resolved_num_gpus(self) -> float:
        """num_gpus with 'auto' decided here (the process building the app)."""
        if isinstance(self.num_gpus, str):
            try:
                import torch  # lazily: building the app must not need torch (nor pay for importing it)

                return 1.0 if torch.cuda.is_available() else 0.0
            except Exception:  # no torch in this process: nothing to schedule on
                return 0.0
        return float(self.num_gpus)

    def decides_on_gpu(self) -> bool:
        """Whether the deciding replicas run on a GPU, as the process building the app sees it."""
        return self.device.startswith("cuda") if self.device != "auto" else self.resolved_num_gpus() > 0


def load_router_config(path: str | os.PathLike | None = None, overrides: Mapping[str, Any] | None = None) -> RouterConfig:
    """RouterConfig from a YAML file of its keys (the ``router:`` section's), plus dotted overrides."""
    return load_config(RouterConfig, path, overrides)


def as_router_config(config: Mapping[str, Any] | RouterConfig) -> RouterConfig:
    """A deployment's constructor argument (a RouterConfig, or its dict form as build_app binds it)."""
    return config if isinstance(config, RouterConfig) else from_dict(RouterConfig, dict(config))
