"""`banditroute train-from-log`: offline retraining from the durable event log (learner/offline.py).

Reads the joined events under ``storage`` (the application config's, the
same S3 prefix the online loop writes), trains the newest online checkpoint
(or ``--policy``) for a few passes, compares it with the serving policy (the
newest promoted checkpoint) on the most recent held-out events by the
promotion gate's rule, and writes the candidate checkpoint plus a
report under ``<storage>/<out_prefix>/<run>/``. With ``--address`` the work
runs as a Ray task on that cluster (the k8s RayJob); otherwise in-process.
Exit status: 0 when the candidate passed the held-out check, 3 when it did
not (it is written either way, for inspection), 2 on bad input.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import fields
from pathlib import Path
from typing import Any

from banditroute.core.config import field_docs, parse_set_args

HELP = "retrain the policy offline on the durable event log (local or S3) and check it on held-out recent events"

EXIT_FAILED_CHECK = 3


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from banditroute.learner.offline import OfflineRetrainConfig

    parser.add_argument("--config", help="application config YAML (AppConfig; its storage and learner sections are used)")
    parser.add_argument("--set", action="append", metavar="KEY=VALUE",
                        help="override an application config key, e.g. --set storage.uri=s3://bucket/prod")
    parser.add_argument("--policy", help="start from this BaRP checkpoint (folder or storage URI) instead of the newest online checkpoint")
    parser.add_argument("--address", help="run on this Ray cluster as a task ('auto' inside a RayJob); default: in this process")
    parser.add_argument("--num-cpus", type=float, default=1.0, help="CPUs of the Ray task (with --address)")
    parser.add_argument("--report", help="also write the JSON report to this local path")
    defaults, docs = OfflineRetrainConfig(), field_docs(OfflineRetrainConfig)
    for f in fields(OfflineRetrainConfig):
        default = getattr(defaults, f.name)
        parser.add_argument("--" + f.name.replace("_", "-"), type=type(default), default=default,
                            help=f"{docs.get(f.name, '')} (default {default!r})")


def retrain(app: Any, retrain_cfg: Any, policy_location: str | None) -> dict[str, Any]:
    """Read the log, train, check, write the candidate; returns the report (runs where it is called)."""
    from banditroute.policy.checkpoint import load_barp_policy
    from banditroute.feedback.log import EventLog
    from banditroute.learner.checkpoint import load_checkpoint, load_latest_checkpoint, newest_promoted_checkpoint, save_checkpoint
    from banditroute.learner.offline import train_offline
    from banditroute.core.storage import open_storage

    storage = open_storage(app.storage)
    checkpoints = storage.child(app.learner.checkpoint_prefix)
    if policy_location:
        start = load_barp_policy(policy_location, app.storage, field="--policy")
    else:
        found = load_latest_checkpoint(checkpoints)
        if found is None:
            raise ValueError(f"--policy: no checkpoint under {checkpoints.uri_for()}; give one to start from")
        start = found[0]
    promoted = newest_promoted_checkpoint(checkpoints)
    serving = load_checkpoint(checkpoints, promoted)[0] if promoted is not None else None
    since = time.time() - retrain_cfg.since_hours * 3600.0 if retrain_cfg.since_hours > 0 else None
    events = EventLog(storage).read_events(since=since)
    candidate, report = train_offline(events, start, app.learner, retrain_cfg, serving=serving)
    run = time.strftime("run-%Y%m%dT%H%M%SZ", time.gmtime())
    out = storage.child(f"{retrain_cfg.out_prefix.strip('/')}/{run}")
    report["checkpoint"] = save_checkpoint(out, candidate, extra={"offline": True, "passed": report["passed"]})
    report["storage"] = storage.uri_for("")
    out.write_json("report.json", report)
    report["report"] = out.uri_for("report.json")
    return report


def run(args: argparse.Namespace) -> int:
    from banditroute.cluster.config import load_app_config
    from banditroute.learner.offline import OfflineRetrainConfig

    app = load_app_config(args.config, parse_set_args(args.set))
    retrain_cfg = OfflineRetrainConfig(**{f.name: getattr(args, f.name) for f in fields(OfflineRetrainConfig)})
    retrain_cfg.validate()
    if args.address:
        import ray

        ray.init(address=args.address, namespace=app.start.namespace)
        report = ray.get(ray.remote(num_cpus=args.num_cpus)(retrain).remote(app, retrain_cfg, args.policy))
    else:
        report = retrain(app, retrain_cfg, args.policy)
    text = json.dumps(report, indent=2, default=str)
    if args.report:
        Path(args.report).parent.mkdir(parents=True, exist_ok=True)
        Path(args.report).write_text(text)
    print(text)
    print(("PASSED: " if report["passed"] else "NOT PASSED: ") + report["reason"])
    return 0 if report["passed"] else EXIT_FAILED_CHECK
