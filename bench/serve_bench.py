#!/usr/bin/env python
"""Served /v1/route against Serve's own floor and the raw core, plus the memory of `banditroute serve`.

1. raw: RouterCore.route_batch in this process (no Ray) at --max-batch-size,
   on the same prompts (bench/raw_inference.py).
2. served: a local Ray + Serve with the app (the durable local decision log
   ON, as in production) AND, on the same Serve proxy, a do-nothing FastAPI
   app (``--floor``: POST /floor/v1/route reads the body and answers a
   constant): the floor of what Serve costs per request on this box. An
   aiohttp load generator (closed loop, loopback, bounded by --duration-s and
   --max-requests per point) measures throughput and p50/p99 of POST
   /v1/route at each --concurrency, the floor app right before the app at
   each point (same load on a shared box), then POST /v1/route/batch.
3. memory (``--memory``): `banditroute serve` itself in a subprocess with the
   same config, warmed with requests, then RSS and PSS of every process of it
   (driver, replicas, Ray's and Serve's system processes, and the online
   loop's actors: bench/proc_stats.py); once as it runs by default (learning
   online) and once ``--frozen``.
4. writes a JSON result (with the load average, the targets and whether they
   were met) and prints the ratios. Every served point also records the CPU
   milliseconds per request of each process role (proxy, ingress, Router,
   this load generator: ``cpu_ms_per_request``), which says what bounds
   throughput even on a box shared with other work.

    python bench/serve_bench.py --config configs/serve.cpu.yaml --encoder static --skip-raw --out bench/results/serve_cpu_static.json
    python bench/serve_bench.py --policy runs/bench_policy/policy --out bench/results/serve_cpu.json   # MiniLM, Serve defaults

``--config`` is an application config (configs/*.yaml): its ``router`` and
``serve`` sections are what is measured, including ``serve.env_vars`` (Ray
Serve switches such as RAY_SERVE_ENABLE_HA_PROXY, set before Ray starts, so
the floor app runs under the same Serve); flags given on the command line
override it. ``--encoder NAME`` serves a random-weight policy on that
encoder (throughput does not depend on what the weights learnt). ``--url``
load-tests a running server instead (no floor, no raw, no memory).
"""

# No `from __future__ import annotations`: FastAPI must see a real Request annotation on the floor app's route.

import argparse
import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from banditroute.core.config import to_dict
from proc_stats import cpu_ms_per_request, cpu_seconds, memory_report  # noqa: E402
from raw_inference import environment, load_prompts, measure_raw  # noqa: E402

FLOOR_PREFIX = "/floor"
TARGETS = {"route_over_floor_rps_at_16": 0.5, "route_over_floor_p50_at_1": 3.0, "serve_total_rss_mb": 1536.0}
"""Issue 12 on 2 CPU cores: >= 50% of the floor's throughput at 16 clients, p50 at 1 client <= 3x the floor's, <= 1.5 GB RSS."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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
        "load_average_1m": os.getloadavg()[0],
    }


def cold_start_policy(encoder: str, data: str | None, folder: str) -> str:
    """A random-weight BaRP policy on ``encoder`` over the data's model pool, saved under ``folder``."""
    import torch

    from banditroute.core.data import load_routing_data
    from banditroute.policy.barp import BarpPolicy, PolicyMeta
    from banditroute.policy.encoders import EncoderConfig, make_encoder
    from banditroute.serve.testing import DEFAULT_MODELS

    models = list(load_routing_data(data).models) if data and Path(data).exists() else list(DEFAULT_MODELS)
    config = EncoderConfig(name=encoder)
    built = make_encoder(config)
    torch.manual_seed(0)
    meta = PolicyMeta(models=models, tau=0.01, embed_dim=int(built.dim), encoder=config, encoder_id=built.encoder_id)
    return str(BarpPolicy(meta).save(Path(folder) / f"policy-{encoder}"))


def router_overrides(args, policy: str, port: int, decisions: str) -> dict:
    """The router.* settings the bench imposes on the config (only the knobs given on the command line)."""
    out = {"policy": str(Path(policy).resolve()), "port": port, "decision_sink": args.sink,
           "decision_sink_options": {"path": decisions} if args.sink == "local" else {}}
    for flag, key in (("replicas", "num_replicas"), ("max_batch_size", "max_batch_size"), ("batch_wait_timeout_s", "batch_wait_timeout_s"),
                      ("torch_threads", "torch_threads"), ("router_num_cpus", "num_cpus"), ("device", "device"), ("placement", "placement")):
        if getattr(args, flag) is not None:
            out[key] = getattr(args, flag)
    for pair in args.set or []:
        key, value = pair.split("=", 1)
        out[key] = value
    return out


def app_config(args, overrides: dict):
    from banditroute.cluster.config import load_app_config

    return load_app_config(args.config, {f"router.{key}": value for key, value in overrides.items()})


def floor_application():
    """A do-nothing Serve app: FastAPI ingress, POST /v1/route reads the body and answers a constant.

    Defined in a function so Ray pickles it by value (bench/ is not importable in Ray's workers).
    """
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse
    from ray import serve

    api = FastAPI()

    @serve.deployment(name="Floor", max_ongoing_requests=1024, ray_actor_options={"num_cpus": 0.5})
    @serve.ingress(api)
    class Floor:
        @api.post("/v1/route")
        async def route(self, request: Request):
            await request.body()
            return JSONResponse({"model": "none", "probability": 1.0})

    return Floor.bind()


def start_served(args, policy: str, tmp: str) -> tuple[str, list[str]]:
    import ray
    from ray import serve

    from banditroute.cluster.app import build_app
    from banditroute.core.security import ensure_local_secret

    port = free_port()
    app = app_config(args, router_overrides(args, policy, port, os.path.join(tmp, "decisions")))
    app.online.enabled = False  # the bench serves the checkpoint: no loop actors
    cfg = app.router
    ensure_local_secret(cfg.security)  # the ingress signs decision tokens
    env = {k: os.environ[k] for k in ("RAY_AUTH_MODE", "HF_HUB_OFFLINE", "TOKENIZERS_PARALLELISM", cfg.security.token_secret_env)
           if k in os.environ}
    env.update(app.serve.env_vars)
    # Ray starts worker processes (the replicas) at nice 15; the raw run in this process is at
    # nice 0. On a box shared with other work that alone skews served/raw, so by default the
    # replicas get the same niceness as the raw run (--worker-niceness 15 = Ray's default).
    ray.init(num_cpus=max(4, os.cpu_count() or 1), include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": env}, _system_config={"worker_niceness": args.worker_niceness})
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app(app), name=cfg.app_name, route_prefix="/")
    if args.floor:
        serve.run(floor_application(), name="floor", route_prefix=FLOOR_PREFIX)
    status = serve.status().applications[cfg.app_name]
    return f"http://127.0.0.1:{port}", sorted(status.deployments)


def measure_memory(args, policy: str, prompts: list[str], tmp: str, frozen: bool) -> dict:
    """`banditroute serve` with the same config in a subprocess: warmed, then the memory of its process tree."""
    import httpx

    port = free_port()
    overrides = router_overrides(args, policy, port, os.path.join(tmp, "serve-decisions"))
    cmd = [str(Path(sys.executable).with_name("banditroute")), "serve", "--ready-timeout", "300", "--policy", overrides.pop("policy")]
    cmd += ["--frozen"] if frozen else ["--storage", os.path.join(tmp, f"storage-{port}")]
    if args.config:
        cmd += ["--config", args.config]
    for key, value in overrides.items():
        for sub, v in (value.items() if isinstance(value, dict) else [(None, value)]):
            cmd += ["--set", f"router.{key}{'.' + sub if sub else ''}={v}"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    out: dict = {"command": " ".join(["banditroute"] + cmd[1:])}
    try:
        deadline = time.time() + 300
        while True:
            try:
                if httpx.get(base + "/healthz", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if proc.poll() is not None or time.time() > deadline:
                raise RuntimeError(f"banditroute serve did not come up: {proc.stdout.read()[-3000:] if proc.stdout else ''}")
            time.sleep(0.5)
        warm = asyncio.run(_load(base + "/v1/route", [{"prompt": p} for p in prompts], 16, min(10.0, args.duration_s), 2000))
        out["warmup_requests"] = warm["requests"]
        out["health"] = httpx.get(base + "/healthz", timeout=5).json()
        out.update(memory_report(proc.pid))
    finally:
        proc.send_signal(signal.SIGTERM)  # clean shutdown (serve.shutdown, ray.shutdown)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
    return out


def ratios(result: dict) -> dict:
    """Served over floor at each concurrency, and the issue's targets: met or not."""
    floor = {p["concurrency"]: p for p in result.get("floor", [])}
    out: dict = {"per_concurrency": []}
    for p in result.get("route", []):
        f = floor.get(p["concurrency"])
        if f and f["requests_per_s"] > 0:
            out["per_concurrency"].append({"concurrency": p["concurrency"], "rps_over_floor": p["requests_per_s"] / f["requests_per_s"],
                                           "p50_over_floor": p["latency_ms_p50"] / f["latency_ms_p50"]})
    by_c = {r["concurrency"]: r for r in out["per_concurrency"]}
    targets = {}
    if 16 in by_c:
        targets["route_over_floor_rps_at_16"] = {"value": by_c[16]["rps_over_floor"], "target": ">= 0.5",
                                                 "met": by_c[16]["rps_over_floor"] >= TARGETS["route_over_floor_rps_at_16"]}
    if 1 in by_c:
        targets["route_over_floor_p50_at_1"] = {"value": by_c[1]["p50_over_floor"], "target": "<= 3",
                                                "met": by_c[1]["p50_over_floor"] <= TARGETS["route_over_floor_p50_at_1"]}
    for mode, mem in result.get("memory", {}).items():
        total = mem["total_rss_mb"]
        targets[f"serve_total_rss_mb_{mode}"] = {"value": total, "pss_mb": mem["total_pss_mb"], "target": "<= 1536",
                                                 "met": total <= TARGETS["serve_total_rss_mb"]}
    out["targets"] = targets
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="application config YAML (configs/*.yaml): router and serve settings, serve.env_vars")
    parser.add_argument("--policy", default="runs/bench_policy/policy")
    parser.add_argument("--encoder", help="serve a random-weight policy on this encoder (static, hashing, minilm) instead of --policy")
    parser.add_argument("--placement", choices=("inline", "replica", "auto"), help="router.placement")
    parser.add_argument("--data", default="../shared/data/routerbench/train.parquet")
    parser.add_argument("--prompts", help="JSON list of prompt strings (instead of --data; e.g. on a GPU box without the data)")
    parser.add_argument("--max-prompts", type=int, default=512)
    parser.add_argument("--out", default="bench/results", help="JSON file, or a folder (then serve_cpu.json / serve_gpu.json in it)")
    parser.add_argument("--url", help="load-test this running server instead of starting one (no raw run)")
    parser.add_argument("--duration-s", type=float, default=15.0, help="seconds per measured point")
    parser.add_argument("--max-requests", type=int, default=100_000, help="cap per point")
    parser.add_argument("--concurrency", default="1,16,64", help="comma-separated /v1/route client counts")
    parser.add_argument("--batch-prompts", type=int, default=64, help="prompts per /v1/route/batch call")
    parser.add_argument("--batch-concurrency", default="1", help="comma-separated /v1/route/batch client counts ('' = none)")
    parser.add_argument("--max-batch-size", type=int, help="router.max_batch_size (and the raw run's batch; default 64)")
    parser.add_argument("--batch-wait-timeout-s", type=float, help="router.batch_wait_timeout_s")
    parser.add_argument("--replicas", type=int, help="router.num_replicas")
    parser.add_argument("--router-num-cpus", type=float, help="router.num_cpus")
    parser.add_argument("--torch-threads", type=int, help="router.torch_threads, and the raw run's")
    parser.add_argument("--device", help="router.device, and the raw run's (default auto)")
    parser.add_argument("--sink", default="local", help="decision sink while serving ('local' = durable, as in production)")
    parser.add_argument("--worker-niceness", type=int, default=0, help="nice value of Ray workers (Ray's default is 15)")
    parser.add_argument("--floor", action=argparse.BooleanOptionalAction, default=True,
                        help="deploy the do-nothing app on the same Serve and measure it right before each /v1/route point")
    parser.add_argument("--memory", action=argparse.BooleanOptionalAction, default=True,
                        help="then start `banditroute serve` with the same settings and record the memory of its processes")
    parser.add_argument("--memory-only", action="store_true",
                        help="only the memory of `banditroute serve` (no raw run, no served points): RSS is load-independent")
    parser.add_argument("--memory-modes", default="online,frozen", help="which `banditroute serve` runs to measure")
    parser.add_argument("--paired-raw", action=argparse.BooleanOptionalAction, default=False,
                        help="measure raw again right before every served point (same load) and report the ratio per point")
    parser.add_argument("--skip-raw", action="store_true")
    parser.add_argument("--set", action="append", metavar="KEY=VALUE", help="extra RouterConfig overrides (router.* keys of the app config)")
    args = parser.parse_args(argv)
    for var, value in (("HF_HUB_OFFLINE", "1"), ("TOKENIZERS_PARALLELISM", "false"), ("RAY_AUTH_MODE", "disabled"),
                       ("RAY_USAGE_STATS_ENABLED", "0")):
        os.environ.setdefault(var, value)
    tmp_dir = tempfile.TemporaryDirectory(prefix="serve_bench_")
    tmp = tmp_dir.name
    policy = cold_start_policy(args.encoder, args.data, tmp) if args.encoder else args.policy
    app = app_config(args, {"policy": policy})
    # Serve's switches are read when ray.serve is imported: into this process's environment before Ray starts.
    os.environ.update(app.serve.env_vars)

    prompts = load_prompts(args.data, args.prompts, args.max_prompts)
    result: dict = {
        "command": " ".join(["python"] + sys.argv),
        "n_prompts": len(prompts),
        "duration_s_per_point": args.duration_s,
        "load_average_start": os.getloadavg(),
        "cpu_count": os.cpu_count(),
        "settings": {k: v for k, v in vars(args).items() if k not in ("set",)},
        "router_overrides": args.set or [],
        "config": args.config,
        "router": to_dict(app.router),
        "serve": to_dict(app.serve),
        "targets": TARGETS,
    }
    with tmp_dir:
        raw_core = None
        if not args.skip_raw and not args.url and not args.memory_only:
            from banditroute.serve.core import RouterCore

            raw_core = RouterCore.from_checkpoint(policy, device=args.device or "auto", seed=0, torch_threads=args.torch_threads or 0)
            result["environment"] = environment(raw_core)
            raw = measure_raw(raw_core, prompts, app.router.max_batch_size, args.duration_s)
            result["raw"] = raw
            result["raw_prompts_per_s"] = raw["end_to_end"]["prompts_per_s"]
            print(f"raw RouterCore, batch {app.router.max_batch_size}: {result['raw_prompts_per_s']:.1f} prompts/s", flush=True)
        if not args.memory_only:
            run_served(args, result, prompts, policy, tmp, raw_core)
        if (args.memory or args.memory_only) and not args.url:
            result["memory"] = {}
            for mode in [m for m in args.memory_modes.split(",") if m]:
                mem = result["memory"][mode] = measure_memory(args, policy, prompts, tmp, frozen=mode == "frozen")
                print(f"banditroute serve ({mode}): {len(mem['processes'])} processes, RSS {mem['total_rss_mb']:.0f} MB, "
                      f"PSS {mem['total_pss_mb']:.0f} MB", flush=True)
                for name, r in mem["by_role"].items():
                    print(f"  {name:28s} x{r['processes']}  RSS {r['rss_mb']:7.1f} MB  PSS {r['pss_mb']:7.1f} MB", flush=True)
    result["load_average_end"] = os.getloadavg()
    result["comparison"] = ratios(result)
    for name, t in result["comparison"]["targets"].items():
        print(f"target {name}: {t['value']:.2f} ({t['target']}) -> {'met' if t['met'] else 'NOT met'}", flush=True)
    out = Path(args.out)
    if out.suffix != ".json":  # a folder (the Makefile's `make bench` passes bench/results)
        kind = "gpu" if str(result.get("environment", {}).get("device", "cpu")).startswith("cuda") else "cpu"
        out = out / f"serve_{kind}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"wrote {out}")
    return 0


def run_served(args, result: dict, prompts: list[str], policy: str, tmp: str, raw_core) -> None:
    """The served points: floor then app at each concurrency, then the batch endpoint."""
    raw_core_batch = args.max_batch_size or 64
    floor_url = None
    if args.url:
        base = args.url.rstrip("/")
    else:
        t0 = time.time()
        base, deployments = start_served(args, policy, tmp)
        result["startup_s"] = time.time() - t0
        result["deployments"] = deployments
        floor_url = base + FLOOR_PREFIX + "/v1/route" if args.floor else None
    route_bodies = [{"prompt": p} for p in prompts]
    asyncio.run(_load(base + "/v1/route", route_bodies, 16, min(8.0, args.duration_s), 10_000))  # warm-up
    if floor_url:
        asyncio.run(_load(floor_url, route_bodies, 16, min(4.0, args.duration_s), 10_000))

    def show(name: str, point: dict) -> None:
        cpu = ", ".join(f"{k} {v:.2f}" for k, v in list(point.get("cpu_ms_per_request", {}).items())[:4])
        print(f"{name}: {point['prompts_per_s']:8.1f} prompts/s  p50 {point['latency_ms_p50']:8.2f} ms"
              f"  p99 {point['latency_ms_p99']:8.2f} ms  errors {point['errors']}  load {point['load_average_1m']:.1f}"
              f"  CPU ms/request: {cpu}", flush=True)

    def point(url: str, bodies: list, c: int, items: int) -> dict:
        if args.paired_raw and raw_core is not None:
            raw_before = measure_raw(raw_core, prompts, raw_core_batch, args.duration_s / 2, warmup=0,
                                     end_to_end_only=True, min_iters=1)["end_to_end"]["prompts_per_s"]
        else:
            raw_before = None
        before = cpu_seconds(os.getpid())
        out = asyncio.run(_load(url, bodies, c, args.duration_s, args.max_requests, items))
        out["cpu_ms_per_request"] = cpu_ms_per_request(before, cpu_seconds(os.getpid()), out["requests"])
        if raw_before:
            out["raw_before_prompts_per_s"] = raw_before
            out["served_over_raw_before"] = out["prompts_per_s"] / raw_before
        return out

    result["route"], result["floor"] = [], []
    for c in [int(x) for x in args.concurrency.split(",")]:
        if floor_url:
            result["floor"].append(point(floor_url, route_bodies, c, 1))
            show(f"floor app       c={c:3d}", result["floor"][-1])
        result["route"].append(point(base + "/v1/route", route_bodies, c, 1))
        show(f"/v1/route       c={c:3d}", result["route"][-1])
    bp = args.batch_prompts
    batch_bodies = [{"prompts": [prompts[(i * bp + j) % len(prompts)] for j in range(bp)]} for i in range(16)]
    result["route_batch"] = []
    for c in [int(x) for x in args.batch_concurrency.split(",") if x]:
        p = point(base + "/v1/route/batch", batch_bodies, c, bp)
        p["prompts_per_request"] = bp
        result["route_batch"].append(p)
        show(f"/v1/route/batch c={c:3d} x{bp}", p)
    if not args.url:
        import ray
        from ray import serve

        if args.sink == "local":
            from banditroute.serve.decision_sinks import read_decision_log

            result["decisions_logged"] = read_decision_log(os.path.join(tmp, "decisions")).num_rows
        serve.shutdown()
        ray.shutdown()
    if result.get("raw_prompts_per_s"):
        best = max(p["prompts_per_s"] for p in result["route"])
        result["served_over_raw_route"] = best / result["raw_prompts_per_s"]


if __name__ == "__main__":
    sys.exit(main())
