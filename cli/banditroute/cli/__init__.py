"""The `banditroute` command: one subcommand per entry point.

Each subcommand lives in its own module exposing ``HELP`` (one line),
``add_arguments(parser)`` and ``run(args) -> int``; this file only wires
them up, so adding a command is one line in SUBCOMMANDS.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys

SUBCOMMANDS: dict[str, str] = {
    "split": "banditroute.cli.commands.split",
    "train": "banditroute.cli.commands.train",
    "eval": "banditroute.cli.commands.evaluate",
    "serve": "banditroute.cli.commands.serve",
    "ope": "banditroute.cli.commands.ope",
    "up": "banditroute.cli.commands.up",
    "onboard": "banditroute.cli.commands.onboard",
    "onboard-eval": "banditroute.cli.commands.onboard_eval",
    "serve-config": "banditroute.cli.commands.serve_config",
    "train-from-log": "banditroute.cli.commands.train_from_log",
}


def _set_runtime_defaults() -> None:
    """Defaults every entry point wants; explicit environment settings win."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="banditroute", description="LLM router that learns from bandit feedback.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name, module_name in SUBCOMMANDS.items():
        module = importlib.import_module(module_name)
        cmd = sub.add_parser(name, help=module.HELP, description=module.HELP)
        module.add_arguments(cmd)
        cmd.set_defaults(_run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    _set_runtime_defaults()
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        return int(args._run(args) or 0)
    except KeyboardInterrupt:
        return 130
    except (ValueError, FileNotFoundError) as exc:
        # Bad input (data, config, paths): a clear message, not a traceback.
        print(f"banditroute {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
