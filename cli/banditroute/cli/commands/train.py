"""`banditroute train`: train a routing policy (BaRP, identity or value) on logged outcomes, bandit feedback only."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from banditroute.core.config import load_config, parse_set_args, to_dict
from banditroute.core.data import load_routing_data, resolve_data_path
from banditroute.policy.encoders import DEFAULT_CACHE_DIR, EncoderConfig, embed_prompts
from banditroute.policy.train import TrainConfig, train_bandit_policy
from banditroute.policy.value_train import ValueTrainConfig, train_value_policy

HELP = "train the routing policy under bandit feedback; prints the checkpoint path last"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", help="routing data (Parquet, RouterBench layout); default: ../shared/data/routerbench/train.parquet")
    parser.add_argument("--out", required=True, help="output folder; the checkpoint goes to OUT/policy")
    parser.add_argument("--seed", type=int, help="random seed (overrides the config)")
    parser.add_argument("--config", help="YAML file with `train:` and `encoder:` sections")
    parser.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config key, e.g. --set train.epochs=50")
    parser.add_argument("--cache-dir", default=DEFAULT_CACHE_DIR, help="embedding cache folder ('none' disables it)")
    parser.add_argument("--device", default="auto", help="torch device for the encoder: auto, cpu, cuda")
    parser.add_argument("--kind", choices=["barp", "identity", "value"], default="barp",
                        help="barp: one output per model of the data (default); identity: IRT model identities, "
                             "any candidate set, new models onboarded without retraining (banditroute onboard); "
                             "value: per-model predicted score and cost, Thompson exploration, replayed pulls")


def load_train_configs(args: argparse.Namespace, train_cls: type = TrainConfig) -> tuple[TrainConfig, EncoderConfig]:
    """The `train:` and `encoder:` configs from --config YAML, --set overrides, --device and --seed."""
    train_cfg, enc_cfg = load_train_and_encoder_configs(args.config, args.set, args.device, train_cls)
    if args.seed is not None:
        train_cfg.seed = args.seed
    return train_cfg, enc_cfg


def load_train_and_encoder_configs(config_path: str | None, set_pairs: list[str] | None, device: str, train_cls: type):
    """(train_cls, EncoderConfig) from an optional YAML file with `train:`/`encoder:` sections
    and `train.*` / `encoder.*` overrides; shared by every command that trains a policy."""
    import yaml

    raw = {}
    if config_path:
        raw = yaml.safe_load(Path(config_path).read_text()) or {}
        if not isinstance(raw, dict):
            raise ValueError(f"{config_path}: the top level must be a mapping")
    overrides = parse_set_args(set_pairs)
    unknown = [k for k in overrides if not k.startswith(("train.", "encoder."))]
    if unknown:
        raise ValueError(f"--set: unknown section in {unknown}; use train.* or encoder.*")
    train_over = {k[len("train."):]: v for k, v in overrides.items() if k.startswith("train.")}
    enc_over = {k[len("encoder."):]: v for k, v in overrides.items() if k.startswith("encoder.")}
    train_cfg = load_config(train_cls, overrides={**_flatten(raw.get("train", {})), **train_over})
    enc_cfg = load_config(EncoderConfig, overrides={**_flatten(raw.get("encoder", {})), **enc_over, "device": device})
    return train_cfg, enc_cfg


def _flatten(section: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in (section or {}).items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def run(args: argparse.Namespace) -> int:
    if args.kind == "identity":
        from banditroute.policy.identity_train import IdentityTrainConfig, train_identity_policy

        train_cls, train_fn = IdentityTrainConfig, train_identity_policy
    elif args.kind == "value":
        train_cls, train_fn = ValueTrainConfig, train_value_policy
    else:
        train_cls, train_fn = TrainConfig, train_bandit_policy
    train_cfg, enc_cfg = load_train_configs(args, train_cls)
    data = load_routing_data(resolve_data_path(args.data))
    cache_dir = None if args.cache_dir == "none" else args.cache_dir
    embeddings, encoder_id = embed_prompts(data.prompts, enc_cfg, cache_dir)
    policy, env, history = train_fn(data, embeddings, train_cfg, enc_cfg, encoder_id)
    out = Path(args.out)
    ckpt = policy.save(out / "policy")
    env.log_frame().to_parquet(out / "training_decisions.parquet", index=False)
    (out / "training_history.json").write_text(json.dumps({"history": history, "config": to_dict(train_cfg)}, indent=2))
    print(f"trained on {len(data)} prompts x {data.n_models} models; tau={policy.tau:.6g} USD; "
          f"final running reward {history[-1]['mean_reward']:.4f}")
    print(ckpt)
    return 0
