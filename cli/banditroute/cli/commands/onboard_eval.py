"""`banditroute onboard-eval`: hold a model out, onboard it from small quizzes, compare with retraining."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from banditroute.policy.encoders import DEFAULT_CACHE_DIR

HELP = "train an identity policy without a model, onboard it with each quiz size, compare with retraining; writes OUT/onboard.json"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", required=True, help="routing data (Parquet, RouterBench layout)")
    parser.add_argument("--holdout-model", required=True, help="the model to hold out of training and onboard")
    parser.add_argument("--quiz", default="10,20,50", help="comma-separated quiz sizes (default 10,20,50)")
    parser.add_argument("--out", required=True, help="output folder for onboard.json (+ onboard_details.json, onboard.md)")
    parser.add_argument("--quiz-strategy", choices=("adaptive", "stratified", "information", "random"), default="adaptive",
                        help="how quiz prompts are picked (default adaptive: ask in batches of 5, refit, ask where the model is "
                             "still uncertain, one prompt per k-means stratum)")
    parser.add_argument("--seed", type=int, default=0, help="seeds the prompt split and the training (default 0)")
    parser.add_argument("--test-fraction", type=float, default=0.2, help="held-out prompt fraction (default 0.2)")
    parser.add_argument("--epochs", type=int, help="bandit training epochs (overrides the config)")
    parser.add_argument("--config", help="YAML file with `train:` (IdentityTrainConfig) and `encoder:` sections")
    parser.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config key, e.g. --set train.irt.dim=2")
    parser.add_argument("--keep-checkpoints", action="store_true", help="also save OUT/without and OUT/retrained policies")
    parser.add_argument("--cache-dir", default=DEFAULT_CACHE_DIR, help="embedding cache folder ('none' disables it)")
    parser.add_argument("--device", default="auto", help="torch device for the encoder: auto, cpu, cuda")


def load_configs(args: argparse.Namespace):
    from banditroute.cli.commands.train import load_train_and_encoder_configs
    from banditroute.policy.identity_train import IdentityTrainConfig

    train_cfg, enc_cfg = load_train_and_encoder_configs(args.config, args.set, args.device, IdentityTrainConfig)
    if args.epochs is not None:
        train_cfg.epochs = args.epochs
        train_cfg.validate()
    return train_cfg, enc_cfg


def parse_quiz_sizes(text: str) -> list[int]:
    try:
        sizes = [int(v) for v in str(text).split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"--quiz: expected comma-separated integers, got {text!r}") from None
    if not sizes:
        raise ValueError("--quiz: no sizes")
    return sizes


def render_markdown(doc: dict, details: dict) -> str:
    lines = [
        f"held-out model: `{doc['model']}` ({details['n_train']} train / {details['n_test']} test prompts, "
        f"tau {details['tau']:.6g} USD, price {details['price_usd_per_call']:.6g} USD/call)",
        "",
        "| policy | mean reward over the grid |",
        "| --- | ---: |",
        f"| trained without the model | {doc['without_model_mean_reward']:.4f} |",
    ]
    for row in doc["rows"]:
        lines.append(f"| onboarded from {row['quiz']} quiz prompts | {row['mean_reward']:.4f} |")
    lines.append(f"| retrained with the model | {doc['retrained_mean_reward']:.4f} |")
    return "\n".join(lines) + "\n"


def run(args: argparse.Namespace) -> int:
    from banditroute.core.data import load_routing_data
    from banditroute.policy.encoders import embed_prompts
    from banditroute.policy.onboard_eval import run_onboard_eval

    train_cfg, enc_cfg = load_configs(args)
    sizes = parse_quiz_sizes(args.quiz)
    data = load_routing_data(args.data)
    if args.holdout_model not in data.models:
        raise ValueError(f"--holdout-model: unknown model {args.holdout_model!r}; the data has {list(data.models)}")
    cache_dir = None if args.cache_dir == "none" else args.cache_dir
    embeddings, encoder_id = embed_prompts(data.prompts, enc_cfg, cache_dir)
    out = Path(args.out)
    doc, details = run_onboard_eval(
        data,
        embeddings,
        args.holdout_model,
        sizes,
        train_cfg,
        enc_cfg,
        encoder_id,
        test_fraction=args.test_fraction,
        seed=args.seed,
        checkpoint_dir=out if args.keep_checkpoints else None,
        quiz_strategy=args.quiz_strategy,
    )
    out.mkdir(parents=True, exist_ok=True)
    (out / "onboard.json").write_text(json.dumps(doc, indent=2) + "\n")
    (out / "onboard_details.json").write_text(json.dumps(details, indent=2, default=float) + "\n")
    (out / "onboard.md").write_text(render_markdown(doc, details))
    print(render_markdown(doc, details), end="")
    print(out / "onboard.json")
    return 0
