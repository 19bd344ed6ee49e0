"""BaRP: a preference-conditioned routing policy over a fixed pool of models.

prompt embedding (frozen encoder) ─┐
                                    ├─> decision head -> one logit per model
preference w -> small MLP ─────────┘

The same network also has a value head V(x, w) used only as the REINFORCE
baseline. Decisions (explore: sample within the exploration bounds and
report the probability; greedy: argmax) are ``policy.decide.decide`` on the
masked logits; a candidate mask lets a request restrict the pool. State,
snapshots and checkpoints are ``policy.base.PolicyBase``'s.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from banditroute.policy.base import CHECKPOINT_FORMAT, PolicyBase
from banditroute.policy.encoders import EncoderConfig

KIND = "barp"


@dataclass
class NetworkConfig:
    """Shape of the BaRP network."""

    hidden_dim: int = 256
    """Width of the decision head's hidden layers."""
    n_hidden_layers: int = 2
    """Hidden layers in the decision head."""
    preference_dim: int = 32
    """Output width of the preference encoder MLP."""
    dropout: float = 0.0
    """Dropout in the decision head (training only)."""

    def validate(self) -> None:
        if self.hidden_dim < 1 or self.n_hidden_layers < 1 or self.preference_dim < 1:
            raise ValueError("network: hidden_dim, n_hidden_layers and preference_dim must be >= 1")
        if not 0 <= self.dropout < 1:
            raise ValueError("network.dropout must be in [0, 1)")


def preference_features(w_cost: torch.Tensor) -> torch.Tensor:
    """(w_quality, w_cost) as the two input features of the preference encoder."""
    w = w_cost.reshape(-1, 1).float()
    return torch.cat([1.0 - w, w], dim=1)


class BarpNetwork(nn.Module):
    """Logits over ``n_models`` from (prompt embedding, w_cost)."""

    def __init__(self, embed_dim: int, n_models: int, config: NetworkConfig):
        super().__init__()
        self.embed_dim, self.n_models = embed_dim, n_models
        self.preference_encoder = nn.Sequential(
            nn.Linear(2, config.preference_dim), nn.ReLU(), nn.Linear(config.preference_dim, config.preference_dim), nn.ReLU()
        )
        layers: list[nn.Module] = []
        width = embed_dim + config.preference_dim
        for _ in range(config.n_hidden_layers):
            layers += [nn.Linear(width, config.hidden_dim), nn.ReLU(), nn.Dropout(config.dropout)]
            width = config.hidden_dim
        self.trunk = nn.Sequential(*layers)
        self.decision_head = nn.Linear(width, n_models)
        self.value_head = nn.Linear(width, 1)

    def features(self, embeddings: torch.Tensor, w_cost: torch.Tensor) -> torch.Tensor:
        pref = self.preference_encoder(preference_features(w_cost))
        return self.trunk(torch.cat([embeddings.float(), pref], dim=1))

    def forward(
        self, embeddings: torch.Tensor, w_cost: torch.Tensor, candidate_mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(masked logits (B, K), value (B,)); masked-out models get -inf."""
        h = self.features(embeddings, w_cost)
        logits = self.decision_head(h)
        if candidate_mask is not None:
            logits = logits.masked_fill(~candidate_mask.bool(), float("-inf"))
        return logits, self.value_head(h).squeeze(1)


@dataclass
class PolicyMeta:
    """Everything besides the weights that a checkpoint must carry."""

    models: list[str]
    """Model names; logit k is models[k]."""
    tau: float
    """Cost normalisation: cost penalty = min(cost / tau, 1) (USD)."""
    embed_dim: int
    """Width of the prompt embedding the network expects."""
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    """The frozen encoder the policy was trained on (must match at serve time)."""
    encoder_id: str = ""
    """The encoder's vector id (cache key); checked when serving."""
    network: NetworkConfig = field(default_factory=NetworkConfig)
    """Network shape."""
    policy_version: int = 0
    """Version of these weights: from the snapshot or checkpoint they came in (bumped by every learner update)."""
    created_at: float = 0.0
    """Unix time the checkpoint was written."""
    training: dict[str, Any] = field(default_factory=dict)
    """Free-form provenance: training config, data fingerprint, metrics."""
    format: int = CHECKPOINT_FORMAT
    """Checkpoint format number."""
    kind: str = KIND
    """Policy family of the checkpoint ('barp' here); ``banditroute.policy.checkpoint.POLICY_KINDS`` maps it to the class."""


class BarpPolicy(PolicyBase):
    """A BaRP network plus what gives its outputs meaning (model names, tau, encoder, version)."""

    kind = KIND
    meta_class = PolicyMeta

    def __init__(self, meta: PolicyMeta, network: BarpNetwork | None = None, device: str | torch.device = "cpu"):
        self.meta = meta
        self.device = torch.device(device)
        self.network = (network or BarpNetwork(meta.embed_dim, len(meta.models), meta.network)).to(self.device)

    @torch.inference_mode()
    def logits(self, embeddings, w_cost, mask=None) -> torch.Tensor:
        self.network.eval()
        emb = torch.as_tensor(embeddings, device=self.device, dtype=torch.float32)
        w = torch.as_tensor(w_cost, device=self.device, dtype=torch.float32).reshape(-1)
        if w.numel() == 1 and emb.shape[0] != 1:
            w = w.expand(emb.shape[0])
        m = None if mask is None else torch.as_tensor(mask, device=self.device, dtype=torch.bool)
        return self.network(emb, w, m)[0]
