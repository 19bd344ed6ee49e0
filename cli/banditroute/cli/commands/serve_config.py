"""`banditroute serve-config`: write the Serve config (serve deploy / KubeRay serveConfigV2 format) for an app config."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from banditroute.core.config import parse_set_args

HELP = ("write the Serve config file (`serve deploy` / KubeRay serveConfigV2 format) generated from an "
        "application config YAML (configs/app.example.yaml)")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="application config YAML (AppConfig: start, router, serve, storage, ...)")
    parser.add_argument("--out", help="write the Serve config here (default: stdout)")
    parser.add_argument("--set", action="append", metavar="KEY=VALUE",
                        help="override a config key, e.g. --set router.num_replicas=2 (after BANDITROUTE__* env vars)")


def run(args: argparse.Namespace) -> int:
    import yaml

    from banditroute.cluster.config import load_app_config
    from banditroute.cluster.launch import serve_config_from_app

    app = load_app_config(args.config, parse_set_args(args.set))
    text = yaml.safe_dump(serve_config_from_app(app), sort_keys=False)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text)
        print(f"wrote {args.out}", file=sys.stderr)
    else:
        sys.stdout.write(text)
    return 0
