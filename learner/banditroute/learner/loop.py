"""`banditroute up`: the whole online-learning loop on a local Ray, driven by replayed traffic.

What runs (all on one local Ray; every actor is named, detached and restartable):

  replay driver --HTTP--> Serve ingress --> Router replicas (N) --decisions--> feedback actor
       |                                        ^                                  |  durable Parquet log
       +--POST /v1/feedback (logged outcome)----|--------------------------------->|  then ack
                                                |                                  v batches
                                 parameter server <--publish-- learner actor (RLlib TorchLearner)
                                        (replicas long-poll it and swap weights between batches)

The replay driver is a real async HTTP client on loopback: it sends prompts
from the routing data with random preferences (w_cost ~ U[0, 1]) to
``/v1/route`` in explore mode, then posts the LOGGED outcome of the model the
router chose (its score and cost in the data) to ``/v1/feedback``. The
running reward is computed with the starting policy's tau throughout, so the
curve is comparable from start to end.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import os
import socket
import sys
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np

from banditroute.feedback.service import FeedbackConfig
from banditroute.learner.config import LearnerConfig
from banditroute.policy.barp import NetworkConfig
from banditroute.core.storage import StorageConfig

logger = logging.getLogger(__name__)

DEFAULT_MAX_DECISIONS = 3000
WEIGHTS_POLL_TIMEOUT_S = 5.0
REPLICA_MAX_AGE_S = 3 * WEIGHTS_POLL_TIMEOUT_S  # live replicas report at least every poll timeout


@dataclass
class UpConfig:
    """`banditroute up`: data, starting policy, serving shape, traffic, and the loop's components."""

    data: str | None = None
    """Routing data replayed as traffic (RouterBench layout); None = ../shared/data/routerbench/train.parquet."""
    policy: str | None = None
    """Warm start from this BaRP checkpoint folder; None = cold start (random weights, tau fitted from the data)."""
    encoder: str = "minilm"
    """Prompt encoder of a cold-start policy: 'minilm' (all-MiniLM-L6-v2) or 'hashing' (fast smoke runs)."""
    max_decisions: int = DEFAULT_MAX_DECISIONS
    """Stop after this many routed decisions (0 = run until Ctrl-C)."""
    out: str = "runs/latest"
    """Output folder: summary.json, learning_curve.png, and storage/ (event log, checkpoints) by default."""
    storage: StorageConfig | None = None
    """Event log + checkpoint storage; None = OUT/storage/run-<timestamp> (a fresh one per run)."""
    replicas: int = 2
    """Router replicas."""
    replica_num_cpus: float = 0.5
    """Logical CPUs reserved per Router replica (each runs torch with one thread)."""
    concurrency: int = 16
    """Requests the replay driver keeps in flight."""
    host: str = "127.0.0.1"
    """Interface of Serve's HTTP proxy (loopback)."""
    port: int = 0
    """Port of Serve's HTTP proxy; 0 = a free port. Ignored when Serve is already running (its port is used)."""
    seed: int = 0
    """Seeds the cold-start weights, the traffic (prompts, preferences) and the routers' samplers."""
    actor_prefix: str = "banditroute"
    """Actor names: <prefix>-feedback, <prefix>-learner, <prefix>-parameter-server (namespace 'banditroute')."""
    app_name: str = "banditroute-up"
    """Serve application name."""
    network: NetworkConfig = field(default_factory=NetworkConfig)
    """Network shape of a cold-start policy."""
    tau_quantile: float = 0.95
    """Cold start: tau = this quantile of the data's per-call costs."""
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
    feedback: FeedbackConfig = field(default_factory=FeedbackConfig)
    """Feedback actor settings (join window, batching to the learner)."""
    learner: LearnerConfig = field(default_factory=LearnerConfig)
    """Learner settings (loss weights, replay, checkpoints)."""

    def validate(self) -> None:
        if self.encoder not in ("minilm", "hashing"):
            raise ValueError(f"encoder: must be 'minilm' or 'hashing', got {self.encoder!r}")
        if self.max_decisions < 0:
            raise ValueError("max_decisions must be >= 0")
        if self.replicas < 1:
            raise ValueError("replicas must be >= 1")
        if self.concurrency < 1:
            raise ValueError("concurrency must be >= 1")
        if not 0 <= self.port <= 65535:
            raise ValueError("port must be in [0, 65535]")
        if self.host not in ("127.0.0.1", "localhost", "::1"):
            raise ValueError("host: the replay driver talks to the router on loopback only (127.0.0.1)")
        if self.curve_window < 1:
            raise ValueError("curve_window must be >= 1")
        if self.progress_interval_s <= 0:
            raise ValueError("progress_interval_s must be > 0")
        if not 0 < self.max_error_fraction <= 1:
            raise ValueError("max_error_fraction must be in (0, 1]")
        self.feedback.validate()
        self.learner.validate()

    @property
    def names(self) -> dict[str, str]:
        from banditroute.core.names import ActorNames

        return ActorNames.for_prefix(self.actor_prefix).as_dict()


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


# --- the starting policy ----------------------------------------------------------


def starting_policy(cfg: UpConfig, data) -> Any:
    """Warm start (--policy) or a random-weight policy for the data's model pool (tau fitted from the data)."""
    import torch

    from banditroute.policy.barp import PolicyMeta, RoutingPolicy
    from banditroute.policy.encoders import EncoderConfig, make_encoder
    from banditroute.policy.reward import fit_tau

    if cfg.policy is not None:
        from banditroute.policy.checkpoint import checkpoint_kind

        kind = checkpoint_kind(cfg.policy)
        if kind != "barp":
            raise ValueError(f"--policy: the online learner trains BaRP checkpoints; {cfg.policy} is a {kind!r} policy")
        policy = RoutingPolicy.load(cfg.policy)
        missing = [m for m in policy.models if m not in data.models]
        if len(missing) == len(policy.models):
            raise ValueError(f"--policy: none of the policy's models {policy.models} are in the data {list(data.models)}")
        return policy
    enc_cfg = EncoderConfig(name=cfg.encoder)
    encoder = make_encoder(enc_cfg)
    torch.manual_seed(cfg.seed)
    meta = PolicyMeta(
        models=list(data.models),
        tau=fit_tau(data.costs, cfg.tau_quantile),
        embed_dim=int(encoder.dim),
        encoder=enc_cfg,
        encoder_id=encoder.encoder_id,
        network=cfg.network,
        training={"cold_start": True, "seed": cfg.seed, "data_fingerprint": data.fingerprint()},
    )
    return RoutingPolicy(meta)


# --- the replay traffic driver ------------------------------------------------------


class TrafficState:
    """What the driver has done so far (read by the progress view and the summary)."""

    def __init__(self, models: list[str], window: int):
        self.models = models
        self.window = window
        self.decisions = 0
        self.claimed = 0
        self.rewards_acknowledged = 0
        self.feedback_status: Counter[str] = Counter()
        self.route_errors = 0
        self.feedback_errors = 0
        self.last_error: str | None = None
        self.rewards: list[float] = []
        self.chosen: list[int] = []
        self.versions: list[int] = []
        self.reward_curve: list[list[float]] = []
        self.route_ms: list[float] = []
        self.feedback_ms: list[float] = []
        self._recent: deque[float] = deque(maxlen=window)
        self._recent_sum = 0.0
        self.started = time.monotonic()

    def record(self, reward: float, model_index: int, version: int) -> None:
        if len(self._recent) == self._recent.maxlen:
            self._recent_sum -= self._recent[0]
        self._recent.append(reward)
        self._recent_sum += reward
        self.decisions += 1
        self.rewards.append(reward)
        self.chosen.append(model_index)
        self.versions.append(version)

    @property
    def running_reward(self) -> float:
        return self._recent_sum / len(self._recent) if self._recent else float("nan")

    def curve_point(self) -> None:
        if self.decisions and (not self.reward_curve or self.reward_curve[-1][0] != self.decisions):
            self.reward_curve.append([self.decisions, round(self.running_reward, 6)])

    def share(self, last: int) -> dict[str, float]:
        recent = self.chosen[-last:]
        if not recent:
            return {}
        counts = Counter(recent)
        return {self.models[k]: counts[k] / len(recent) for k in sorted(counts, key=lambda k: -counts[k])}


async def drive_traffic(
    base_url: str,
    data,
    tau: float,
    pool: list[str],
    state: TrafficState,
    max_decisions: int,
    concurrency: int,
    seed: int,
    max_error_fraction: float,
    stop: asyncio.Event,
) -> None:
    """Route random prompts (explore, random preference), post each chosen model's logged outcome."""
    import httpx

    from banditroute.policy.reward import reward

    rng = np.random.default_rng(seed)
    data_index = {m: k for k, m in enumerate(data.models)}
    candidates = [m for m in pool if m in data_index]
    send_candidates = sorted(candidates) != sorted(pool)
    scores, costs = data.scores_filled, data.costs
    curve_every = max(1, (max_decisions or 10_000) // 400)
    limits = httpx.Limits(max_connections=concurrency * 2, max_keepalive_connections=concurrency * 2)

    def too_many_errors() -> bool:
        errors = state.route_errors + state.feedback_errors
        return errors >= 50 and errors > max_error_fraction * max(1, state.decisions + errors)

    async with httpx.AsyncClient(base_url=base_url, timeout=60.0, limits=limits, trust_env=False) as client:

        async def worker() -> None:
            while not stop.is_set() and (max_decisions == 0 or state.claimed < max_decisions):
                state.claimed += 1
                row = int(rng.integers(len(data)))
                w = float(rng.uniform(0.0, 1.0))
                body: dict[str, Any] = {"prompt": data.prompts[row], "preference": {"quality": 1.0 - w, "cost": w}, "mode": "explore"}
                if send_candidates:
                    body["candidates"] = candidates
                t0 = time.perf_counter()
                error = None
                try:
                    resp = await client.post("/v1/route", json=body)
                    decision = resp.json()
                except (httpx.HTTPError, ValueError) as exc:
                    error = f"route: {type(exc).__name__}: {exc}"
                else:
                    if resp.status_code != 200:
                        error = f"route: HTTP {resp.status_code}: {resp.text[:200]}"
                if error is not None:
                    state.claimed -= 1
                    state.route_errors += 1
                    state.last_error = error
                    await asyncio.sleep(0.1)
                    if too_many_errors():
                        stop.set()
                    continue
                state.route_ms.append((time.perf_counter() - t0) * 1000.0)
                k = data_index[decision["model"]]
                score, cost = float(scores[row, k]), float(costs[row, k])
                state.record(float(reward(score, cost, w, tau)), k, int(decision.get("policy_version", -1)))
                if state.decisions % curve_every == 0:
                    state.curve_point()
                t0 = time.perf_counter()
                try:
                    fb = await client.post("/v1/feedback", json={"decision_id": decision["decision_id"], "score": score, "cost": cost})
                    # 409 = "duplicate": the decision was already rewarded; idempotent, not an error.
                    status = fb.json().get("status", f"http-{fb.status_code}") if fb.status_code in (200, 409) else f"http-{fb.status_code}"
                except (httpx.HTTPError, ValueError) as exc:
                    status = type(exc).__name__
                state.feedback_ms.append((time.perf_counter() - t0) * 1000.0)
                state.feedback_status[status] += 1
                if status == "accepted":
                    state.rewards_acknowledged += 1
                elif status != "duplicate":
                    state.feedback_errors += 1
                    state.last_error = f"feedback: {status}"
                    if too_many_errors():
                        stop.set()

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    state.curve_point()


# --- progress view -----------------------------------------------------------------


class ProgressView:
    """A refreshing block on a terminal; one plain line per update otherwise."""

    def __init__(self, state: TrafficState, max_decisions: int, stream=None):
        self.state = state
        self.max_decisions = max_decisions
        self.stream = stream or sys.stdout
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self._lines = 0
        self._last_t = time.monotonic()
        self._last_n = 0

    def update(self, version: int, replica_versions: dict[str, int], learner: dict[str, Any] | None, feedback: dict[str, Any] | None) -> None:
        s = self.state
        now = time.monotonic()
        rate = (s.decisions - self._last_n) / max(1e-9, now - self._last_t)
        self._last_t, self._last_n = now, s.decisions
        total = f"/{self.max_decisions}" if self.max_decisions else ""
        replicas = sorted(replica_versions.values())
        rep_text = f"replicas v{replicas[0]}..v{replicas[-1]}" if replicas else "replicas -"
        share = s.share(s.window)
        updates = learner.get("updates", 0) if learner else 0
        if not self.tty:
            top = ", ".join(f"{m.split('/')[-1]} {p:.0%}" for m, p in list(share.items())[:4])
            print(
                f"[up {now - s.started:6.1f}s] decisions {s.decisions}{total} ({rate:.1f}/s), running reward {s.running_reward:+.4f}, "
                f"policy v{version} ({rep_text}, {updates} updates), acked {s.rewards_acknowledged}, "
                f"errors {s.route_errors + s.feedback_errors}; traffic: {top}",
                file=self.stream, flush=True,
            )
            return
        lines = [
            f"banditroute up  {now - s.started:7.1f}s   decisions {s.decisions}{total}   {rate:6.1f} decisions/s",
            f"running reward (last {min(s.window, s.decisions)}) {s.running_reward:+.4f}   mean so far {np.mean(s.rewards) if s.rewards else float('nan'):+.4f}",
            f"policy v{version}   {rep_text}   learner updates {updates}   rewards acked {s.rewards_acknowledged}   "
            f"errors {s.route_errors + s.feedback_errors}",
        ]
        if feedback:
            lines.append(
                f"feedback: pending {feedback.get('pending', 0)}  duplicate {feedback.get('rewards_duplicate', 0)}  "
                f"late {feedback.get('rewards_late', 0)}  unknown {feedback.get('rewards_unknown', 0)}  "
                f"queued for learner {feedback.get('queued_for_learner', 0)}"
            )
        lines.append("traffic share (recent):")
        for model, p in list(share.items())[:12]:
            lines.append(f"  {model[:38]:38s} {p:6.1%} {'#' * int(round(p * 40))}")
        out = ""
        if self._lines:
            out += f"\x1b[{self._lines}F"
        out += "".join(f"\x1b[2K{line}\n" for line in lines)
        if len(lines) < self._lines:
            out += "".join("\x1b[2K\n" for _ in range(self._lines - len(lines)))
            out += f"\x1b[{self._lines - len(lines)}F"
        self.stream.write(out)
        self.stream.flush()
        self._lines = len(lines)


# --- plot ------------------------------------------------------------------------


def plot_learning_curve(path: Path, curve: list[list[float]], versions: list[list[float]], title: str,
                        reference: dict[str, float] | None = None) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    if curve:
        xs, ys = zip(*curve)
        ax.plot(xs, ys, label="running mean reward (online, explore)", color="tab:blue")
    for i, (name, level) in enumerate((reference or {}).items()):
        ax.axhline(level, linestyle="--", color=f"C{i + 2}", label=name)
    ax.set_xlabel("decisions")
    ax.set_ylabel("reward")
    ax.grid(alpha=0.3)
    handles, labels = ax.get_legend_handles_labels()
    if versions:
        ax2 = ax.twinx()
        vx, vy = zip(*versions)
        ax2.plot(vx, vy, color="tab:gray", alpha=0.5, linewidth=1, label="policy version (right axis)")
        ax2.set_ylabel("policy version")
        h2, l2 = ax2.get_legend_handles_labels()
        handles, labels = handles + h2, labels + l2
    ax.legend(handles, labels, loc="lower right", fontsize=8)
    ax.set_title(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# --- the loop's actors, for any deployment ---------------------------------------------


def ensure_online_loop(
    storage: StorageConfig,
    initial_state: dict[str, Any] | None = None,
    feedback: FeedbackConfig | dict | None = None,
    learner: LearnerConfig | dict | None = None,
    actor_prefix: str = "banditroute",
    learner_num_cpus: float = 0.0,
    feedback_num_cpus: float = 0.0,
) -> dict[str, Any]:
    """Create (or find) the parameter server, learner and feedback actors; returns their handles.

    Idempotent (named actors, ``get_if_exists``), so a Serve application
    builder, a KubeRay job or `banditroute up` can all call it. Without an
    existing checkpoint in ``storage``, ``initial_state`` (a
    ``RoutingPolicy.state()``) is the starting point; with one, the learner
    resumes from it. Router replicas then take ``parameter_server_name =
    <prefix>-parameter-server`` and the ``feedback-actor`` decision sink with
    ``name = <prefix>-feedback`` (namespace ``banditroute``).
    """
    import ray

    from banditroute.feedback.actor import get_or_create_feedback_actor
    from banditroute.learner.actor import get_or_create_learner_actor
    from banditroute.core.names import NAMESPACE
    from banditroute.learner.param_server import get_or_create_parameter_server

    from banditroute.core.config import from_dict

    lcfg = learner if isinstance(learner, LearnerConfig) else from_dict(LearnerConfig, learner or {}, prefix="learner")
    from banditroute.core.names import ActorNames

    names = ActorNames.for_prefix(actor_prefix).as_dict()
    ps = get_or_create_parameter_server(names["parameter_server"], NAMESPACE, storage, lcfg.checkpoint_prefix)
    la = get_or_create_learner_actor(lcfg, storage, initial_state, name=names["learner"],
                                     parameter_server_name=names["parameter_server"], num_cpus=learner_num_cpus)
    status = ray.get(la.status.remote())
    fa = get_or_create_feedback_actor(feedback, storage, names["feedback"], learner_name=names["learner"],
                                      num_cpus=feedback_num_cpus)
    ray.get(fa.ping.remote())
    return {"parameter_server": ps, "learner": la, "feedback": fa, "names": names, "learner_status": status}


# --- the main job -----------------------------------------------------------------


def _serve_http_port() -> int | None:
    """Port of an already running Serve HTTP proxy in this Ray cluster, if any."""
    try:
        from ray.serve.context import _get_global_client

        client = _get_global_client()
        if client is None:
            return None
        return int(client.http_config.port)
    except Exception:  # noqa: BLE001
        return None


def _wait_healthy(base_url: str, timeout_s: float, want_replicas: int) -> dict[str, Any]:
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


def run_up(cfg: UpConfig) -> dict[str, Any]:
    """Start everything, drive traffic, stop, write summary.json and learning_curve.png; returns the summary."""
    cfg.validate()
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one INFO line per request otherwise
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from banditroute.core.data import load_routing_data, resolve_data_path

    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    data_path = resolve_data_path(cfg.data)
    data = load_routing_data(data_path)
    policy = starting_policy(cfg, data)
    storage = cfg.storage or StorageConfig(uri=str((out / "storage" / datetime.now().strftime("run-%Y%m%d-%H%M%S")).resolve()))
    print(f"banditroute up: {len(data)} prompts x {data.n_models} models from {data_path}; "
          f"{'warm start from ' + cfg.policy if cfg.policy else 'cold start (random weights)'} v{policy.policy_version}, "
          f"encoder {policy.meta.encoder.name}, tau={policy.tau:.6g}; storage {storage.uri}", flush=True)

    import ray

    owns_ray = not ray.is_initialized()
    if owns_ray:
        from banditroute.core.security import SecurityConfig, ensure_local_secret

        ensure_local_secret(SecurityConfig())  # the router's default secret variable; ephemeral (warned) when unset
        env = {k: os.environ[k] for k in ("RAY_AUTH_MODE", "HF_HUB_OFFLINE", "TOKENIZERS_PARALLELISM", "RAY_USAGE_STATS_ENABLED",
                                          SecurityConfig().token_secret_env) if k in os.environ}
        needed = cfg.replicas * cfg.replica_num_cpus + 2
        ray.init(num_cpus=int(math.ceil(max(float(os.cpu_count() or 1), needed))), include_dashboard=False,
                 log_to_driver=False, runtime_env={"env_vars": env})
    try:
        return _run_on_ray(cfg, data, policy, storage, out, owns_ray)
    finally:
        if owns_ray:
            # ray.shutdown() takes Serve down with the cluster (serve.shutdown() first only adds a
            # noisy "graceful_shutdown failed" line from the killed controller).
            ray.shutdown()


def _run_on_ray(cfg: UpConfig, data, policy, storage: StorageConfig, out: Path, owns_ray: bool) -> dict[str, Any]:
    import ray
    from ray import serve

    from banditroute.core.names import NAMESPACE
    from banditroute.cluster.app import build_app
    from banditroute.serve.config import RouterConfig

    names = cfg.names
    handles: dict[str, Any] = {}
    app_deployed = False
    try:
        loop = ensure_online_loop(storage, policy.state(), cfg.feedback, cfg.learner, cfg.actor_prefix)
        handles.update({k: loop[k] for k in ("parameter_server", "learner", "feedback")})
        ps, learner, feedback = loop["parameter_server"], loop["learner"], loop["feedback"]
        start_status = loop["learner_status"]

        port = _serve_http_port()
        if port is None:
            port = cfg.port or free_port(cfg.host)
            serve.start(http_options={"host": cfg.host, "port": port})
        router_cfg = RouterConfig(
            policy=None,
            app_name=cfg.app_name,
            host=cfg.host,
            port=port,
            num_replicas=cfg.replicas,
            num_cpus=cfg.replica_num_cpus,
            num_gpus=0.0,
            ingress_num_cpus=0.1,
            torch_threads=1,
            seed=cfg.seed,
            default_mode="explore",
            decision_sink="feedback-actor",
            decision_sink_options={"name": names["feedback"], "namespace": NAMESPACE},
            parameter_server_name=names["parameter_server"],
            parameter_server_namespace=NAMESPACE,
            learner_actor_name=names["learner"],
            weights_poll_timeout_s=WEIGHTS_POLL_TIMEOUT_S,
        )
        serve.run(build_app(router_cfg), name=cfg.app_name, route_prefix="/", blocking=False)
        app_deployed = True
        base_url = f"http://{cfg.host}:{port}"
        health = _wait_healthy(base_url, cfg.ready_timeout_s, cfg.replicas)
        pool = list(health["models"])
        print(f"router ready at {base_url} ({cfg.replicas} replicas, policy v{health['policy_version']}); "
              f"driving {cfg.max_decisions or 'unlimited'} decisions with {cfg.concurrency} in flight", flush=True)

        state = TrafficState(list(data.models), min(cfg.curve_window, max(1, cfg.max_decisions or cfg.curve_window)))
        version_curve: list[list[float]] = []
        view = ProgressView(state, cfg.max_decisions)
        started = time.monotonic()
        try:
            asyncio.run(_drive_with_progress(cfg, base_url, data, policy.tau, pool, state, view, ps, learner, feedback, version_curve))
        except KeyboardInterrupt:  # Ctrl-C: stop the traffic, still drain and write the summary (a 2nd Ctrl-C aborts)
            print("\nbanditroute up: stopping the traffic; draining and writing the summary", flush=True)
        drive_s = time.monotonic() - started

        # Drain: every acknowledged event to the learner, then wait for every replica to serve the final version.
        ray.get(feedback.flush.remote(cfg.settle_timeout_s))
        final_status = ray.get(learner.status.remote())
        final_version = int(final_status["policy_version"])
        replica_versions = _wait_replicas(ps, final_version, cfg.replicas, cfg.settle_timeout_s)
        checkpoint = ray.get(learner.shutdown.remote())
        fb_stats = ray.get(feedback.stats.remote())
        events_in_log = int(ray.get(feedback.events_in_log.remote()))
        log_uri = ray.get(feedback.log_uri.remote())
        summary = {
            "decisions": state.decisions,
            "rewards_acknowledged": state.rewards_acknowledged,
            "events_in_log": events_in_log,
            "policy_version_start": int(start_status["start_version"]),
            "policy_version_end": final_version,
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
            "replicas": cfg.replicas,
            "cold_start": cfg.policy is None,
            "storage": log_uri,
            "checkpoint": checkpoint,
            "tau": policy.tau,
        }
        (out / "summary.json").write_text(json.dumps(summary, indent=2))
        plot_learning_curve(
            out / "learning_curve.png", state.reward_curve, version_curve,
            f"banditroute up: {'cold' if cfg.policy is None else 'warm'} start, {policy.meta.encoder.name} encoder, "
            f"{cfg.replicas} replicas",
        )
        print(f"done: {state.decisions} decisions, {state.rewards_acknowledged} rewards acknowledged, {events_in_log} events in the log, "
              f"policy v{summary['policy_version_start']} -> v{final_version}, replicas {sorted(set(replica_versions.values()))}; "
              f"running reward {summary['final_running_reward']}", flush=True)
        gate = summary["promotion"]
        if gate.get("enabled"):
            print(f"promotion gate: candidate v{summary['learner']['candidate_version']}, serving v{final_version}; "
                  f"{gate['promoted_recent']} of the last {gate['checks_recent']} checks promoted; last: {gate['last_reason']}",
                  flush=True)
        print(out / "summary.json", flush=True)
        return summary
    finally:
        if app_deployed and not owns_ray:
            try:
                serve.delete(cfg.app_name)
            except Exception:  # noqa: BLE001
                pass
        for key in ("feedback", "learner", "parameter_server"):
            if key in handles:
                try:
                    ray.kill(handles[key], no_restart=True)
                except Exception:  # noqa: BLE001
                    pass


async def _drive_with_progress(cfg, base_url, data, tau, pool, state, view, ps, learner, feedback, version_curve) -> None:
    stop = asyncio.Event()
    driver = asyncio.create_task(
        drive_traffic(base_url, data, tau, pool, state, cfg.max_decisions, cfg.concurrency, cfg.seed, cfg.max_error_fraction, stop)
    )
    try:
        while not driver.done():
            await asyncio.wait({driver}, timeout=cfg.progress_interval_s)
            try:
                version, replicas, lstat, fstat = await asyncio.gather(
                    ps.latest_version.remote(), ps.replica_versions.remote(REPLICA_MAX_AGE_S), learner.status.remote(), feedback.stats.remote()
                )
            except Exception:  # noqa: BLE001 - an actor restarting: show what we have
                version, replicas, lstat, fstat = -1, {}, None, None
            version_curve.append([state.decisions, version])
            view.update(version, replicas, lstat, fstat)
        await driver
    except (KeyboardInterrupt, asyncio.CancelledError):
        stop.set()
        await driver
    if state.route_errors + state.feedback_errors and stop.is_set() and cfg.max_decisions and state.decisions < cfg.max_decisions:
        raise RuntimeError(f"too many failed requests ({state.route_errors} route, {state.feedback_errors} feedback); last: {state.last_error}")


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


def _wait_replicas(ps, version: int, replicas: int, timeout_s: float) -> dict[str, int]:
    import ray

    deadline = time.monotonic() + timeout_s
    versions: dict[str, int] = {}
    while time.monotonic() < deadline:
        versions = ray.get(ps.replica_versions.remote(REPLICA_MAX_AGE_S))
        current = [v for v in versions.values()]
        if len(current) >= replicas and sorted(current)[-replicas:] and all(v >= version for v in sorted(current)[-replicas:]):
            break
        time.sleep(0.2)
    return versions
