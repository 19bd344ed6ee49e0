"""Learner throughput, feedback ingest throughput, and the online learning curve (a bench, not a test).

    python bench/learner_bench.py throughput --out bench/results
    python bench/learner_bench.py curve --offline-policy runs/offline/policy \\
        [--up-summary runs/latest/summary.json] --out bench/results

throughput: rewards/s the learner trains (OnlineLearner.update on Arrow
tables of joined events, 384-d embeddings, 11 models: the RouterBench
shape), in process and through the learner actor (update + publish to the
parameter server); and feedback ingest: durable acknowledged rewards/s of
the FeedbackService in process and through the feedback actor.

curve: the online learner from cold start on the RouterBench prompts (MiniLM
embeddings from the cache; decisions sampled from the CURRENT policy, the
chosen model's logged outcome as reward, updates in batches as the feedback
actor sends them) vs the levels of the offline-trained policy (`banditroute
train`), a uniformly random router and the oracle, all under the same
traffic (prompts uniform over the data, w_cost ~ U[0, 1]). With
--up-summary, the curve of a real `banditroute up` run is drawn too.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from freshness import cpu_model  # noqa: E402


def synthetic_events(n: int, models: list[str], dim: int, rng, encoder_id: str = ""):
    from banditroute.core.records import DecisionRecord, JoinedEvent, events_to_table

    emb = rng.normal(size=(n, dim)).astype(np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    events = [
        JoinedEvent(DecisionRecord(f"e{rng.integers(1 << 60)}", time.time(), emb[i], float(rng.uniform()), list(models),
                                   models[int(rng.integers(len(models)))], float(rng.uniform(0.05, 1.0)), 0, encoder_id=encoder_id),
                    float(rng.integers(2)), float(rng.uniform(0, 0.005)), time.time())
        for i in range(n)
    ]
    return events_to_table(events)


def routerbench_policy(n_models: int = 11, dim: int = 384):
    import torch

    from banditroute.policy.barp import BarpPolicy, NetworkConfig, PolicyMeta

    torch.manual_seed(0)
    return BarpPolicy(PolicyMeta(models=[f"model-{k}" for k in range(n_models)], tau=0.004, embed_dim=dim, network=NetworkConfig()))


def bench_throughput(args) -> dict:
    import torch

    from banditroute.feedback.log import EventLog
    from banditroute.feedback.config import FeedbackConfig
    from banditroute.feedback.service import FeedbackService
    from banditroute.learner.config import LearnerConfig
    from banditroute.learner.learner import OnlineLearner
    from banditroute.core.records import DecisionRecord, RewardRecord
    from banditroute.core.storage import StorageConfig, open_storage

    torch.set_num_threads(1)
    rng = np.random.default_rng(0)
    out: dict = {"learner_in_process": {}, "feedback_in_process": {}}
    policy = routerbench_policy()
    learner = OnlineLearner(policy, LearnerConfig())
    for batch in (8, 32, 128, 512):
        tables = [synthetic_events(batch, policy.models, 384, rng) for _ in range(max(5, 4096 // batch))]
        for t in tables[:3]:
            learner.update(t)  # warm-up
        start = time.perf_counter()
        for t in tables:
            learner.update(t)
        elapsed = time.perf_counter() - start
        out["learner_in_process"][f"batch_{batch}"] = {
            "rewards_per_s": batch * len(tables) / elapsed, "updates_per_s": len(tables) / elapsed,
            "ms_per_update": 1000 * elapsed / len(tables), "replay_rows_per_update": learner.config.replay_sample,
        }
        print(f"learner (in process) batch {batch}: {out['learner_in_process'][f'batch_{batch}']}", flush=True)

    root = Path("runs") / "bench-storage" / time.strftime("ingest-%Y%m%d-%H%M%S")  # data, not results: kept out of git

    async def service_ingest(n: int, concurrency: int) -> dict:
        svc = FeedbackService(FeedbackConfig(send_to_learner=False, unknown_grace_s=0.0), EventLog(open_storage(str(root / f"svc-{concurrency}"))))
        decisions = [DecisionRecord(f"d{i}", time.time(), rng.normal(size=384).astype(np.float32), 0.5, ["a", "b"], "a", 0.5, 0) for i in range(n)]
        for i in range(0, n, 64):
            await svc.record_decisions(decisions[i : i + 64])
        queue = [RewardRecord(f"d{i}", 1.0, 0.001) for i in range(n)]
        acked = 0

        async def worker():
            nonlocal acked
            while queue:
                if (await svc.submit_reward(queue.pop()))["status"] == "accepted":
                    acked += 1

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        elapsed = time.perf_counter() - start
        stats = svc.stats()
        await svc.stop()
        return {"rewards": n, "concurrency": concurrency, "acknowledged_per_s": acked / elapsed,
                "event_log_parts": stats["event_log_writes"], "rows_per_part": stats["event_log_rows"] / max(1, stats["event_log_writes"])}

    for conc in (1, 32, 256):
        res = asyncio.run(service_ingest(args.ingest_rewards, conc))
        out["feedback_in_process"][f"concurrency_{conc}"] = res
        print(f"feedback service (in process, local disk) concurrency {conc}: {res}", flush=True)

    import ray

    from banditroute.feedback.actor import get_or_create_feedback_actor
    from banditroute.learner.actor_handles import get_or_create_learner_actor
    from banditroute.core.names import NAMESPACE
    from banditroute.learner.param_server import get_or_create_parameter_server

    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    try:
        storage = StorageConfig(uri=str((root / "actors").resolve()))
        ps = get_or_create_parameter_server("bench-ps", NAMESPACE, storage)
        la = get_or_create_learner_actor({"checkpoint_every": 0, "promotion": {"enabled": False}}, storage, policy.state(), name="bench-learner", parameter_server_name="bench-ps")
        ray.get(la.status.remote())
        out["learner_actor"] = {}
        for batch in (32, 128):
            tables = [ray.put(synthetic_events(batch, policy.models, 384, rng)) for _ in range(60)]
            ray.get(la.update.remote(tables[0]))
            start = time.perf_counter()
            for t in tables:
                ray.get(la.update.remote(t))
            elapsed = time.perf_counter() - start
            out["learner_actor"][f"batch_{batch}"] = {"rewards_per_s": batch * len(tables) / elapsed,
                                                      "ms_per_update_incl_publish": 1000 * elapsed / len(tables)}
            print(f"learner actor (update + publish) batch {batch}: {out['learner_actor'][f'batch_{batch}']}", flush=True)

        fa = get_or_create_feedback_actor({"send_to_learner": False, "unknown_grace_s": 0.0}, storage, "bench-feedback")
        n = args.ingest_rewards
        decisions = [DecisionRecord(f"a{i}", time.time(), rng.normal(size=384).astype(np.float32).tolist(), 0.5, ["a", "b"], "a", 0.5, 0)
                     for i in range(n)]
        for i in range(0, n, 128):
            ray.get(fa.record_decisions.remote(decisions[i : i + 128]))

        async def actor_ingest(concurrency: int, offset: int, count: int) -> float:
            queue = [RewardRecord(f"a{i}", 1.0) for i in range(offset, offset + count)]
            acked = 0

            async def worker():
                nonlocal acked
                while queue:
                    if (await fa.submit_reward.remote(queue.pop()))["status"] == "accepted":
                        acked += 1

            start = time.perf_counter()
            await asyncio.gather(*(worker() for _ in range(concurrency)))
            return acked / (time.perf_counter() - start)

        half = n // 2
        out["feedback_actor"] = {"single_calls_concurrency_64": {"acknowledged_per_s": asyncio.run(actor_ingest(64, 0, half))}}
        start = time.perf_counter()
        acks = ray.get([fa.submit_rewards.remote([RewardRecord(f"a{i}", 1.0) for i in range(j, min(n, j + 100))]) for j in range(half, n, 100)])
        elapsed = time.perf_counter() - start
        out["feedback_actor"]["batched_100_per_call"] = {
            "acknowledged_per_s": sum(a["status"] == "accepted" for batch in acks for a in batch) / elapsed}
        print(f"feedback actor: {out['feedback_actor']}", flush=True)
    finally:
        ray.shutdown()
    return out


def expected_levels(policy, emb: np.ndarray, full_reward_fn, n_samples: int, rng) -> dict:
    """Expected reward of a policy (explore = sampling, greedy = argmax) under the bench traffic."""
    import torch

    rows = rng.integers(0, len(emb), n_samples)
    w = rng.uniform(0, 1, n_samples)
    r = full_reward_fn(rows, w)  # (n, K)
    probs = torch.softmax(policy.logits(emb[rows], w), dim=-1).numpy()
    return {"explore": float((probs * r).sum(axis=1).mean()), "greedy": float(r[np.arange(n_samples), probs.argmax(axis=1)].mean())}


def bench_curve(args) -> dict:
    import torch

    from banditroute.core.data import load_routing_data, resolve_data_path
    from banditroute.learner.config import LearnerConfig
    from banditroute.learner.learner import OnlineLearner
    from banditroute.cluster.cold_start import ColdStartConfig, starting_policy
    from banditroute.policy.barp import BarpPolicy
    from banditroute.policy.encoders import embed_prompts
    from banditroute.policy.reward import reward
    from banditroute.core.records import DecisionRecord, JoinedEvent, events_to_table

    torch.set_num_threads(max(1, (os.cpu_count() or 2) // 2))
    data = load_routing_data(resolve_data_path(args.data))
    start = starting_policy(data, ColdStartConfig(encoder=args.encoder), seed=args.seed)
    emb, encoder_id = embed_prompts(data.prompts, start.meta.encoder)
    tau = start.tau
    scores, costs = data.scores_filled, data.costs

    def full_reward(rows, w):
        return reward(scores[rows], costs[rows], w[:, None], tau)

    rng = np.random.default_rng(args.seed)
    levels: dict = {"cold_start": expected_levels(start, emb, full_reward, 20000, np.random.default_rng(1))}
    r_all = full_reward(np.arange(len(data)).repeat(10), np.random.default_rng(1).uniform(0, 1, len(data) * 10))
    levels["random"] = float(r_all.mean())
    levels["oracle"] = float(r_all.max(axis=1).mean())
    if args.offline_policy:
        offline = BarpPolicy.load(args.offline_policy)
        if offline.meta.encoder_id != encoder_id or list(offline.models) != list(data.models):
            raise SystemExit("--offline-policy must use the same encoder and model pool as the data/encoder here")
        levels["offline"] = expected_levels(offline, emb, lambda rows, w: reward(scores[rows], costs[rows], w[:, None], tau),
                                            20000, np.random.default_rng(1))

    from banditroute.core.config import load_config, parse_set_args

    learner_cfg = load_config(LearnerConfig, None, {"seed": args.seed, **parse_set_args(args.learner_set)})
    learner = OnlineLearner(start, learner_cfg)
    gen = torch.Generator().manual_seed(args.seed)
    window = 500
    recent: list[float] = []
    curve: list[list[float]] = []
    greedy_checkpoints: list[list[float]] = []
    done = 0
    t0 = time.perf_counter()
    while done < args.decisions:
        n = min(args.batch, args.decisions - done)
        rows = rng.integers(0, len(data), n)
        w = rng.uniform(0, 1, n)
        dec = start.decide(emb[rows], w, explore=True, generator=gen)
        sc, co = scores[rows, dec.actions], costs[rows, dec.actions]
        r = reward(sc, co, w, tau)
        recent.extend(r.tolist())
        events = [
            JoinedEvent(DecisionRecord(f"{done + i}", 0.0, emb[rows[i]], float(w[i]), list(data.models), data.models[dec.actions[i]],
                                       float(dec.propensities[i]), start.policy_version, encoder_id=encoder_id), float(sc[i]), float(co[i]), 0.0)
            for i in range(n)
        ]
        learner.update(events_to_table(events))
        done += n
        if done % 100 < n or done == args.decisions:
            curve.append([done, float(np.mean(recent[-window:]))])
        if done % 2000 < n or done == args.decisions:
            lv = expected_levels(start, emb, full_reward, 5000, np.random.default_rng(2))
            greedy_checkpoints.append([done, lv["explore"], lv["greedy"]])
            print(f"simulated {done} decisions: running reward {curve[-1][1]:+.4f}, policy explore {lv['explore']:+.4f} "
                  f"greedy {lv['greedy']:+.4f} (v{learner.policy_version}, {time.perf_counter() - t0:.0f}s)", flush=True)
    result = {
        "command": "python " + " ".join(sys.argv),
        "encoder": args.encoder, "decisions": args.decisions, "batch": args.batch, "seed": args.seed,
        "learner_config": __import__("dataclasses").asdict(learner_cfg),
        "levels": levels, "simulated_curve": curve, "policy_value_checkpoints": greedy_checkpoints,
        "machine": {"cpus": os.cpu_count(), "cpu_model": cpu_model(), "loadavg_at_end": os.getloadavg()},
    }
    refs = {"random router": levels["random"], "cold start (explore)": levels["cold_start"]["explore"]}
    if "offline" in levels:
        refs["offline policy, explore"] = levels["offline"]["explore"]
        refs["offline policy, greedy"] = levels["offline"]["greedy"]
    up_curve = None
    if args.up_summary:
        summary = json.loads(Path(args.up_summary).read_text())
        up_curve = summary["reward_curve"]
        result["up_run"] = {k: summary[k] for k in ("decisions", "policy_version_end", "mean_reward", "final_running_reward",
                                                     "decisions_per_s", "encoder") if k in summary}
        result["up_run"]["reward_curve"] = up_curve
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    plot_online_vs_offline(out / f"online_curve-{args.encoder}.png", curve, up_curve, refs)
    return result


def plot_online_vs_offline(path: Path, sim_curve, up_curve, refs: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8.5, 4.8))
    xs, ys = zip(*sim_curve)
    ax.plot(xs, ys, label="online learner, cold start (simulated traffic, running mean of 500)", color="tab:blue")
    if up_curve:
        ux, uy = zip(*up_curve)
        ax.plot(ux, uy, label="`banditroute up` (real Serve loop)", color="tab:orange")
    for i, (name, level) in enumerate(refs.items()):
        ax.axhline(level, linestyle="--", color=f"C{i + 2}", label=name)
    ax.set_xlabel("decisions")
    ax.set_ylabel("reward (w_cost ~ U[0,1])")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    ax.set_title("Online learning from cold start on RouterBench vs the offline-trained policy")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="what", required=True)
    t = sub.add_parser("throughput")
    t.add_argument("--ingest-rewards", type=int, default=4000)
    t.add_argument("--out", default="bench/results")
    c = sub.add_parser("curve")
    c.add_argument("--data")
    c.add_argument("--encoder", default="minilm", choices=["minilm", "hashing"])
    c.add_argument("--offline-policy", help="checkpoint from `banditroute train` (same data pool and encoder)")
    c.add_argument("--up-summary", help="summary.json of a `banditroute up` run to draw as well")
    c.add_argument("--decisions", type=int, default=20000)
    c.add_argument("--batch", type=int, default=8, help="events per learner update (what the feedback actor sends)")
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--learner-set", action="append", metavar="KEY=VALUE", help="LearnerConfig override, e.g. learning_rate=3e-4")
    c.add_argument("--out", default="bench/results")
    args = ap.parse_args()
    if args.what == "throughput":
        load = os.getloadavg()
        result = {"command": "python " + " ".join(sys.argv), "machine": {"cpus": os.cpu_count(), "cpu_model": cpu_model(), "loadavg_at_start": load},
                  **bench_throughput(args)}
        result["machine"]["loadavg_at_end"] = os.getloadavg()
        name = "learner_throughput.json"
    else:
        result = bench_curve(args)
        name = f"online_curve-{args.encoder}.json"
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / name).write_text(json.dumps(result, indent=2))
    print(out / name)
    return 0


if __name__ == "__main__":
    sys.exit(main())
