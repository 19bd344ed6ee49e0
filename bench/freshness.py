"""Freshness of the online loop, and feedback ingest over HTTP (a bench, not a test).

Starts a local Ray with the real loop (Serve router with N replicas, feedback
actor, learner actor, parameter server) and measures, on one host clock:

1. weight hop: the learner publishes version v (parameter server receives
   it) -> EVERY replica has swapped to >= v and reported it back;
2. end to end: a reward is acknowledged by POST /v1/feedback (durable) ->
   EVERY replica serves a version trained on it (the first published
   version whose newest trained reward_time >= that reward's time);
   measured idle (one probe at a time) and under load (a replay driver
   keeps --load-concurrency route+feedback pairs in flight meanwhile);
3. feedback ingest over HTTP: acknowledged rewards/s with --ingest-concurrency
   clients posting to /v1/feedback (decisions made beforehand in bulk).

The encoder is 'hashing' by default so that the numbers are about the loop,
not about MiniLM on this CPU (use --encoder minilm to include it).

    python bench/freshness.py --out bench/results
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def pct(values, qs=(50, 90, 99)) -> dict:
    if not len(values):
        return {}
    arr = np.asarray(values, dtype=float) * 1000.0
    out = {f"p{q}_ms": float(np.percentile(arr, q)) for q in qs}
    out.update(mean_ms=float(arr.mean()), max_ms=float(arr.max()), n=int(arr.size))
    return out


def first_report_after(reports, replicas, version) -> float | None:
    """Time at which every live replica had reported a version >= ``version`` (None if not yet)."""
    times = []
    for rid in replicas:
        t = next((at for r, v, at in reports if r == rid and v >= version), None)
        if t is None:
            return None
        times.append(t)
    return max(times)


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", help="routing data (default ../shared/data/routerbench/train.parquet)")
    ap.add_argument("--encoder", default="hashing", choices=["hashing", "minilm"])
    ap.add_argument("--replicas", type=int, default=2)
    ap.add_argument("--hops", type=int, default=50, help="weight-hop samples")
    ap.add_argument("--probes", type=int, default=40, help="end-to-end probes per phase")
    ap.add_argument("--load-concurrency", type=int, default=8)
    ap.add_argument("--ingest-requests", type=int, default=2000)
    ap.add_argument("--ingest-concurrency", type=int, default=32)
    ap.add_argument("--learner-max-delay", type=float, default=0.1, help="feedback.learner_max_delay_s")
    ap.add_argument("--out", default="bench/results")
    args = ap.parse_args()

    import httpx
    import pyarrow as pa
    import ray
    from ray import serve

    from banditroute.core.data import load_routing_data, resolve_data_path
    from banditroute.cluster.app import router_application
    from banditroute.cluster.cold_start import ColdStartConfig, starting_policy
    from banditroute.cluster.config import app_config_from_dict
    from banditroute.cluster.online import start_online_loop
    from banditroute.cluster.up import free_port, wait_healthy
    from banditroute.core.records import DecisionRecord, JoinedEvent, events_to_table
    from banditroute.core.storage import StorageConfig

    data = load_routing_data(resolve_data_path(args.data))
    policy = starting_policy(data, ColdStartConfig(encoder=args.encoder))
    run_dir = Path("runs") / "bench-storage" / time.strftime("freshness-%Y%m%d-%H%M%S")  # data, not results: kept out of git
    storage = StorageConfig(uri=str(run_dir.resolve()))
    from banditroute.core.security import SecurityConfig, ensure_local_secret

    secret_env = SecurityConfig().token_secret_env
    ensure_local_secret(SecurityConfig())  # the replicas sign decision tokens
    ray.init(num_cpus=max(4, os.cpu_count() or 1), include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {k: os.environ[k] for k in ("RAY_AUTH_MODE", "HF_HUB_OFFLINE", "TOKENIZERS_PARALLELISM", secret_env)}})
    results: dict = {
        "command": "python " + " ".join(sys.argv),
        "machine": {"cpus": os.cpu_count(), "cpu_model": cpu_model(), "gpu": None, "loadavg_at_start": os.getloadavg()},
        "encoder": args.encoder, "replicas": args.replicas, "learner_max_delay_s": args.learner_max_delay,
        "data": str(resolve_data_path(args.data)),
    }
    try:
        app = app_config_from_dict({
            "router": {"num_replicas": args.replicas, "num_cpus": 0.5, "num_gpus": 0.0, "ingress_num_cpus": 0.1,
                       "torch_threads": 1, "weights_poll_timeout_s": 5.0},
            "learner": {"checkpoint_every": 0, "promotion": {"enabled": False}},
            "feedback": {"learner_max_delay_s": args.learner_max_delay},
            "storage": {"uri": storage.uri},
            "online": {"enabled": True, "actor_prefix": "fresh", "learner_num_cpus": 0.0, "feedback_num_cpus": 0.0},
        })
        loop = start_online_loop(app, policy.state())
        ps, learner, feedback = loop.parameter_server, loop.learner, loop.feedback
        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(router_application(loop.router), name="fresh", route_prefix="/", blocking=False)
        base = f"http://127.0.0.1:{port}"
        wait_healthy(base, 300)

        def live_replicas() -> list[str]:
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                reps = ray.get(ps.replica_versions.remote(15.0))
                if len(reps) >= args.replicas:
                    return sorted(reps)
                time.sleep(0.2)
            raise RuntimeError("replicas did not report")

        # Warm up the route and feedback paths (first requests build handles, JIT paths, ...).
        with httpx.Client(base_url=base, timeout=60, trust_env=False) as c:
            for i in range(20):
                d = c.post("/v1/route", json={"prompt": data.prompts[i], "mode": "explore"}).json()
                c.post("/v1/feedback", json={"decision_id": d["decision_id"], "score": 1.0})
        ray.get(feedback.flush.remote())
        replicas = live_replicas()

        # 1. weight hop: learner update -> publish -> every replica reports.
        rng = np.random.default_rng(0)
        dim = policy.meta.embed_dim

        def fake_events(n=8) -> pa.Table:
            return events_to_table([
                JoinedEvent(DecisionRecord(f"hop{time.time_ns()}{i}", time.time(), rng.normal(size=dim).astype(np.float32).tolist(),
                                           float(rng.uniform()), list(policy.models), policy.models[int(rng.integers(len(policy.models)))],
                                           0.5, 0, encoder_id=policy.meta.encoder_id), float(rng.uniform()), 0.0, time.time())
                for i in range(n)
            ])

        hops = []
        for _ in range(args.hops):
            m = ray.get(learner.update.remote(fake_events()))
            v = m["policy_version"]
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                hist = ray.get(ps.history.remote())
                done = first_report_after(hist["reports"], replicas, v)
                if done is not None:
                    published = next(p[3] for p in hist["publishes"] if p[0] == v)
                    hops.append(done - published)
                    break
                time.sleep(0.005)
            time.sleep(0.05)
        results["weight_hop"] = pct(hops)
        print("weight hop (publish -> all replicas report):", results["weight_hop"], flush=True)

        # 2. end to end, idle and under load.
        async def probe_phase(load: int) -> list[float]:
            lat: list[float] = []
            stop = asyncio.Event()
            async with httpx.AsyncClient(base_url=base, timeout=60, trust_env=False,
                                         limits=httpx.Limits(max_connections=64)) as client:
                async def background():
                    i = 0
                    while not stop.is_set():
                        i += 1
                        d = (await client.post("/v1/route", json={"prompt": data.prompts[i % len(data)], "mode": "explore"})).json()
                        await client.post("/v1/feedback", json={"decision_id": d["decision_id"], "score": float(i % 2)})

                bg = [asyncio.create_task(background()) for _ in range(load)]
                await asyncio.sleep(2.0 if load else 0.0)
                for i in range(args.probes):
                    d = (await client.post("/v1/route", json={"prompt": data.prompts[(7 * i) % len(data)], "mode": "explore"})).json()
                    fb = await client.post("/v1/feedback", json={"decision_id": d["decision_id"], "score": 1.0})
                    t_ack = time.time()
                    body = fb.json()
                    assert fb.status_code == 200 and body["status"] == "accepted", fb.text
                    reward_time = body["reward_time"]
                    deadline = time.monotonic() + 20
                    while time.monotonic() < deadline:
                        hist = await ps.history.remote()
                        v = next((p[0] for p in hist["publishes"] if p[2] >= reward_time), None)
                        done = None if v is None else first_report_after(hist["reports"], replicas, v)
                        if done is not None:
                            lat.append(done - t_ack)
                            break
                        await asyncio.sleep(0.005)
                    await asyncio.sleep(0.2)
                stop.set()
                await asyncio.gather(*bg, return_exceptions=True)
            return lat

        idle = asyncio.run(probe_phase(0))
        results["end_to_end_idle"] = pct(idle)
        print("end to end, idle (ack -> all replicas serve a version trained on it):", results["end_to_end_idle"], flush=True)
        loaded = asyncio.run(probe_phase(args.load_concurrency))
        results["end_to_end_under_load"] = pct(loaded)
        results["end_to_end_under_load"]["background_concurrency"] = args.load_concurrency
        print(f"end to end, under load ({args.load_concurrency} route+feedback in flight):", results["end_to_end_under_load"], flush=True)

        # 3. HTTP feedback ingest: decide in bulk first, then post rewards as fast as the clients can.
        async def ingest() -> dict:
            ids: list[str] = []
            async with httpx.AsyncClient(base_url=base, timeout=60, trust_env=False,
                                         limits=httpx.Limits(max_connections=args.ingest_concurrency * 2)) as client:
                while len(ids) < args.ingest_requests:
                    n = min(128, args.ingest_requests - len(ids))
                    reqs = [{"prompt": data.prompts[(len(ids) + j) % len(data)], "mode": "explore"} for j in range(n)]
                    r = await client.post("/v1/route/batch", json={"requests": reqs})
                    ids += [x["decision_id"] for x in r.json()["results"]]
                await feedback.flush.remote()
                queue = list(ids)
                statuses: dict[str, int] = {}
                lat: list[float] = []

                async def worker():
                    while queue:
                        did = queue.pop()
                        t = time.perf_counter()
                        r = await client.post("/v1/feedback", json={"decision_id": did, "score": 0.5})
                        lat.append(time.perf_counter() - t)
                        key = r.json().get("status", str(r.status_code)) if r.status_code == 200 else str(r.status_code)
                        statuses[key] = statuses.get(key, 0) + 1

                t0 = time.perf_counter()
                await asyncio.gather(*(worker() for _ in range(args.ingest_concurrency)))
                elapsed = time.perf_counter() - t0
            return {"requests": len(ids), "concurrency": args.ingest_concurrency, "seconds": elapsed,
                    "acknowledged_per_s": statuses.get("accepted", 0) / elapsed, "statuses": statuses, "latency": pct(lat)}

        results["http_feedback_ingest"] = asyncio.run(ingest())
        print("HTTP feedback ingest:", results["http_feedback_ingest"], flush=True)
        results["learner_status"] = {k: v for k, v in ray.get(learner.status.remote()).items() if k != "last_metrics"}
        results["feedback_stats"] = {k: v for k, v in ray.get(feedback.stats.remote()).items() if k != "last_learner_metrics"}
    finally:
        serve.shutdown()
        ray.shutdown()
    results["machine"]["loadavg_at_end"] = os.getloadavg()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"freshness-{args.encoder}.json"
    path.write_text(json.dumps(results, indent=2))
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
