"""The promotion gate on simulated `banditroute up` traffic (a bench, not a test).

    python bench/promotion_gate.py --decisions 3000 --seeds 0 1 --out bench/results

RouterBench train prompts uniformly, w_cost ~ U[0, 1], explore mode, 2
events per learner update (what `up` gives on the 2-core box: v0 -> v1501
for 3000 decisions), decisions sampled from what the replicas would SERVE
(the bounded softmax of the serving policy, learner.promotion's bounds),
the chosen model's logged outcome as the reward. The learner actor runs in
process (no Ray, no parameter server). For the gate on (defaults) and off:
the running mean reward of the last 500 decisions, the served and candidate
versions, the gate's decisions, and the time spent.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("OMP_NUM_THREADS", "1")  # as in a Ray actor: BLAS threads only fight each other on a busy box
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

from freshness import cpu_model  # noqa: E402


def simulate(data, emb, encoder_id, start, gate: bool, decisions: int, seed: int, batch: int = 2) -> dict:
    from banditroute.learner.actor import LearnerActor
    from banditroute.learner.ope import served_probabilities
    from banditroute.learner.promotion import PromotionConfig
    from banditroute.policy.reward import reward
    from banditroute.core.records import DecisionRecord, JoinedEvent, events_to_table

    actor = LearnerActor({"promotion": {"enabled": gate}, "checkpoint_every": 0, "seed": seed}, None, start.state(),
                         parameter_server_name=None)
    bounds = PromotionConfig()
    rng = np.random.default_rng(seed)
    rewards: list[float] = []
    curve: list[list[float]] = []
    mask = np.ones((batch, len(data.models)), bool)
    t0 = time.perf_counter()
    for done in range(0, decisions, batch):
        served = actor.serving if actor.serving is not None else actor.learner.policy
        rows = rng.integers(0, len(data), batch)
        w = rng.uniform(0, 1, batch)
        pi = served_probabilities(served, emb[rows], w.astype(np.float32), mask, np.ones(batch, bool),
                                  bounds.exploration_floor, bounds.exploration_ceiling)
        acts = np.array([rng.choice(len(p), p=p / p.sum()) for p in pi])
        sc, co = data.scores_filled[rows, acts], data.costs[rows, acts]
        rewards.extend(reward(sc, co, w, start.tau).tolist())
        events = [
            JoinedEvent(DecisionRecord(f"s{seed}-{done + i}", 0.0, emb[rows[i]].tolist(), float(w[i]), list(data.models),
                                       data.models[acts[i]], float(pi[i, acts[i]]), served.policy_version, encoder_id=encoder_id),
                        float(sc[i]), float(co[i]), 0.0)
            for i in range(batch)
        ]
        actor.update(events_to_table(events))
        if (done + batch) % 500 == 0:
            curve.append([done + batch, float(np.mean(rewards[-500:])), actor.serving_version])
    status = actor.promotion_status()
    gates = [h for h in status["history"] if h.get("action") == "gate"]
    return {
        "gate": gate, "seed": seed,
        "curve": curve, "curve_columns": ["decisions", "running mean reward (last 500)", "served version"],
        "mean_reward": float(np.mean(rewards)),
        "served_version_end": actor.serving_version, "candidate_version_end": actor.learner.policy_version,
        "events_held_out": actor.events_held_out,
        "gates_kept": len(gates), "promoted_of_kept": int(sum(g["promote"] for g in gates)),
        "last_gate_reason": gates[-1]["reason"] if gates else None,
        "seconds": time.perf_counter() - t0,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=None, help="routing data (default: ../shared/data/routerbench/train.parquet)")
    parser.add_argument("--encoder", default="hashing")
    parser.add_argument("--decisions", type=int, default=3000)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--out", default="bench/results")
    args = parser.parse_args()

    import torch

    from banditroute.core.data import load_routing_data, resolve_data_path
    from banditroute.cluster.cold_start import ColdStartConfig, starting_policy
    from banditroute.policy.encoders import embed_prompts

    torch.set_num_threads(1)
    data = load_routing_data(resolve_data_path(args.data))
    start = starting_policy(data, ColdStartConfig(encoder=args.encoder), seed=0)
    emb, encoder_id = embed_prompts(data.prompts, start.meta.encoder)
    runs = []
    for seed in args.seeds:
        for gate in (True, False):
            run = simulate(data, emb, encoder_id, start, gate, args.decisions, seed)
            runs.append(run)
            print(f"seed {seed} gate {'on ' if gate else 'off'}: mean reward {run['mean_reward']:.4f}, curve "
                  f"{[(c[0], round(c[1], 3), c[2]) for c in run['curve']]}, {run['seconds']:.0f}s", flush=True)
    summary = {g: float(np.mean([r["mean_reward"] for r in runs if r["gate"] == (g == "gate_on")])) for g in ("gate_on", "gate_off")}
    result = {
        "command": "python " + " ".join(sys.argv), "encoder": args.encoder, "decisions": args.decisions,
        "mean_reward_over_seeds": summary, "runs": runs,
        "machine": {"cpus": os.cpu_count(), "cpu_model": cpu_model(), "loadavg_at_end": os.getloadavg()},
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "promotion_gate.json").write_text(json.dumps(result, indent=2))
    print(out / "promotion_gate.json")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
