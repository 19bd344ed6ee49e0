"""`banditroute serve`: start a local Ray (or join the cluster ``start`` names), the Serve HTTP proxy and the
router app of an application config; block until Ctrl-C."""

from __future__ import annotations

import argparse
import os
import signal
import time

from banditroute.core.config import parse_set_args

HELP = "serve the router over HTTP on a local Ray (POST /v1/route, /v1/chat/completions); blocks until Ctrl-C"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--policy", help="policy checkpoint folder, e.g. runs/latest/policy (router.policy)")
    parser.add_argument("--host", help="HTTP interface (router.host; default 127.0.0.1)")
    parser.add_argument("--port", type=int, help="HTTP port (router.port; default 8000)")
    parser.add_argument("--replicas", type=int, help="Router replicas (router.num_replicas; default 1)")
    parser.add_argument("--config", help="application config YAML (configs/app.example.yaml: start, router, storage, online, ...)")
    parser.add_argument("--replay-data", metavar="PATH", help="start the replay upstream on this routing data (router.replay.*)")
    parser.add_argument("--replay", action="store_true", help="start the replay upstream on the default routing data")
    parser.add_argument("--set", action="append", metavar="KEY=VALUE",
                        help="override a config key, e.g. --set router.max_batch_size=128 (after BANDITROUTE__* env vars)")
    parser.add_argument("--num-cpus", type=int, help="logical CPUs of a local Ray (start.num_cpus; default: enough for the replicas)")
    parser.add_argument("--metrics-port", type=int, help="Prometheus export port of Ray's metrics agent (default: chosen by Ray, printed)")
    parser.add_argument("--ready-timeout", type=float, default=300.0, help="seconds to wait for GET /healthz to answer 200")


def overrides_from_flags(args: argparse.Namespace) -> dict:
    """The dotted application-config overrides the flags stand for (``--set`` pairs first; flags win)."""
    overrides: dict = dict(parse_set_args(args.set))
    for key, value in (("router.policy", args.policy), ("router.host", args.host), ("router.port", args.port),
                       ("router.num_replicas", args.replicas), ("start.num_cpus", args.num_cpus)):
        if value is not None:
            overrides[key] = value
    if args.replay_data:
        overrides["router.replay.enabled"] = True
        overrides["router.replay.data_path"] = args.replay_data
    elif args.replay:
        overrides["router.replay.enabled"] = True
    return overrides


def run(args: argparse.Namespace) -> int:
    import math

    from banditroute.cluster.config import load_app_config
    from banditroute.cluster.launch import start_ray

    app = load_app_config(args.config, overrides_from_flags(args))
    cfg = app.router
    for var, value in (("RAY_AUTH_MODE", "disabled"), ("RAY_USAGE_STATS_ENABLED", "0")):
        os.environ.setdefault(var, value)
    import ray
    from ray import serve

    from banditroute.cluster.app import build_app
    from banditroute.cluster.up import wait_healthy

    init_kwargs: dict = {"include_dashboard": False}
    if args.metrics_port:
        init_kwargs["_metrics_export_port"] = args.metrics_port
    if app.start.mode == "local" and app.start.num_cpus is None:
        needed = cfg.num_replicas * cfg.num_cpus + cfg.ingress_replicas * cfg.ingress_num_cpus + 0.5
        init_kwargs["num_cpus"] = int(math.ceil(max(float(os.cpu_count() or 1), needed)))
    # Local mode: without a configured token secret, an ephemeral one (warned about) so replicas can sign tokens.
    start_ray(app, **init_kwargs)

    def _terminate(signum, frame):  # SIGTERM: same clean shutdown as Ctrl-C
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, _terminate)
    # A shell starts background jobs with SIGINT ignored, and Python then keeps it
    # ignored: re-arm it so Ctrl-C / kill -INT always stops the server cleanly.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        serve.start(http_options={"host": cfg.host, "port": cfg.port})
        serve.run(build_app(app), name=cfg.app_name, route_prefix=cfg.route_prefix, blocking=False)
        host = "127.0.0.1" if cfg.host in ("0.0.0.0", "::") else cfg.host
        base = f"http://{host}:{cfg.port}{cfg.route_prefix.rstrip('/')}"
        try:
            health = wait_healthy(base, args.ready_timeout)
        except RuntimeError as exc:
            print(f"banditroute serve: {exc}", flush=True)
            return 1
        print(f"banditroute router ready at {base} (policy v{health['policy_version']}, models {health['models']})", flush=True)
        print(f"  POST {base}/v1/route  POST {base}/v1/chat/completions  GET {base}/healthz  (Ctrl-C stops)", flush=True)
        metrics_port = next((n.get("MetricsExportPort") for n in ray.nodes() if n.get("Alive")), None)
        if metrics_port:
            print(f"  Prometheus metrics (ray_banditroute_*): http://{host}:{metrics_port}/metrics", flush=True)
        while True:
            time.sleep(1.0)
    except KeyboardInterrupt:
        print("banditroute serve: shutting down", flush=True)
        return 0
    finally:
        try:
            if app.start.mode == "local":
                serve.shutdown()
            else:  # a shared cluster: take down only this application
                serve.delete(cfg.app_name)
        finally:
            ray.shutdown()
