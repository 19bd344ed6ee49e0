"""`banditroute ope`: off-policy evaluation of a saved policy on the logged feedback events."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

HELP = "off-policy evaluation (IPS, SNIPS, doubly robust) of a policy checkpoint on logged events; prints a table, writes JSON"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--events", required=True,
                        help="event log: a storage root or its events/ folder, a Parquet file, local path or s3:// URI")
    parser.add_argument("--policy", required=True, help="policy checkpoint folder (policy.pt + meta.json), local or s3://")
    parser.add_argument("--w-cost", help="comma-separated preferences to evaluate at (default: each event's logged preference)")
    parser.add_argument("--modes", default="greedy,explore", help="target policy modes: greedy, explore (default both)")
    parser.add_argument("--out", default="ope_report.json", help="JSON report path (default ope_report.json)")
    parser.add_argument("--endpoint-url", help="S3-compatible endpoint for s3:// locations (MinIO, moto)")
    parser.add_argument("--folds", type=int, default=2, help="cross-fitting folds of the DR reward model (default 2)")
    parser.add_argument("--l2", type=float, default=1.0, help="ridge penalty of the DR reward model (default 1.0)")
    parser.add_argument("--seed", type=int, default=0)


def load_policy(location: str, endpoint_url: str | None = None):
    """A RoutingPolicy from a local checkpoint folder or a storage URI (s3://, with ``endpoint_url`` for MinIO/moto)."""
    from banditroute.policy.checkpoint import load_barp_policy
    from banditroute.core.storage import StorageConfig

    return load_barp_policy(location, StorageConfig(endpoint_url=endpoint_url), field="--policy")


def _parse_grid(text: str | None) -> list[float | None]:
    if not text:
        return [None]
    out: list[float | None] = []
    for part in text.split(","):
        try:
            w = float(part)
        except ValueError:
            raise ValueError(f"--w-cost: {part!r} is not a number") from None
        if not 0.0 <= w <= 1.0:
            raise ValueError(f"--w-cost: {w} is outside [0, 1]")
        out.append(w)
    return out


def render_table(reports: list[dict[str, Any]]) -> str:
    lines = [f"{'w_cost':>8} {'mode':>8} {'estimator':>9} {'value':>9} {'se':>8} {'95% CI':>21} {'ESS':>9}"]
    for rep in reports:
        w = rep["w_cost"]
        w_text = f"{w:.2f}" if isinstance(w, float) else str(w)
        for mode, res in rep["modes"].items():
            for name, est in res["estimates"].items():
                ci = f"[{est['ci95_low']:+.4f}, {est['ci95_high']:+.4f}]"
                lines.append(f"{w_text:>8} {mode:>8} {name:>9} {est['value']:+9.4f} {est['se']:8.4f} {ci:>21} {res['effective_sample_size']:9.1f}")
        lines.append(f"{w_text:>8} {'logged':>8} {'mean':>9} {rep['logged_policy_value']:+9.4f}")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    from banditroute.feedback.log import read_event_log
    from banditroute.learner.ope import evaluate_policy

    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    bad = [m for m in modes if m not in ("greedy", "explore")]
    if bad or not modes:
        raise ValueError(f"--modes: expected greedy and/or explore, got {args.modes!r}")
    grid = _parse_grid(args.w_cost)
    from banditroute.core.storage import StorageUnavailable

    try:
        policy = load_policy(args.policy, args.endpoint_url)
        events = read_event_log(args.events, args.endpoint_url)
    except StorageUnavailable as exc:
        raise ValueError(f"storage unreachable (check --endpoint-url and credentials): {exc}") from None
    reports = [
        evaluate_policy(events, policy, w_cost=w, modes=modes, folds=args.folds, l2=args.l2, seed=args.seed) for w in grid
    ]
    first = reports[0]
    print(f"policy v{policy.policy_version} ({len(policy.models)} models, tau={policy.tau:.6g}) on {first['events_used']} "
          f"logged events ({first['events_skipped_unknown_model']} skipped: model not in the pool; "
          f"{first['events_greedy_logged']} logged greedily, propensity 1)")
    print(render_table(reports))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"policy": args.policy, "events": args.events, "reports": reports}, indent=2))
    print(out)
    return 0
