#!/usr/bin/env python
"""Served vs raw throughput of the router, on one machine (a benchmark, not a test).

1. raw: RouterCore.route_batch in this process (no Ray) at --max-batch-size,
   on the same prompts (bench/raw_inference.py).
2. served: starts a local Ray + Serve with the app (real MiniLM policy, the
   durable local decision log ON, as in production), then an async HTTP load
   generator (aiohttp, loopback only, bounded by --duration-s and
   --max-requests per point) measures throughput and p50/p99 latency of
   POST /v1/route at each --concurrency, and of POST /v1/route/batch with
   --batch-prompts prompts per call.
3. writes a JSON result and prints served/raw.

    python bench/serve_bench.py --policy runs/bench_policy/policy \
        --data ../shared/data/routerbench/train.parquet --out bench/results/serve_cpu.json

``--url http://127.0.0.1:8000`` load-tests a server that is already running
(e.g. `banditroute serve`) instead of starting one.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from raw_inference import environment, load_prompts, measure_raw  # noqa: E402


async def _load(url: str, bodies: list[dict], concurrency: int, duration_s: float, max_requests: int,
                items_per_request: int = 1) -> dict:
    """``concurrency`` closed-loop clients POSTing ``bodies`` round-robin until the deadline."""
    import aiohttp

    latencies: list[float] = []
    errors: dict[str, int] = {}
    state = {"next": 0, "sent": 0}
    deadline = time.perf_counter() + duration_s
    connector = aiohttp.TCPConnector(limit=concurrency + 8)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=120)) as session:

        async def worker():
            while time.perf_counter() < deadline and state["sent"] < max_requests:
                body = bodies[state["next"] % len(bodies)]
                state["next"] += 1
                state["sent"] += 1
                t0 = time.perf_counter()
                try:
                    async with session.post(url, json=body) as resp:
                        await resp.read()
                        if resp.status != 200:
                            errors[str(resp.status)] = errors.get(str(resp.status), 0) + 1
                            continue
                except Exception as exc:  # noqa: BLE001 - counted, the bench goes on
                    errors[type(exc).__name__] = errors.get(type(exc).__name__, 0) + 1
                    continue
                latencies.append(time.perf_counter() - t0)

        start = time.perf_counter()
        await asyncio.gather(*[worker() for _ in range(concurrency)])
        elapsed = time.perf_counter() - start
    lat = np.asarray(latencies) if latencies else np.asarray([float("nan")])
    return {
        "concurrency": concurrency,
        "requests": len(latencies),
        "errors": errors,
        "seconds": elapsed,
        "requests_per_s": len(latencies) / elapsed,
        "prompts_per_s": len(latencies) * items_per_request / elapsed,
        "latency_ms_p50": float(np.percentile(lat, 50) * 1000),
        "latency_ms_p99": float(np.percentile(lat, 99) * 1000),
    }


def _start_server(args, tmp: str) -> tuple[str, object]:
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray
    from ray import serve

    from banditroute.cluster.app import build_app
    from banditroute.cluster.config import app_config_from_dict
    from banditroute.cluster.up import free_port

    port = free_port()
    overrides = {
        "policy": str(Path(args.policy).resolve()),
        "port": port,
        "num_replicas": args.replicas,
        "max_batch_size": args.max_batch_size,
        "batch_wait_timeout_s": args.batch_wait_timeout_s,
        "torch_threads": args.torch_threads,
        "num_cpus": args.router_num_cpus,
        "ingress_num_cpus": 0.5,
        "max_batch_requests": max(args.batch_prompts, 256),
        "device": args.device,
        "decision_sink": args.sink,
        "decision_sink_options": {"path": os.path.join(tmp, "decisions")} if args.sink == "local" else {},
    }
    for pair in args.set or []:
        key, value = pair.split("=", 1)
        overrides[key] = value
    app = app_config_from_dict({}, {f"router.{key}": value for key, value in overrides.items()})
    cfg = app.router
    from banditroute.core.security import ensure_local_secret

    ensure_local_secret(cfg.security)  # the ingress signs decision tokens
    env = {k: os.environ[k] for k in ("RAY_AUTH_MODE", "HF_HUB_OFFLINE", "TOKENIZERS_PARALLELISM", cfg.security.token_secret_env)
           if k in os.environ}
    # Ray starts worker processes (the replicas) at nice 15; the raw run in this process is at
    # nice 0. On a box shared with other work that alone skews served/raw, so by default the
    # replicas get the same niceness as the raw run (--worker-niceness 15 = Ray's default).
    ray.init(num_cpus=max(4, os.cpu_count() or 1), include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": env}, _system_config={"worker_niceness": args.worker_niceness})
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app(app), name=cfg.app_name, route_prefix="/")
    return f"http://127.0.0.1:{port}", cfg


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--policy", default="runs/bench_policy/policy")
    parser.add_argument("--data", default="../shared/data/routerbench/train.parquet")
    parser.add_argument("--prompts", help="JSON list of prompt strings (instead of --data; e.g. on a GPU box without the data)")
    parser.add_argument("--max-prompts", type=int, default=512)
    parser.add_argument("--out", default="bench/results", help="JSON file, or a folder (then serve_cpu.json / serve_gpu.json in it)")
    parser.add_argument("--url", help="load-test this running server instead of starting one (no raw run)")
    parser.add_argument("--duration-s", type=float, default=20.0, help="seconds per measured point")
    parser.add_argument("--max-requests", type=int, default=100_000, help="cap per point")
    parser.add_argument("--concurrency", default="1,8,32,64", help="comma-separated /v1/route client counts")
    parser.add_argument("--batch-prompts", type=int, default=64, help="prompts per /v1/route/batch call")
    parser.add_argument("--batch-concurrency", default="1,2", help="comma-separated /v1/route/batch client counts")
    parser.add_argument("--max-batch-size", type=int, default=64)
    parser.add_argument("--batch-wait-timeout-s", type=float, default=0.005)
    parser.add_argument("--replicas", type=int, default=1)
    parser.add_argument("--router-num-cpus", type=float, default=1.0)
    parser.add_argument("--torch-threads", type=int, default=os.cpu_count() or 1, help="per replica and for the raw run")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--sink", default="local", help="decision sink while serving ('local' = durable, as in production)")
    parser.add_argument("--worker-niceness", type=int, default=0, help="nice value of Ray workers (Ray's default is 15)")
    parser.add_argument("--paired-raw", action=argparse.BooleanOptionalAction, default=True,
                        help="measure raw again right before every served point (same load) and report the ratio per point")
    parser.add_argument("--skip-raw", action="store_true")
    parser.add_argument("--skip-raw-after", action="store_true", help="do not re-measure raw after the served run")
    parser.add_argument("--set", action="append", metavar="KEY=VALUE", help="extra RouterConfig overrides (router.* keys of the app config)")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    prompts = load_prompts(args.data, args.prompts, args.max_prompts)
    result: dict = {
        "command": " ".join(["python"] + sys.argv),
        "n_prompts": len(prompts),
        "duration_s_per_point": args.duration_s,
        "load_average_start": os.getloadavg(),
        "settings": {k: v for k, v in vars(args).items() if k not in ("set",)},
    }
    raw_pps = None
    if not args.skip_raw and not args.url:
        from banditroute.serve.core import RouterCore

        core = RouterCore.from_checkpoint(args.policy, device=args.device, seed=0, torch_threads=args.torch_threads)
        result["environment"] = environment(core)
        raw = measure_raw(core, prompts, args.max_batch_size, args.duration_s)
        raw_pps = raw["end_to_end"]["prompts_per_s"]
        result["raw"] = raw
        print(f"raw RouterCore, batch {args.max_batch_size}: {raw_pps:.1f} prompts/s "
              f"(batch p50 {raw['end_to_end']['batch_ms_p50']:.0f} ms)", flush=True)
        raw_core = core if args.paired_raw else None
    else:
        raw_core = None

    with tempfile.TemporaryDirectory(prefix="serve_bench_") as tmp:
        if args.url:
            base = args.url.rstrip("/")
        else:
            t0 = time.time()
            base, cfg = _start_server(args, tmp)
            result["startup_s"] = time.time() - t0
        route_bodies = [{"prompt": p} for p in prompts]
        asyncio.run(_load(base + "/v1/route", route_bodies, 16, min(8.0, args.duration_s), 10_000))  # warm-up
        def paired_raw() -> float | None:
            """Raw throughput right before a served point (the replicas idle), for a shared, noisy box."""
            if raw_core is None:
                return None
            out = measure_raw(raw_core, prompts, args.max_batch_size, args.duration_s / 2, warmup=0,
                              end_to_end_only=True, min_iters=1)
            return out["end_to_end"]["prompts_per_s"]

        def show(name: str, point: dict) -> None:
            paired = f"  raw-before {point['raw_before_prompts_per_s']:.1f} -> x{point['served_over_raw_before']:.2f}" \
                if point.get("raw_before_prompts_per_s") else ""
            print(f"{name}: {point['prompts_per_s']:8.1f} prompts/s  p50 {point['latency_ms_p50']:8.1f} ms"
                  f"  p99 {point['latency_ms_p99']:8.1f} ms  errors {point['errors']}{paired}", flush=True)

        def run_point(url: str, bodies: list, c: int, items: int) -> dict:
            raw_before = paired_raw() if args.paired_raw else None
            point = asyncio.run(_load(url, bodies, c, args.duration_s, args.max_requests, items))
            if raw_before:
                point["raw_before_prompts_per_s"] = raw_before
                point["served_over_raw_before"] = point["prompts_per_s"] / raw_before
            return point

        result["route"] = []
        for c in [int(x) for x in args.concurrency.split(",")]:
            point = run_point(base + "/v1/route", route_bodies, c, 1)
            result["route"].append(point)
            show(f"/v1/route       c={c:3d}", point)
        bp = args.batch_prompts
        batch_bodies = [{"prompts": [prompts[(i * bp + j) % len(prompts)] for j in range(bp)]} for i in range(16)]
        result["route_batch"] = []
        for c in [int(x) for x in args.batch_concurrency.split(",")]:
            point = run_point(base + "/v1/route/batch", batch_bodies, c, bp)
            point["prompts_per_request"] = bp
            result["route_batch"].append(point)
            show(f"/v1/route/batch c={c:3d} x{bp}", point)
        if not args.url:
            import ray
            from ray import serve

            decisions = os.path.join(tmp, "decisions")
            if args.sink == "local":
                from banditroute.serve.decision_sinks import read_decision_log

                result["decisions_logged"] = read_decision_log(decisions).num_rows
            serve.shutdown()
            ray.shutdown()

    if raw_pps and not args.skip_raw_after:
        # Measure raw again after the served run: other load on a shared box drifts, so the
        # ratio uses the mean of the two raw runs that bracket the served measurements.
        from banditroute.serve.core import RouterCore

        core = RouterCore.from_checkpoint(args.policy, device=args.device, seed=0, torch_threads=args.torch_threads)
        after = measure_raw(core, prompts, args.max_batch_size, args.duration_s)
        result["raw_after"] = after
        print(f"raw RouterCore again: {after['end_to_end']['prompts_per_s']:.1f} prompts/s", flush=True)
        raw_pps = (raw_pps + after["end_to_end"]["prompts_per_s"]) / 2
    result["load_average_end"] = os.getloadavg()
    paired = [p["served_over_raw_before"] for p in result["route"] if "served_over_raw_before" in p]
    paired_batch = [p["served_over_raw_before"] for p in result["route_batch"] if "served_over_raw_before" in p]
    if paired:
        # Per point, served over the raw run right before it; the median is robust to a noisy neighbour.
        result["paired_ratios_route"] = paired
        result["paired_ratios_route_batch"] = paired_batch
        result["median_paired_ratio_route"] = float(np.median(paired))
        result["median_paired_ratio_route_batch"] = float(np.median(paired_batch)) if paired_batch else None
        print(f"paired served/raw (raw measured right before each point): /v1/route "
              f"{', '.join(f'x{r:.2f}' for r in paired)} (median x{np.median(paired):.2f})"
              + (f"; /v1/route/batch {', '.join(f'x{r:.2f}' for r in paired_batch)}" if paired_batch else ""), flush=True)
    best_route = max(p["prompts_per_s"] for p in result["route"])
    best_batch = max(p["prompts_per_s"] for p in result["route_batch"])
    result["best_route_prompts_per_s"] = best_route
    result["best_route_batch_prompts_per_s"] = best_batch
    if raw_pps:
        result["raw_prompts_per_s"] = raw_pps
        result["served_over_raw_route"] = best_route / raw_pps
        result["served_over_raw_route_batch"] = best_batch / raw_pps
        print(f"served/raw: /v1/route {best_route / raw_pps:.2f}, /v1/route/batch {best_batch / raw_pps:.2f}", flush=True)
    out = Path(args.out)
    if out.suffix != ".json":  # a folder (the Makefile's `make bench` passes bench/results)
        kind = "gpu" if str(result.get("environment", {}).get("device", "cpu")).startswith("cuda") else "cpu"
        out = out / f"serve_{kind}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
