"""Two Ray nodes on one machine: the worker node's raylet is killed under load, then brought back.

    python -m banditroute.testkit.two_node --out row.json [--n 60] [--concurrency 6]

Runs in its OWN process with its own Ray cluster (``ray.cluster_utils.Cluster``:
a head plus a second raylet with the custom resource ``worker_node``, each
with its own ports), isolated from any other Ray on the machine by its own
``RAY_TMPDIR`` (so no other process's ``ray.init()`` finds this cluster's
address file), and stops only what it started. tests/test_two_node.py runs it
in a subprocess, since a driver connects to one cluster only.

Placement: the feedback actor, learner, parameter server, Serve controller
and HTTP proxy (``HeadOnly``) start while the head is the only node; Router
replicas take 1 logical CPU each and the head keeps room for one, so the
second lands on the worker node. The fault: the worker's raylet is killed
(``remove_node(allow_graceful=False)``) mid-traffic; the head's replica
serves on; a new worker node joins and Serve reschedules the lost replica
there. The row says whether replicas rescheduled, whether the new one got
the newest weights, whether any acknowledged reward was lost or logged
twice, and whether the served version ever went backwards.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import threading
import time
from typing import Any

# Worker-side settings the loop needs (the raylets inherit this process's environment).
ENV = {"RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
# Fast node-death detection: ~2 s instead of Ray's default ~15 s.
SYSTEM_CONFIG = {"health_check_period_ms": 500, "health_check_failure_threshold": 4, "health_check_timeout_ms": 1000}
HEAD_CPUS = 2  # one Router replica (1.0) + the loop's actors and the ingress (0.1 each): no room for a second Router
WORKER_CPUS = 2  # one Router replica (+ an ingress replica, if Serve puts one there); Ray wants whole CPUs


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def progress(message: str) -> None:
    print(f"[two-node {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def router_replicas_by_node(app: str) -> dict[str, str]:
    """Alive Router replica actor name -> node id (from the GCS actor table; no dashboard needed)."""
    import ray._private.state as state

    out = {}
    for info in state.actors().values():
        name = info.get("Name") or ""
        if info.get("State") == "ALIVE" and name.startswith("SERVE_REPLICA::") and f"{app}#Router#" in name:
            out[name] = info["Address"]["NodeID"]
    return out


def alive_nodes() -> dict[str, dict[str, float]]:
    import ray

    return {n["NodeID"]: n["Resources"] for n in ray.nodes() if n["Alive"]}


def run(n: int = 60, concurrency: int = 6) -> dict[str, Any]:
    import ray
    from ray import serve
    from ray.cluster_utils import Cluster

    from banditroute.testkit import fault_scenarios as fs

    t_start = time.monotonic()
    os.environ.update(ENV)
    os.environ.setdefault("BANDITROUTE_TOKEN_SECRET", "two-node-" + os.urandom(16).hex())
    workdir = tempfile.mkdtemp(prefix="br-2node-work-")
    cluster = Cluster(initialize_head=True, head_node_args=dict(
        num_cpus=HEAD_CPUS, gcs_server_port=_free_port(), include_dashboard=False, resources={"head_node": 1.0},
        _system_config=SYSTEM_CONFIG))
    ray.init(address=cluster.address, log_to_driver=False,
             runtime_env={"env_vars": {**ENV, "BANDITROUTE_TOKEN_SECRET": os.environ["BANDITROUTE_TOKEN_SECRET"]}})
    head_id = ray.get_runtime_context().get_node_id()
    port = _free_port()
    serve.start(proxy_location="HeadOnly", http_options={"host": "127.0.0.1", "port": port})
    worker: list[Any] = []

    def add_worker() -> None:
        worker.append(cluster.add_node(num_cpus=WORKER_CPUS, resources={"worker_node": 1.0}))
        cluster.wait_for_nodes()

    progress("head up; starting the loop")
    loop = fs.start_loop(port, workdir, router={"placement": "replica", "num_cpus": 1.0, "torch_threads": 1},
                         before_serve=add_worker, learner_config={"promotion": {"enabled": False}})
    samples: list[int] = []
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            try:
                samples.append(int(ray.get(loop.ps.latest_version.remote(), timeout=2)))
            except Exception:  # noqa: BLE001
                pass
            time.sleep(0.1)

    sampler = threading.Thread(target=sample, daemon=True)
    try:
        placed = fs.wait_for(lambda: len(set((r := router_replicas_by_node(loop.app)).values())) == 2 and r, 120, 0.2,
                             what="Router replicas on both nodes")
        actors_on_head = {name: ray.get(h.__ray_call__.remote(lambda self: ray.get_runtime_context().get_node_id())) == head_id
                          for name, h in (("feedback", loop.feedback), ("learner", loop.learner), ("parameter_server", loop.ps))}
        progress(f"replicas on both nodes; loop actors on the head: {actors_on_head}")
        sampler.start()
        worker_id = worker[0].node_id

        # Traffic runs in a thread; the fault runs here, because Ray adds a node only from the main thread.
        box: dict[str, Any] = {}
        driver = threading.Thread(target=lambda: box.update(result=asyncio.run(fs.drive(
            loop.base, loop.data, n, concurrency, inject=lambda t: box.update(traffic=t), pause_s=0.05))), daemon=True)
        driver.start()
        live = fs.wait_for(lambda: box.get("traffic"), 60, 0.05, what="traffic to start")
        fs.wait_until_done(live, n // 3, timeout_s=120)
        progress(f"{live.done} rewarded; killing the worker node's raylet")
        t0 = time.monotonic()
        cluster.remove_node(worker[0], allow_graceful=False)  # SIGKILL the worker node's raylet and its workers
        fs.wait_for(lambda: worker_id not in alive_nodes(), 60, 0.1, what="the GCS to mark the worker node dead")
        dead_s = time.monotonic() - t0
        done_while_down = live.done
        fs.wait_until_done(live, min(n, done_while_down + n // 6), timeout_s=120)  # load on one node
        served_on_one_node = live.done - done_while_down
        progress(f"node dead after {dead_s:.1f}s; {served_on_one_node} rewarded on the head alone; adding a node")
        add_worker()
        new_id = worker[-1].node_id

        def rescheduled():
            now = router_replicas_by_node(loop.app)
            return len(now) == 2 and new_id in now.values() and now

        replicas_after = fs.wait_for(rescheduled, 120, 0.2, what="Serve to reschedule the lost Router replica on the new node")
        info = {"t0": t0, "dead_detected_s": dead_s, "served_on_one_node": served_on_one_node,
                "rescheduled_s": time.monotonic() - t0, "new_node": new_id, "replicas_after": replicas_after}
        progress(f"replica rescheduled after {info['rescheduled_s']:.1f}s")
        driver.join(300)
        assert not driver.is_alive(), "traffic did not finish"
        traffic, _ = box["result"]
        # More traffic once both nodes serve again, so there are new versions for the new replica to pick up.
        extra, _ = asyncio.run(fs.drive(loop.base, loop.data, max(12, n // 4), concurrency, seed=1))
        for name in ("sent", "failed", "retries", "duplicates", "done"):
            setattr(traffic, name, getattr(traffic, name) + getattr(extra, name))
        for name in ("accepted", "recorded", "errors", "routed"):
            getattr(traffic, name).extend(getattr(extra, name))
        ray.get(loop.feedback.flush.remote(30.0))
        newest = ray.get(loop.ps.latest_version.remote())
        route_failures = [e for e in traffic.errors if e.startswith("POST /v1/route")]

        def on_newest():
            versions = ray.get(loop.ps.replica_versions.remote(3.0))
            alive = router_replicas_by_node(loop.app)
            fresh = {k: v for k, v in versions.items() if any(k in name or name in k for name in alive)}
            return len(fresh) >= 2 and all(v >= newest for v in fresh.values()) and fresh

        progress(f"traffic done; waiting for both replicas on v{newest}")
        versions = fs.wait_for(on_newest, 60, 0.2, what="both replicas (the rescheduled one included) on the newest version")
        recover_s = time.monotonic() - info["t0"]
        stop.set()
        sampler.join(5)
        found, twice = fs.in_log(traffic, fs.log_counts(loop.storage))
        return fs.row("worker node lost (raylet SIGKILL) and rejoined", traffic, found, twice, recover_s,
                      replicas_before={k: ("head" if v == head_id else "worker") for k, v in placed.items()},
                      replicas_after={k: ("head" if v == head_id else "new worker" if v == info["new_node"] else v)
                                      for k, v in info["replicas_after"].items()},
                      loop_actors_on_head=actors_on_head, dead_detected_s=round(info["dead_detected_s"], 2),
                      served_on_one_node=info["served_on_one_node"], rescheduled_s=round(info["rescheduled_s"], 2),
                      newest_version=newest, start_version=loop.start_version, replica_versions=versions,
                      failed_routes_only=len(route_failures) == traffic.failed, version_samples=len(samples),
                      version_decreases=sum(1 for a, b in zip(samples, samples[1:]) if b < a),
                      total_s=round(time.monotonic() - t_start, 1))
    finally:
        stop.set()
        loop.stop()
        try:
            serve.shutdown()
        finally:
            ray.shutdown()
            cluster.shutdown()  # only this cluster's processes: the ones this process started


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="JSON file for the result row")
    ap.add_argument("--n", type=int, default=60, help="prompts routed and rewarded during the fault")
    ap.add_argument("--concurrency", type=int, default=6)
    args = ap.parse_args(argv)
    if "RAY_TMPDIR" not in os.environ:  # Ray reads it lazily; a short path keeps socket names under the limit
        print("set RAY_TMPDIR to a private folder so no other Ray finds this cluster", file=sys.stderr)
        return 2
    result = run(args.n, args.concurrency)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2, default=str)
    print(json.dumps(result, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
