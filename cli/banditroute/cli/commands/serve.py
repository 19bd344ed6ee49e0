"""`banditroute serve`: the router over HTTP on a local Ray (or the cluster ``start`` names), learning online from
POST /v1/feedback by default (``--frozen``: a fixed checkpoint); blocks until Ctrl-C."""

from __future__ import annotations

import argparse
from pathlib import Path

from banditroute.core.config import parse_set_args

HELP = ("serve the router over HTTP (POST /v1/route, /v1/chat/completions, /v1/feedback) and learn online from the "
        "feedback: feedback actor, learner and parameter server over --storage (default runs/serve/storage); "
        "--frozen serves a fixed checkpoint; blocks until Ctrl-C")

# Each flag is a dotted override of the application config (cluster/config.py). --policy is both the
# starting policy of the loop and, with --frozen, the policy served as it is.
FLAG_KEYS: dict[str, tuple[str, ...]] = {
    "policy": ("router.policy", "online.initial_policy"),
    "host": ("router.host",),
    "port": ("router.port",),
    "replicas": ("router.num_replicas",),
    "num_cpus": ("start.num_cpus",),
    "storage": ("storage.uri",),
    "endpoint_url": ("storage.endpoint_url",),
    "allow_open": ("router.security.allow_open_bind",),
}
_PATH_FLAGS = ("policy", "storage")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from banditroute.cluster.runner import DEFAULT_SERVE_STORAGE

    parser.add_argument("--policy", help="BaRP checkpoint folder or storage URI, e.g. runs/latest/policy: the starting policy "
                                         "while storage holds no checkpoint yet (online.initial_policy; later starts resume "
                                         "from storage); with --frozen the policy served as it is (router.policy)")
    parser.add_argument("--frozen", action="store_true",
                        help="serve --policy as it is, with no online loop (online.enabled=false): POST /v1/feedback answers 405")
    parser.add_argument("--storage", help=f"event log + checkpoints of the online loop: a folder or s3://bucket/prefix "
                                          f"(storage.uri; default {DEFAULT_SERVE_STORAGE}, kept across restarts)")
    parser.add_argument("--endpoint-url", help="S3-compatible endpoint for --storage s3://... (storage.endpoint_url; MinIO)")
    parser.add_argument("--host", help="HTTP interface (router.host; default 127.0.0.1)")
    parser.add_argument("--allow-open", action="store_true", default=None,
                        help="serve a non-loopback --host even though the route or feedback API has no keys "
                             "(router.security.allow_open_bind; refused otherwise)")
    parser.add_argument("--port", type=int, help="HTTP port (router.port; default 8000; 0 = a free port)")
    parser.add_argument("--replicas", type=int, help="replicas that decide (router.num_replicas; default 1): the ingress replicas with "
                                                   "placement auto on CPU, Router replicas on a GPU with MiniLM")
    parser.add_argument("--config", help="application config YAML (configs/app.example.yaml: start, router, storage, online, ...)")
    parser.add_argument("--replay-data", metavar="PATH", help="start the replay upstream on this routing data (router.replay.*)")
    parser.add_argument("--replay", action="store_true", help="start the replay upstream on the default routing data")
    parser.add_argument("--set", action="append", metavar="KEY=VALUE",
                        help="override a config key, e.g. --set router.max_batch_size=128 --set learner.promotion.enabled=false "
                             "(after BANDITROUTE__* env vars)")
    parser.add_argument("--num-cpus", type=int, help="logical CPUs of a local Ray (start.num_cpus; default: enough for the app)")
    parser.add_argument("--metrics-port", type=int, help="Prometheus export port of Ray's metrics agent (default: chosen by Ray, printed)")
    parser.add_argument("--ready-timeout", type=float, default=300.0, help="seconds to wait for GET /healthz to answer 200")


def overrides_from_flags(args: argparse.Namespace) -> dict:
    """The dotted application-config overrides the flags stand for (``--set`` pairs first; flags win)."""
    overrides: dict = dict(parse_set_args(args.set))
    for flag, keys in FLAG_KEYS.items():
        value = getattr(args, flag, None)
        if value is None:
            continue
        if flag in _PATH_FLAGS and "://" not in value:
            value = str(Path(value).expanduser())
        for key in keys:
            overrides[key] = value
    if args.replay_data:
        overrides["router.replay.enabled"] = True
        overrides["router.replay.data_path"] = args.replay_data
    elif args.replay:
        overrides["router.replay.enabled"] = True
    return overrides


def run(args: argparse.Namespace) -> int:
    from banditroute.cluster.runner import check_serve, load_serve_config, serve_until_stopped

    from banditroute.core.security import check_open_bind

    app = load_serve_config(args.config, overrides_from_flags(args), frozen=args.frozen)
    check_open_bind(app.router.host, app.router.security)
    check_serve(app)
    return serve_until_stopped(app, args.ready_timeout, args.metrics_port)
