"""`banditroute split`: seeded train/test split by prompt or by task."""

from __future__ import annotations

import argparse
from pathlib import Path

from banditroute.core.data import load_routing_data, resolve_data_path, split_by_prompt, split_by_task

HELP = "split routing data into train/test files, by prompt or by whole task (eval_name)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", help="routing data; default: ../shared/data/routerbench/train.parquet")
    parser.add_argument("--by", choices=["prompt", "task"], default="prompt", help="what is held out")
    parser.add_argument("--test-fraction", type=float, default=None, help="share held out (default 0.2 by prompt, 0.3 by task)")
    parser.add_argument("--test-tasks", help="comma-separated eval_name values to hold out (with --by task)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", required=True, help="folder for train.parquet and test.parquet")


def run(args: argparse.Namespace) -> int:
    data = load_routing_data(resolve_data_path(args.data))
    if args.by == "prompt":
        train, test = split_by_prompt(data, args.test_fraction or 0.2, args.seed)
    else:
        tasks = args.test_tasks.split(",") if args.test_tasks else None
        train, test = split_by_task(data, tasks, args.test_fraction or 0.3, args.seed)
    out = Path(args.out)
    train.save(out / "train.parquet")
    test.save(out / "test.parquet")
    print(f"train: {len(train)} prompts, test: {len(test)} prompts "
          f"(test tasks: {sorted(set(test.eval_names.tolist()))})")
    print(out)
    return 0
