"""`banditroute serve`: start a local Ray, the Serve HTTP proxy and the router app; block until Ctrl-C."""

from __future__ import annotations

import argparse
import os
import signal
import time
import urllib.request

from banditroute.core.config import parse_set_args

HELP = "serve the router over HTTP on a local Ray (POST /v1/route, /v1/chat/completions); blocks until Ctrl-C"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--policy", help="policy checkpoint folder (e.g. runs/latest/policy)")
    parser.add_argument("--host", help="HTTP interface (default 127.0.0.1)")
    parser.add_argument("--port", type=int, help="HTTP port (default 8000)")
    parser.add_argument("--replicas", type=int, help="Router replicas (default 1)")
    parser.add_argument("--config", help="YAML with RouterConfig keys (the whole file or its `serve:` section)")
    parser.add_argument("--replay-data", metavar="PATH", help="start the replay upstream on this routing data (enables replay)")
    parser.add_argument("--replay", action="store_true", help="start the replay upstream on the default routing data")
    parser.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a RouterConfig key, e.g. --set max_batch_size=128")
    parser.add_argument("--num-cpus", type=float, help="logical CPUs of the local Ray (default: enough for the replicas)")
    parser.add_argument("--metrics-port", type=int, help="Prometheus export port of Ray's metrics agent (default: chosen by Ray, printed)")
    parser.add_argument("--ready-timeout", type=float, default=300.0, help="seconds to wait for GET /healthz to answer 200")


def _overrides(args: argparse.Namespace) -> dict:
    overrides: dict = dict(parse_set_args(args.set))
    for key, value in (("policy", args.policy), ("host", args.host), ("port", args.port), ("num_replicas", args.replicas)):
        if value is not None:
            overrides[key] = value
    if args.replay_data:
        overrides["replay.enabled"] = True
        overrides["replay.data_path"] = args.replay_data
    elif args.replay:
        overrides["replay.enabled"] = True
    return overrides


def _wait_healthy(url: str, timeout_s: float) -> dict | None:
    import json

    deadline = time.time() + timeout_s
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=5) as resp:
                if resp.status == 200:
                    return json.loads(resp.read())
        except Exception:  # noqa: BLE001 - not up yet
            pass
        time.sleep(0.5)
    return None


def run(args: argparse.Namespace) -> int:
    from banditroute.serve.config import load_router_config

    cfg = load_router_config(args.config, _overrides(args))
    for var, value in (("RAY_AUTH_MODE", "disabled"), ("RAY_USAGE_STATS_ENABLED", "0")):
        os.environ.setdefault(var, value)
    from banditroute.core.security import ensure_local_secret

    # Local run: without a configured secret, an ephemeral one (warned about) so replicas can sign tokens.
    ensure_local_secret(cfg.security)
    import ray
    from ray import serve

    from banditroute.cluster.app import build_app

    needed = cfg.num_replicas * cfg.num_cpus + cfg.ingress_replicas * cfg.ingress_num_cpus + 0.5
    num_cpus = args.num_cpus or max(float(os.cpu_count() or 1), needed)
    env = {k: os.environ[k] for k in ("RAY_AUTH_MODE", "HF_HUB_OFFLINE", "TOKENIZERS_PARALLELISM", cfg.security.token_secret_env)
           if k in os.environ}
    init_kwargs = {"_metrics_export_port": args.metrics_port} if args.metrics_port else {}
    ray.init(num_cpus=int(num_cpus + 0.999), include_dashboard=False, runtime_env={"env_vars": env}, **init_kwargs)

    def _terminate(signum, frame):  # SIGTERM: same clean shutdown as Ctrl-C
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, _terminate)
    # A shell starts background jobs with SIGINT ignored, and Python then keeps it
    # ignored: re-arm it so Ctrl-C / kill -INT always stops the server cleanly.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        serve.start(http_options={"host": cfg.host, "port": cfg.port})
        serve.run(build_app(cfg), name=cfg.app_name, route_prefix=cfg.route_prefix, blocking=False)
        host = "127.0.0.1" if cfg.host in ("0.0.0.0", "::") else cfg.host
        base = f"http://{host}:{cfg.port}{cfg.route_prefix.rstrip('/')}"
        health = _wait_healthy(base + "/healthz", args.ready_timeout)
        if health is None:
            print(f"banditroute serve: {base}/healthz did not answer 200 within {args.ready_timeout:g}s", flush=True)
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
            serve.shutdown()
        finally:
            ray.shutdown()
