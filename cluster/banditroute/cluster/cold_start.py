"""The starting policy of a local run: a warm start from a BaRP checkpoint, or a cold start fitted to the data.

A cold start is a random-weight BaRP policy over the data's model pool, with
tau (the cost scale of the reward) fitted from the data's per-call costs.
`banditroute up` and the benches that simulate its traffic start from here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from banditroute.core.storage import StorageConfig
from banditroute.policy.barp import NetworkConfig

COLD_START_ENCODERS = ("minilm", "static", "hashing")


@dataclass
class ColdStartConfig:
    """A random-weight policy for the data's model pool (used when no checkpoint seeds the run)."""

    encoder: str = "minilm"
    """Prompt encoder: 'minilm' (all-MiniLM-L6-v2), 'static' (model2vec distilled from it, ~130x faster on CPU) or 'hashing' (smoke runs)."""
    network: NetworkConfig = field(default_factory=NetworkConfig)
    """Network shape."""
    tau_quantile: float = 0.95
    """tau = this quantile of the data's per-call costs."""

    def validate(self) -> None:
        if self.encoder not in COLD_START_ENCODERS:
            raise ValueError(f"up.cold_start.encoder: must be one of {list(COLD_START_ENCODERS)}, got {self.encoder!r}")
        if not 0 < self.tau_quantile <= 1:
            raise ValueError("up.cold_start.tau_quantile: must be in (0, 1]")


def starting_policy(data, cold_start: ColdStartConfig | None = None, seed: int = 0,
                    warm_start: str | None = None, storage: StorageConfig | None = None,
                    field_name: str = "online.initial_policy") -> Any:
    """The BaRP policy at ``warm_start`` (a folder or storage URI), else a cold start for ``data``'s pool.

    A warm start must share at least one model with the data (errors name
    ``field_name``); ``seed`` seeds a cold start's random weights.
    """
    if warm_start is not None:
        from banditroute.policy.checkpoint import load_barp_policy

        policy = load_barp_policy(warm_start, storage, field=field_name)
        if not any(m in data.models for m in policy.models):
            raise ValueError(f"{field_name}: none of the policy's models {policy.models} are in the data {list(data.models)}")
        return policy

    import torch

    from banditroute.policy.barp import BarpPolicy, PolicyMeta
    from banditroute.policy.encoders import EncoderConfig, make_encoder
    from banditroute.policy.reward import fit_tau

    cold_start = cold_start or ColdStartConfig()
    enc_cfg = EncoderConfig(name=cold_start.encoder)
    encoder = make_encoder(enc_cfg)
    torch.manual_seed(seed)
    meta = PolicyMeta(
        models=list(data.models),
        tau=fit_tau(data.costs, cold_start.tau_quantile),
        embed_dim=int(encoder.dim),
        encoder=enc_cfg,
        encoder_id=encoder.encoder_id,
        network=cold_start.network,
        training={"cold_start": True, "seed": seed, "data_fingerprint": data.fingerprint()},
    )
    return BarpPolicy(meta)
