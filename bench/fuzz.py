"""Fuzz the live router with thousands of malformed requests; write bench/results/fuzz.json.

The request generator and the checks are tests/fuzzing.py (the same as
tests/test_fuzz.py, which sends a few hundred): random JSON, broken fields,
invalid UTF-8, wrong content types, truncated JSON, NaN/huge numbers, deep
nesting, oversized bodies, missing/garbage API keys, unsigned / tampered /
expired / replayed decision tokens, unknown paths, wrong methods. The app runs
on a local Ray with API keys on every group and a 64 KiB body limit.

Pass criteria (``ok`` in the JSON): 0 responses >= 500, every 4xx carries
error.message (and error.field), 0 replica restarts, and a normal request
succeeds afterwards.

    .venv/bin/python bench/fuzz.py                     # 5000 requests
    .venv/bin/python bench/fuzz.py --requests 20000 --seed 3
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shlex
import socket
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=5000, help="malformed requests to send")
    parser.add_argument("--concurrency", type=int, default=16, help="requests in flight")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "fuzz.json"))
    args = parser.parse_args(argv)

    import httpx
    import ray
    from ray import serve

    from banditroute.core.security import SecurityConfig, ensure_local_secret, sign, verify
    from banditroute.testkit.fuzzing import KEY_VALUES, KEYS, FuzzContext, deploy_secured_app, generate, replica_ids, route_tokens, run

    ensure_local_secret(SecurityConfig())
    secret_env = SecurityConfig().token_secret_env
    os.environ.update(KEY_VALUES)
    env = {k: os.environ[k] for k in ("RAY_AUTH_MODE", "HF_HUB_OFFLINE", "TOKENIZERS_PARALLELISM", secret_env, *KEY_VALUES)}
    ray.init(num_cpus=max(4, os.cpu_count() or 1), include_dashboard=False, log_to_driver=False, runtime_env={"env_vars": env})
    port = _free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        with tempfile.TemporaryDirectory(prefix="banditroute-fuzz-") as folder:
            app = deploy_secured_app(Path(folder), port, "fuzz-bench")
            base = app["base"]
            prompts = list(app["data"].prompts)
            secret = os.environ[secret_env].split(",")[0]
            before = replica_ids(base)
            ctx = FuzzContext(tokens=route_tokens(base, prompts, 64), prompts=prompts,
                              sign=lambda d, m, v, exp: sign(d, m, v, exp, secret))
            requests = list(generate(random.Random(args.seed), args.requests, ctx))
            report = asyncio.run(run(base, requests, concurrency=args.concurrency))
            after = replica_ids(base)
            status = serve.status().applications[app["app_name"]]
            healthy = status.status == "RUNNING" and all(d.status == "HEALTHY" for d in status.deployments.values())
            r = httpx.post(base + "/v1/route", json={"prompt": prompts[0]}, headers={"x-api-key": KEYS["route"]}, timeout=30, trust_env=False)
            normal_ok = r.status_code == 200 and verify(r.json()["decision_id"], [secret], time.time()).model == r.json()["model"]
            rejections = httpx.get(base + "/v1/admin/security", headers={"x-api-key": KEYS["admin"]}, timeout=30, trust_env=False).json()
            app["cleanup"]()
    finally:
        serve.shutdown()
        ray.shutdown()

    summary = report.to_json()
    restarts = sum(a != b for a, b in zip(before, after))
    result = {
        "command": ("python bench/fuzz.py " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))).strip(),
        "seed": args.seed,
        "concurrency": args.concurrency,
        **{k: v for k, v in summary.items() if k != "examples"},
        "replica_restarts": restarts,
        "replica_ids_before": list(before),
        "replica_ids_after": list(after),
        "app_healthy_after": healthy,
        "normal_request_after_ok": normal_ok,
        "security_rejections": rejections.get("rejections"),
        "requests_per_s": round(report.requests / max(report.duration_s, 1e-9), 1),
        "ok": summary["status_5xx"] == 0 and summary["4xx_without_message"] == 0 and summary["4xx_without_field"] == 0
        and summary["transport_errors"] == 0 and restarts == 0 and healthy and normal_ok,
        "examples": summary["examples"],
        "host": {"cpus": os.cpu_count()},
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: result[k] for k in ("requests", "by_status", "status_5xx", "4xx_without_message", "4xx_without_field",
                                             "replica_restarts", "duration_s", "ok")}, indent=1))
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
