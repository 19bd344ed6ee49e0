"""`banditroute up`: the online-learning loop end to end, driven by replayed traffic (`make run`)."""

from __future__ import annotations

import argparse
from pathlib import Path

from banditroute.core.config import load_config, parse_set_args

HELP = ("run the whole online-learning loop on a local Ray (Serve router, feedback, learner, parameter server) "
        "with a replay traffic driver; writes OUT/summary.json and OUT/learning_curve.png")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from banditroute.learner.loop import DEFAULT_MAX_DECISIONS

    parser.add_argument("--data", help="routing data to replay (default ../shared/data/routerbench/train.parquet)")
    parser.add_argument("--policy", help="warm start from this policy checkpoint folder (default: cold start, random weights)")
    parser.add_argument("--max-decisions", type=int,
                        help=f"stop after N routed decisions (default {DEFAULT_MAX_DECISIONS}; 0 = until Ctrl-C)")
    parser.add_argument("--out", help="output folder (default runs/latest)")
    parser.add_argument("--encoder", choices=["minilm", "hashing"],
                        help="cold-start encoder: minilm (default) or hashing (fast smoke runs)")
    parser.add_argument("--replicas", type=int, help="Router replicas (default 2)")
    parser.add_argument("--concurrency", type=int, help="requests the replay driver keeps in flight (default 16)")
    parser.add_argument("--port", type=int, help="Serve HTTP port on 127.0.0.1 (default: a free port)")
    parser.add_argument("--storage", help="event log + checkpoint storage: a folder or s3://bucket/prefix (default OUT/storage/run-<time>)")
    parser.add_argument("--endpoint-url", help="S3-compatible endpoint for --storage s3://... (MinIO, moto)")
    parser.add_argument("--seed", type=int, help="seed of the cold-start weights and the traffic (default 0)")
    parser.add_argument("--config", help="YAML with UpConfig keys (learner:, feedback:, network: sections ...)")
    parser.add_argument("--set", action="append", metavar="KEY=VALUE",
                        help="override a config key, e.g. --set learner.learning_rate=3e-4 --set feedback.learner_batch_size=64")


def run(args: argparse.Namespace) -> int:
    from banditroute.learner.loop import UpConfig, run_up

    overrides: dict = dict(parse_set_args(args.set))
    for key, value in (
        ("data", args.data), ("policy", args.policy), ("max_decisions", args.max_decisions), ("out", args.out),
        ("encoder", args.encoder), ("replicas", args.replicas), ("concurrency", args.concurrency), ("port", args.port),
        ("seed", args.seed),
    ):
        if value is not None:
            overrides[key] = value
    if args.storage:
        overrides["storage.uri"] = args.storage
        if args.endpoint_url:
            overrides["storage.endpoint_url"] = args.endpoint_url
    for key in ("data", "policy", "out"):
        if isinstance(overrides.get(key), str) and "://" not in overrides[key]:
            overrides[key] = str(Path(overrides[key]).expanduser())
    cfg = load_config(UpConfig, args.config, overrides)
    summary = run_up(cfg)
    return 0 if summary["decisions"] > 0 else 1
