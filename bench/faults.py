"""Faults survived: the four scenarios of tests/fault_scenarios.py with more traffic; writes bench/results/faults.json.

    python bench/faults.py [--n 300] [--concurrency 12] [--only router,feedback,learner,s3] [--out bench/results/faults.json]

One row per fault: fault, requests sent (route + feedback), failed (after
the client retry policy of serve/http_client.py), rewards acknowledged,
rewards found in the durable log, time to recover (s), and the command that
reproduces the row. Runs a local Ray (loopback only) and a moto S3 server.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("BANDITROUTE_TOKEN_SECRET", "bench-secret-" + os.urandom(16).hex())

SCENARIOS = ("router", "feedback", "learner", "s3")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=300, help="prompts routed and rewarded per scenario")
    ap.add_argument("--concurrency", type=int, default=12)
    ap.add_argument("--outage-s", type=float, default=6.0, help="S3 outage length (seconds)")
    ap.add_argument("--spool-max-events", type=int, default=150)
    ap.add_argument("--only", default=",".join(SCENARIOS))
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "faults.json"))
    args = ap.parse_args(argv)
    only = [s for s in args.only.split(",") if s]

    import ray
    from ray import serve

    from banditroute.testkit import fault_scenarios as fs
    from banditroute.testkit.s3server import S3_TEST_ENV, S3Proxy, acquire_server, release_server

    os.environ.update(S3_TEST_ENV)
    ray.init(num_cpus=8, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"RAY_AUTH_MODE": "disabled", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
                                       "BANDITROUTE_TOKEN_SECRET": os.environ["BANDITROUTE_TOKEN_SECRET"], **S3_TEST_ENV}})
    port = fs.free_port() if hasattr(fs, "free_port") else _free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    workdir = tempfile.mkdtemp(prefix="bench-faults-")
    base_cmd = f"python bench/faults.py --n {args.n} --concurrency {args.concurrency}"
    rows = []
    try:
        for name in only:
            start = time.monotonic()
            if name == "router":
                r = fs.kill_router_replica(port, workdir, args.n, args.concurrency)
            elif name == "feedback":
                r = fs.kill_feedback_actor(port, workdir, args.n, args.concurrency)
            elif name == "learner":
                r = fs.kill_learner(port, workdir, args.n, args.concurrency)
            elif name == "s3":
                server = acquire_server()
                proxy = S3Proxy(server)
                proxy.up()
                try:
                    r = fs.s3_outage(port, workdir, proxy, args.n, args.concurrency, args.outage_s, args.spool_max_events)
                finally:
                    proxy.down()
                    release_server()
            else:
                raise SystemExit(f"--only: unknown scenario {name!r}; known: {SCENARIOS}")
            extra = f" --outage-s {args.outage_s} --spool-max-events {args.spool_max_events}" if name == "s3" else ""
            r["command"] = f"{base_cmd} --only {name}{extra}"
            r["scenario_s"] = round(time.monotonic() - start, 1)
            print(json.dumps({k: v for k, v in r.items() if k != "errors"}, default=str), flush=True)
            rows.append(r)
    finally:
        serve.shutdown()
        ray.shutdown()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    result = {
        "bench": "faults",
        "columns": ["fault", "requests_sent", "failed", "rewards_acknowledged", "rewards_found_in_log", "recover_s", "command"],
        "notes": ("requests = route + feedback calls with the client RetryPolicy defaults (serve/http_client.py); failed = "
                  "after retries; rewards_found_in_log counts recorded rewards (accepted, or duplicate after a retried "
                  "accept) present in the event log; rewards_logged_twice must be 0. recover_s: router = kill until both "
                  "replicas (the new one included) report the newest version; feedback/learner = kill until the restarted "
                  "actor answers; s3 = storage back until the spool is drained."),
        "host": {"cpus": os.cpu_count(), "python": platform.python_version()},
        "rows": rows,
    }
    out.write_text(json.dumps(result, indent=2, default=str) + "\n")
    print(f"wrote {out}")
    bad = [r["fault"] for r in rows if r["failed"] or r["rewards_found_in_log"] != r["rewards_recorded"] or r["rewards_logged_twice"]]
    return 1 if bad else 0


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


if __name__ == "__main__":
    sys.exit(main())
