"""`banditroute eval`: compare a trained policy with baseline routers on held-out prompts."""

from __future__ import annotations

import argparse
import dataclasses
import logging
from pathlib import Path

from banditroute.core.config import load_config, parse_set_args, to_dict
from banditroute.core.data import DataError, load_routing_data
from banditroute.policy.checkpoint import load_policy
from banditroute.policy.encoders import DEFAULT_CACHE_DIR, embed_prompts
from banditroute.policy.evaluate import build_report, evaluate_routers, parse_grid, render_markdown, write_report
from banditroute.policy.baselines import DEFAULT_ROUTERS, make_routers
from banditroute.policy.routers import RoutersConfig
from banditroute.core.progress import progress_bar

HELP = "evaluate a policy checkpoint against baseline routers over a preference grid; prints the output folder last"

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--train", required=True, help="training data the baselines are fitted on (RouterBench layout)")
    parser.add_argument("--test", required=True, help="held-out data every router is scored on")
    parser.add_argument("--policy", required=True, help="policy checkpoint folder (policy.pt + meta.json)")
    parser.add_argument("--out", required=True, help="output folder for report.json, report.md and pareto.png")
    parser.add_argument("--grid", help="comma-separated w_cost values (default 0,0.1,0.2,0.3,0.5,0.7,0.9)")
    parser.add_argument(
        "--routers",
        help=f"comma-separated routers (default: {','.join(DEFAULT_ROUTERS)}); "
        "'single' expands to every model, 'single:<model>' picks one",
    )
    parser.add_argument("--set", action="append", metavar="KEY=VALUE",
                        help="router setting, e.g. --set knn.k=20 --set linucb.passes=5 --set full_info.epochs=100")
    parser.add_argument("--cache-dir", default=DEFAULT_CACHE_DIR, help="embedding cache folder ('none' disables it)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the baselines (random, linucb, full-info)")
    parser.add_argument("--device", help="torch device for the encoder (default: the policy's encoder setting)")


def run(args: argparse.Namespace) -> int:
    grid = parse_grid(args.grid)
    names = [n.strip() for n in (args.routers or ",".join(DEFAULT_ROUTERS)).split(",") if n.strip()]
    config = load_config(RoutersConfig, overrides=parse_set_args(args.set))
    policy = load_policy(args.policy)  # any kind: BaRP or identity
    train = load_routing_data(args.train)
    test = load_routing_data(args.test)
    if set(train.models) != set(test.models):
        raise DataError(
            f"train and test hold different model pools: only in train {sorted(set(train.models) - set(test.models))}, "
            f"only in test {sorted(set(test.models) - set(train.models))}"
        )

    routers = make_routers(names, test.models, config, policy=policy)  # bad names fail before any encoding
    encoder = policy.meta.encoder
    if args.device:
        encoder = dataclasses.replace(encoder, device=args.device)
    cache_dir = None if args.cache_dir == "none" else args.cache_dir
    train_emb, encoder_id = embed_prompts(train.prompts, encoder, cache_dir)
    test_emb, _ = embed_prompts(test.prompts, encoder, cache_dir)
    if policy.meta.encoder_id and encoder_id != policy.meta.encoder_id:
        raise ValueError(
            f"the policy was trained on embeddings {policy.meta.encoder_id!r} but its encoder config now gives "
            f"{encoder_id!r}; evaluate with the same encoder"
        )

    with progress_bar(total=len(routers), desc="fitting and evaluating routers") as bar:
        results, seconds = evaluate_routers(
            routers, train, train_emb, test, test_emb, grid, tau=policy.tau, seed=args.seed, progress=bar.update
        )
    report = build_report(
        results,
        grid,
        policy.tau,
        len(test),
        n_train=len(train),
        models=list(test.models),
        data={
            "train": str(args.train),
            "test": str(args.test),
            "train_fingerprint": train.fingerprint(),
            "test_fingerprint": test.fingerprint(),
            "test_tasks": sorted(set(test.eval_names.tolist())),
        },
        checkpoint=str(Path(args.policy)),
        encoder_id=encoder_id,
        seed=args.seed,
        router_config=to_dict(config),
        fit_seconds=seconds,
    )
    out = Path(args.out)
    write_report(report, out)
    print(render_markdown(report))
    print(out)
    return 0
