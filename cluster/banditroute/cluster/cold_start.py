"""The starting policy of a local run: a warm start from a checkpoint, or a cold start fitted to the data.

A cold start is a random-weight policy of ``kind`` (``barp``: REINFORCE's
policy network; ``value``: per-model score and cost heads)
over the data's model pool, with tau (the cost scale of the reward) fitted
from the data's per-call costs. A warm start loads a checkpoint of any kind
the online learner trains (``learner.config.ONLINE_KINDS``). `banditroute up`
and the benches that simulate its traffic start from here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from banditroute.core.storage import StorageConfig
from banditroute.learner.config import ONLINE_KINDS
from banditroute.policy.barp import NetworkConfig
from banditroute.policy.value_policy import ValueNetworkConfig

COLD_START_ENCODERS = ("minilm", "static", "hashing")
COLD_START_KINDS = ("barp", "value")
"""Kinds a cold start builds from random weights (an identity policy needs IRT identities: warm start it)."""


@dataclass
class ColdStartConfig:
    """A random-weight policy for the data's model pool (used when no checkpoint seeds the run)."""

    kind: str = "barp"
    """Policy kind, and so the online learner: 'barp' (REINFORCE) or 'value' (per-model score/cost regression,
    Thompson exploration); `banditroute up` sets its own default (cluster/up.py UP_DEFAULTS, picked by measurement)."""
    encoder: str = "minilm"
    """Prompt encoder: 'minilm' (all-MiniLM-L6-v2), 'static' (model2vec distilled from it, ~130x faster on CPU) or 'hashing' (smoke runs)."""
    network: NetworkConfig = field(default_factory=NetworkConfig)
    """Network shape of a 'barp' cold start."""
    value_network: ValueNetworkConfig = field(default_factory=ValueNetworkConfig)
    """Network shape, bootstrap heads and decision temperature of a 'value' cold start."""
    tau_quantile: float = 0.95
    """tau = this quantile of the data's per-call costs."""

    def validate(self) -> None:
        if self.kind not in COLD_START_KINDS:
            raise ValueError(f"up.cold_start.kind: must be one of {list(COLD_START_KINDS)}, got {self.kind!r}")
        self.value_network.validate()
        if self.encoder not in COLD_START_ENCODERS:
            raise ValueError(f"up.cold_start.encoder: must be one of {list(COLD_START_ENCODERS)}, got {self.encoder!r}")
        if not 0 < self.tau_quantile <= 1:
            raise ValueError("up.cold_start.tau_quantile: must be in (0, 1]")


def starting_policy(data, cold_start: ColdStartConfig | None = None, seed: int = 0,
                    warm_start: str | None = None, storage: StorageConfig | None = None,
                    field_name: str = "online.initial_policy") -> Any:
    """The policy at ``warm_start`` (a folder or storage URI; a kind the learner trains), else a cold start for ``data``'s pool.

    A warm start must share at least one model with the data (errors name
    ``field_name``); ``seed`` seeds a cold start's random weights.
    """
    if warm_start is not None:
        from banditroute.policy.checkpoint import load_policy_at

        policy = load_policy_at(warm_start, storage, field=field_name, kinds=ONLINE_KINDS)
        if not any(m in data.models for m in policy.models):
            raise ValueError(f"{field_name}: none of the policy's models {policy.models} are in the data {list(data.models)}")
        return policy

    import torch

    from banditroute.policy.barp import BarpPolicy, PolicyMeta
    from banditroute.policy.encoders import EncoderConfig, make_encoder
    from banditroute.policy.reward import fit_tau
    from banditroute.policy.value_policy import ValuePolicy, ValuePolicyMeta

    cold_start = cold_start or ColdStartConfig()
    cold_start.validate()
    enc_cfg = EncoderConfig(name=cold_start.encoder)
    encoder = make_encoder(enc_cfg)
    torch.manual_seed(seed)
    common = dict(
        models=list(data.models),
        tau=fit_tau(data.costs, cold_start.tau_quantile),
        embed_dim=int(encoder.dim),
        encoder=enc_cfg,
        encoder_id=encoder.encoder_id,
        training={"cold_start": True, "seed": seed, "data_fingerprint": data.fingerprint()},
    )
    if cold_start.kind == "value":
        return ValuePolicy(ValuePolicyMeta(network=cold_start.value_network, **common))
    return BarpPolicy(PolicyMeta(network=cold_start.network, **common))
