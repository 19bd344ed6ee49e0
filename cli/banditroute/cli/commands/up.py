"""`banditroute up`: the online-learning loop end to end, driven by replayed traffic (`make run`)."""

from __future__ import annotations

import argparse
from pathlib import Path

from banditroute.core.config import parse_set_args

HELP = ("run the whole online-learning loop on a local Ray (Serve router, feedback, learner, parameter server) "
        "with a replay traffic driver; writes OUT/summary.json and OUT/learning_curve.png")

# Each flag is a dotted override of the application config (cluster/config.py).
FLAG_KEYS: dict[str, tuple[str, ...]] = {
    "data": ("up.data",),
    "policy": ("online.initial_policy",),
    "max_decisions": ("up.max_decisions",),
    "out": ("up.out",),
    "encoder": ("up.cold_start.encoder",),
    "kind": ("up.cold_start.kind",),
    "replicas": ("router.num_replicas",),
    "concurrency": ("up.concurrency",),
    "port": ("router.port",),
    "storage": ("storage.uri",),
    "endpoint_url": ("storage.endpoint_url",),
    "seed": ("up.seed", "router.seed"),
    "scenario": ("up.scenario",),
}
_PATH_FLAGS = ("data", "policy", "out", "scenario")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from banditroute.cluster.cold_start import COLD_START_ENCODERS
    from banditroute.cluster.config import DEFAULT_MAX_DECISIONS

    parser.add_argument("--data", help="routing data to replay (up.data; default ../shared/data/routerbench/train.parquet)")
    parser.add_argument("--policy", help="warm start from this checkpoint (barp, value or identity; its kind picks the "
                                         "online learner), a folder or storage URI (online.initial_policy; default: "
                                         "cold start, random weights of --kind)")
    parser.add_argument("--kind", choices=["value", "barp"],  # cluster.cold_start.COLD_START_KINDS
                        help="cold-start policy kind and so its online learner (up.cold_start.kind): value (default; "
                             "per-model score and cost, Thompson exploration) or barp (REINFORCE); ignored with --policy")
    parser.add_argument("--max-decisions", type=int,
                        help=f"stop after N routed decisions (up.max_decisions; default {DEFAULT_MAX_DECISIONS}; 0 = until Ctrl-C)")
    parser.add_argument("--out", help="output folder (up.out; default runs/latest)")
    parser.add_argument("--encoder", choices=list(COLD_START_ENCODERS),
                        help="cold-start encoder (up.cold_start.encoder): minilm (default), static (model2vec distilled "
                             "from MiniLM, ~130x faster on CPU) or hashing (smoke runs)")
    parser.add_argument("--replicas", type=int, help="replicas that decide (router.num_replicas; default 2; inline ingress replicas on CPU)")
    parser.add_argument("--concurrency", type=int, help="requests the replay driver keeps in flight (up.concurrency; default 16)")
    parser.add_argument("--port", type=int, help="Serve HTTP port on 127.0.0.1 (router.port; default: a free port)")
    parser.add_argument("--storage", help="event log + checkpoint storage: a folder or s3://bucket/prefix "
                                          "(storage.uri; default OUT/storage/run-<time>)")
    parser.add_argument("--endpoint-url", help="S3-compatible endpoint for --storage s3://... (storage.endpoint_url; MinIO, moto)")
    parser.add_argument("--seed", type=int, help="seed of the cold-start weights, the traffic and the replicas' samplers (default 0)")
    parser.add_argument("--scenario", help="scripted run (up.scenario): a YAML of withhold / budget_usd_per_1k / events "
                                           "(onboard, price) applied through the admin API; --policy must be an identity policy")
    parser.add_argument("--config", help="application config YAML (configs/app.example.yaml: router, feedback, learner, "
                                         "storage, online, up sections)")
    parser.add_argument("--set", action="append", metavar="KEY=VALUE",
                        help="override a config key, e.g. --set learner.learning_rate=3e-4 --set up.cold_start.network.hidden_dim=64")


def overrides_from_flags(args: argparse.Namespace) -> dict:
    """The dotted overrides the flags stand for; ``--set`` pairs first, so an explicit flag wins."""
    overrides: dict = dict(parse_set_args(args.set))
    for flag, keys in FLAG_KEYS.items():
        value = getattr(args, flag)
        if value is None:
            continue
        if flag in _PATH_FLAGS and "://" not in value:
            value = str(Path(value).expanduser())
        for key in keys:
            overrides[key] = value
    return overrides


def run(args: argparse.Namespace) -> int:
    from banditroute.cluster.up import load_up_config, run_up

    summary = run_up(load_up_config(args.config, overrides_from_flags(args)))
    return 0 if summary["decisions"] > 0 else 1
