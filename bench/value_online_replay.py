#!/usr/bin/env python
"""Fast offline replay of the ONLINE value learner's update cadence: no Ray, a minute per run.

The live loop's learner (``learner.value_learner``) and the offline trainer (``policy.value_train``)
share one step function; what differs is the cadence. The feedback actor pushes a few events per
update (~6 in the 10,000-decision run: 10,000 events over 1,598 versions) and each update takes
``learner.value.gradient_steps`` Adam steps on ``learner.value.replay_sample`` replayed pulls, where
the offline trainer takes ``updates_per_batch`` steps per 32 decisions. This replays the offline
bandit simulation (``train_value_policy``) with the online cadence (``--batch`` decisions between
updates) and any ``train.*`` override, and scores the greedy policy on held-out prompts (the default
w_cost grid, the policy's tau, as ``banditroute eval``'s ``policy`` router) at given pull counts.
It also reports the running reward of the explore decisions themselves per quarter.

    .venv/bin/python bench/value_online_replay.py --train /tmp/h1c/split/train.parquet \\
        --test /tmp/h1c/split/test.parquet --pulls 10000 --batch 6 --set updates_per_batch=2
"""

from __future__ import annotations

import argparse
import json
from dataclasses import replace

import numpy as np
from banditroute.core.data import load_routing_data
from banditroute.policy.encoders import EncoderConfig, embed_prompts
from banditroute.policy.evaluate import score_choices
from banditroute.policy.reward import DEFAULT_PREFERENCE_GRID
from banditroute.policy.value_policy import ValueNetworkConfig
from banditroute.policy.value_train import ValueTrainConfig, train_value_policy


def held_out_reward(policy, test, test_emb, greedy: str = "vote") -> float:
    """Mean reward of the greedy choices over the default w_cost grid (``banditroute eval``'s policy router).

    ``greedy``: "vote" = argmax of the Thompson distribution (what ``decide`` serves), "mean" = argmax of
    the heads' mean predicted reward (issue 13 round 4's experiment).
    """
    index = [policy.models.index(m) for m in test.models]
    rewards = []
    for w in DEFAULT_PREFERENCE_GRID:
        values = policy.logits(test_emb, float(w)) if greedy == "vote" else policy.expected_rewards(test_emb, float(w))
        logits = values.cpu().numpy()[:, index]
        rewards.append(score_choices(logits.argmax(axis=1), test, float(w), policy.meta.tau)["reward"])
    return float(np.mean(rewards))


def curve_recorder(curve: dict, pending: list[int], test, test_emb):
    """An ``after_update`` callback writing the held-out reward into ``curve`` as each pull mark is passed."""

    def after_update(pulls: int, policy) -> None:
        while pending and pulls >= pending[0]:
            mark = pending.pop(0)
            curve[mark] = round(held_out_reward(policy, test, test_emb), 4)
            curve[f"{mark}_mean"] = round(held_out_reward(policy, test, test_emb, "mean"), 4)

    return after_update


def parse_value(text: str):
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return {"true": True, "false": False}.get(text.lower(), text)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--train", required=True)
    ap.add_argument("--test", required=True)
    ap.add_argument("--encoder", default="static")
    ap.add_argument("--pulls", type=int, default=10_000)
    ap.add_argument("--batch", type=int, default=6, help="decisions between updates (the feedback actor's push size)")
    ap.add_argument("--checkpoints", default="1000,3000,5000,10000,20000")
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--set", action="append", default=[], help="train.* field=value (network.* for the network)")
    args = ap.parse_args()
    train, test = load_routing_data(args.train), load_routing_data(args.test)
    enc = EncoderConfig(name=args.encoder, device="cpu")
    train_emb, _ = embed_prompts(train.prompts, enc)
    test_emb, encoder_id = embed_prompts(test.prompts, enc)
    over = dict(kv.split("=", 1) for kv in args.set)
    net = {k[len("network."):]: parse_value(v) for k, v in over.items() if k.startswith("network.")}
    top = {k: parse_value(v) for k, v in over.items() if not k.startswith("network.")}
    marks = [int(c) for c in args.checkpoints.split(",") if int(c) <= args.pulls]
    for seed in [int(s) for s in args.seeds.split(",")]:
        config = replace(ValueTrainConfig(), max_pulls=args.pulls, batch_size=args.batch, seed=seed,
                         network=replace(ValueNetworkConfig(), **net), **top)
        curve: dict = {}
        after_update = curve_recorder(curve, list(marks), test, test_emb)
        policy, env, _ = train_value_policy(train, train_emb, config, enc, encoder_id, after_update=after_update)
        running = np.concatenate([p["reward"] for p in env.pulls])
        quarters = [round(float(q.mean()), 4) for q in np.array_split(running, 4)]
        print(json.dumps({"seed": seed, "batch": args.batch, "set": args.set, "held_out": curve,
                          "final": round(held_out_reward(policy, test, test_emb), 4),
                          "final_mean": round(held_out_reward(policy, test, test_emb, "mean"), 4),
                          "running_by_quarter": quarters}), flush=True)


if __name__ == "__main__":
    main()
