"""Small, fast fixtures for tests and demos of the serving side (no Ray, no model weights).

- ``synthetic_routing_data``: RouterBench-layout data with logged responses,
  so the replay upstream can answer.
- ``hashing_policy``: a BaRP policy on the 'hashing' encoder (random
  weights, or trained for a few epochs under bandit feedback).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from banditroute.core.data import RoutingData
from banditroute.policy.barp import BarpPolicy, NetworkConfig, PolicyMeta
from banditroute.policy.encoders import EncoderConfig, HashingEncoder

DEFAULT_MODELS = ("big-model", "mid-model", "small-model")
_TOPICS = ("algebra", "biology", "chemistry", "python code", "history", "poetry", "geometry", "physics")


def synthetic_routing_data(n: int = 64, models: tuple[str, ...] = DEFAULT_MODELS, seed: int = 0) -> RoutingData:
    """``n`` prompts x ``models`` with scores, costs and a logged answer per (prompt, model)."""
    rng = np.random.default_rng(seed)
    prompts = [f"Question {i} about {_TOPICS[i % len(_TOPICS)]}: what is {i} squared plus {i % 7}?" for i in range(n)]
    k = len(models)
    strength = np.linspace(0.9, 0.4, k)
    scores = (rng.uniform(size=(n, k)) < strength).astype(np.float32)
    costs = np.outer(rng.uniform(0.5, 1.5, size=n), np.geomspace(0.01, 0.0001, k))
    responses = np.empty((n, k), dtype=object)
    for i in range(n):
        for j, m in enumerate(models):
            responses[i, j] = f"[{m}] The answer to question {i} is {i * i + i % 7}. " + "Reasoning step. " * (1 + i % 5)
    return RoutingData(
        sample_ids=np.array([f"s{i}" for i in range(n)]),
        prompts=prompts,
        eval_names=np.array([_TOPICS[i % len(_TOPICS)] for i in range(n)]),
        models=tuple(models),
        scores=scores,
        costs=costs,
        responses=responses,
        source="synthetic",
    )


def hashing_policy(
    models: tuple[str, ...] | list[str] = DEFAULT_MODELS,
    dim: int = 64,
    seed: int = 0,
    policy_version: int = 0,
    hidden_dim: int = 32,
) -> BarpPolicy:
    """A small random-weight policy on the hashing encoder (deterministic for a seed)."""
    import torch

    enc = EncoderConfig(name="hashing", dim=dim)
    torch.manual_seed(seed)
    meta = PolicyMeta(
        models=list(models),
        tau=0.01,
        embed_dim=dim,
        encoder=enc,
        encoder_id=HashingEncoder(enc).encoder_id,
        network=NetworkConfig(hidden_dim=hidden_dim, n_hidden_layers=1, preference_dim=8),
        policy_version=policy_version,
    )
    return BarpPolicy(meta)


def trained_hashing_policy(data: RoutingData, epochs: int = 3, dim: int = 64, seed: int = 0) -> BarpPolicy:
    """A hashing-encoder policy trained briefly with policy.train.train_bandit_policy."""
    from banditroute.policy.train import TrainConfig, train_bandit_policy

    enc = EncoderConfig(name="hashing", dim=dim)
    encoder = HashingEncoder(enc)
    cfg = TrainConfig(epochs=epochs, batch_size=32, seed=seed, network=NetworkConfig(hidden_dim=32, n_hidden_layers=1, preference_dim=8))
    policy, _, _ = train_bandit_policy(data, encoder.encode(data.prompts), cfg, enc, encoder.encoder_id)
    return policy


def write_fixture(folder: str | Path, n: int = 64, seed: int = 0) -> tuple[Path, Path]:
    """(policy checkpoint folder, routing data parquet) under ``folder``."""
    folder = Path(folder)
    data = synthetic_routing_data(n, seed=seed)
    data_path = data.save(folder / "routing.parquet")
    policy_path = hashing_policy(data.models, seed=seed).save(folder / "policy")
    return policy_path, data_path
