#!/usr/bin/env python
"""Offline closed-loop replay of budget pacing in serving: no Ray, seconds per run.

What runs is the serving code itself, minus the network: ``serve.budget.BudgetLedger`` (the actor's
state) and ``BudgetClient.pace_all`` (the ingress's pacing, greedy lever included), over the identity
policy's served logits and ``policy.decide.decide`` on RouterBench prompts. Traffic is the scenario
driver's: a random prompt, w_cost ~ U(0, 1), mode explore. Decisions go in batches of ``--batch``
routed with the last view (the 0.25 s report lag of a live ingress); each decision is booked at its
registry price and corrected with its logged cost one batch later (the reported cost of the
feedback). The policy does NOT learn here (the live run's learner does).

Also prints the open-loop spend of explore traffic at fixed shifts (the cause of round 2's miss: the
exploration floor keeps the spend above the target whatever the cost weight).

    .venv/bin/python bench/budget_replay.py --policy runs/h8/identity-static/policy \\
        --data ../shared/data/routerbench/train.parquet --target 0.3 --seeds 0,1,2,3,4 \\
        --out bench/results/budget_replay.json
"""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

from banditroute.core.data import load_routing_data, resolve_data_path
from banditroute.policy.decide import decide
from banditroute.policy.exploration import bound_probabilities
from banditroute.policy.identity_policy import IdentityPolicy
from banditroute.policy.pacer import paced_w_cost
from banditroute.policy.reward import reward
from banditroute.serve.budget import BudgetClient, BudgetConfig, BudgetLedger


def closed_loop(policy, emb, costs, scores, config: BudgetConfig, n: int, batch: int, seed: int) -> dict:
    """One paced run of ``n`` decisions -> spend of each 500-decision block, second-half spend, score, reward."""
    prices = policy.registry.prices()
    ledger = BudgetLedger(config, prices.get)
    client = BudgetClient(config, "replay", None, None, actor_factory=lambda: None, rng_seed=seed)
    client._ensure_reporter = lambda: None  # the view is handed over by hand, after each batch
    rng = np.random.default_rng(seed)
    gen = torch.Generator().manual_seed(seed)
    spent, got, rewards, late = [], [], [], []
    for start in range(0, n, batch):
        rows = rng.integers(len(emb), size=batch)
        w = rng.uniform(0.0, 1.0, size=batch)
        reqs = [SimpleNamespace(w_cost=float(x), mode="explore") for x in w]
        client.pace_all(reqs, None)
        explore = torch.as_tensor([r.mode == "explore" for r in reqs])
        with torch.no_grad():
            logits, _ = policy.logits_for(emb[rows], np.array([r.w_cost for r in reqs], dtype=np.float32), band_fresh=True)
        actions = decide(logits, explore, generator=gen).actions.numpy()
        c, s = costs[rows, actions], scores[rows, actions]
        spent += list(c)
        got += list(s)
        rewards += list(reward(s, c, w, policy.meta.tau))
        ids = [f"{start + i}" for i in range(batch)]
        client.view = ledger.report([(i, policy.models[k], None) for i, k in zip(ids, actions)], late)
        late = list(zip(ids, c.tolist()))
    spent_arr, half = np.asarray(spent), n // 2
    view = client.view.get("global", {})
    target = config.target_usd_per_1k
    return {"seed": seed, "spend_last_half": 1000 * float(spent_arr[half:].mean()),
            "error_last_half": 1000 * float(spent_arr[half:].mean()) / target - 1.0,
            "spend_whole": 1000 * float(spent_arr.mean()),
            "spend_per_500": [round(1000 * float(spent_arr[i:i + 500].mean()), 4) for i in range(0, n, 500)],
            "mean_score_last_half": float(np.mean(got[half:])), "mean_reward_last_half": float(np.mean(rewards[half:])),
            "final_shift": view.get("adjustment"), "final_greedy_fraction": view.get("greedy_fraction"),
            "at_limit": view.get("at_limit"), "greedy_decisions": client.greedy_decisions}


def open_loop(policy, emb, costs, shifts, n: int, seed: int) -> list[dict]:
    """Expected spend of explore traffic (w ~ U(0, 1)) with every request shifted by a fixed amount."""
    rng = np.random.default_rng(seed)
    rows, w = rng.integers(len(emb), size=n), rng.uniform(0.0, 1.0, size=n)
    out = []
    for shift in shifts:
        paced = np.array([paced_w_cost(x, shift) for x in w], dtype=np.float32)
        with torch.no_grad():
            logits, _ = policy.logits_for(emb[rows], paced)
        probs = torch.softmax(logits, -1)
        explore = bound_probabilities(probs, torch.isfinite(logits), 0.01, 0.98).numpy()
        greedy = probs.numpy().argmax(1)
        out.append({"shift": shift, "explore_usd_per_1k": 1000 * float((explore * costs[rows]).sum(1).mean()),
                    "greedy_usd_per_1k": 1000 * float(costs[rows, greedy].mean())})
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--policy", required=True, help="identity policy checkpoint")
    parser.add_argument("--data", default="routerbench", help="routing data (RouterBench layout)")
    parser.add_argument("--target", type=float, default=0.3, help="USD per 1,000 requests")
    parser.add_argument("--decisions", type=int, default=4000)
    parser.add_argument("--batch", type=int, default=10, help="decisions routed per view (the report lag)")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--set", action="append", default=[], help="BudgetConfig field=value, e.g. ki=0.3")
    parser.add_argument("--out")
    args = parser.parse_args(argv)

    from banditroute.policy.encoders import make_encoder

    data = load_routing_data(resolve_data_path(args.data))
    policy = IdentityPolicy.load(args.policy, registry_refresh_s=None)
    cols = [data.model_index(m) for m in policy.models]
    costs, scores = data.costs[:, cols], data.scores_filled[:, cols]
    emb = np.asarray(make_encoder(replace(policy.encoder, device="cpu")).encode(list(data.prompts)), dtype=np.float32)
    overrides = {k: float(v) for k, v in (item.split("=", 1) for item in args.set)}
    configs = {"round 2 (shift only, ki 0.3)": BudgetConfig(target_usd_per_1k=args.target, kp=0.3, ki=0.3, max_greedy_fraction=0.0),
               "round 3 (defaults)": BudgetConfig(target_usd_per_1k=args.target, **overrides)}
    result = {"policy": args.policy, "target_usd_per_1k": args.target, "decisions": args.decisions,
              "open_loop": open_loop(policy, emb, costs, [0.0, 2.0, 4.0, 8.0, 16.0], args.decisions, 0), "runs": {}}
    for name, cfg in configs.items():
        runs = [closed_loop(policy, emb, costs, scores, cfg, args.decisions, args.batch, int(s)) for s in args.seeds.split(",")]
        result["runs"][name] = runs
        errs = [r["error_last_half"] for r in runs]
        print(f"{name}: second-half error per seed {[round(e, 3) for e in errs]} (max |err| {max(map(abs, errs)):.3f})", flush=True)
    print(json.dumps(result["open_loop"]), flush=True)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
