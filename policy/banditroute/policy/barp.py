"""BaRP: a preference-conditioned routing policy over a fixed pool of models.

prompt embedding (frozen encoder) ─┐
                                    ├─> decision head -> one logit per model
preference w -> small MLP ─────────┘

The same network also has a value head V(x, w) used only as the REINFORCE
baseline. Exploration (sample a model and report its probability) and
inference (greedy) are separate entry points; both accept a candidate mask
so a request can restrict the pool.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from banditroute.core.config import from_dict
from banditroute.policy.encoders import EncoderConfig

CHECKPOINT_FORMAT = 1
WEIGHTS_FILE = "policy.pt"
META_FILE = "meta.json"


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
class Decisions:
    """Routing decisions for a batch: chosen model index and its propensity."""

    actions: np.ndarray
    """Chosen model index per row, shape (B,)."""
    propensities: np.ndarray
    """Probability with which each chosen model was picked in this mode, shape (B,)."""
    probabilities: np.ndarray
    """The policy's softmax over all models (0 for non-candidates), shape (B, K)."""


def sample_actions(logits: torch.Tensor, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Exploration: a ~ softmax(logits); returns (actions, their probabilities, all probabilities)."""
    probs = torch.softmax(logits.float(), dim=-1)
    actions = torch.multinomial(probs, 1, generator=generator).squeeze(1)
    return actions, probs.gather(1, actions.unsqueeze(1)).squeeze(1), probs


def greedy_actions(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Inference: argmax; the propensity of a deterministic choice is 1."""
    probs = torch.softmax(logits.float(), dim=-1)
    actions = probs.argmax(dim=-1)
    return actions, torch.ones_like(actions, dtype=probs.dtype), probs


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
    """Monotonic version of these weights (bumped by every learner update)."""
    created_at: float = 0.0
    """Unix time the checkpoint was written."""
    training: dict[str, Any] = field(default_factory=dict)
    """Free-form provenance: training config, data fingerprint, metrics."""
    format: int = CHECKPOINT_FORMAT
    """Checkpoint format number."""
    kind: str = "barp"
    """Policy family of the checkpoint ('barp' here); ``banditroute.policy.checkpoint.load_policy`` dispatches on it."""


class RoutingPolicy:
    """A BaRP network plus what gives its outputs meaning (model names, tau, encoder, version)."""

    def __init__(self, meta: PolicyMeta, network: BarpNetwork | None = None, device: str | torch.device = "cpu"):
        self.meta = meta
        self.device = torch.device(device)
        self.network = (network or BarpNetwork(meta.embed_dim, len(meta.models), meta.network)).to(self.device)

    @property
    def models(self) -> list[str]:
        return self.meta.models

    @property
    def tau(self) -> float:
        return self.meta.tau

    @property
    def policy_version(self) -> int:
        return self.meta.policy_version

    def candidate_mask(self, candidates: Sequence[Sequence[str]] | None, batch: int) -> np.ndarray:
        """Boolean (B, K) mask from per-row lists of model names (None = every model)."""
        mask = np.ones((batch, len(self.models)), dtype=bool)
        if candidates is None:
            return mask
        index = {m: k for k, m in enumerate(self.models)}
        for row, names in enumerate(candidates):
            if names is None:
                continue
            mask[row] = False
            for name in names:
                if name not in index:
                    raise KeyError(name)
                mask[row, index[name]] = True
        return mask

    @torch.inference_mode()
    def logits(self, embeddings, w_cost, mask=None) -> torch.Tensor:
        self.network.eval()
        emb = torch.as_tensor(embeddings, device=self.device, dtype=torch.float32)
        w = torch.as_tensor(w_cost, device=self.device, dtype=torch.float32).reshape(-1)
        if w.numel() == 1 and emb.shape[0] != 1:
            w = w.expand(emb.shape[0])
        m = None if mask is None else torch.as_tensor(mask, device=self.device, dtype=torch.bool)
        return self.network(emb, w, m)[0]

    def decide(self, embeddings, w_cost, mask=None, explore: bool = False, generator: torch.Generator | None = None) -> Decisions:
        """Route a batch: sample (explore) or argmax (greedy); one host copy at the end."""
        logits = self.logits(embeddings, w_cost, mask)
        actions, props, probs = sample_actions(logits, generator) if explore else greedy_actions(logits)
        stacked = torch.cat([actions.unsqueeze(1).float(), props.unsqueeze(1), probs], dim=1).cpu().numpy()
        return Decisions(stacked[:, 0].astype(np.int64), stacked[:, 1], stacked[:, 2:])

    # --- weights snapshots (learner -> parameter server -> replicas) ------

    def state(self) -> dict[str, Any]:
        """Picklable snapshot: numpy weights + meta (no torch tensors, no device)."""
        return {
            "weights": {k: v.detach().cpu().numpy() for k, v in self.network.state_dict().items()},
            "meta": meta_to_dict(self.meta),
        }

    @classmethod
    def from_state(cls, state: dict[str, Any], device: str | torch.device = "cpu") -> "RoutingPolicy":
        policy = cls(meta_from_dict(state["meta"]), device=device)
        policy.load_weights(state["weights"], state["meta"].get("policy_version", 0))
        return policy

    def load_weights(self, weights: dict[str, Any], policy_version: int) -> None:
        """Swap in new weights in place (same architecture) and take their version."""
        tensors = {k: torch.as_tensor(np.asarray(v)) for k, v in weights.items()}
        self.network.load_state_dict(tensors)
        self.meta.policy_version = int(policy_version)

    # --- checkpoints ------------------------------------------------------

    def save(self, directory: str | os.PathLike) -> Path:
        """Write ``directory/policy.pt`` and ``directory/meta.json``; returns the directory."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.meta.created_at = time.time()
        tmp = directory / (WEIGHTS_FILE + ".tmp")
        torch.save({k: v.detach().cpu() for k, v in self.network.state_dict().items()}, tmp)
        os.replace(tmp, directory / WEIGHTS_FILE)
        (directory / META_FILE).write_text(json.dumps(meta_to_dict(self.meta), indent=2))
        return directory

    @classmethod
    def load(cls, directory: str | os.PathLike, device: str | torch.device = "cpu") -> "RoutingPolicy":
        directory = Path(directory)
        if not (directory / META_FILE).exists() or not (directory / WEIGHTS_FILE).exists():
            raise FileNotFoundError(f"{directory}: not a policy checkpoint (needs {META_FILE} and {WEIGHTS_FILE})")
        meta = meta_from_dict(json.loads((directory / META_FILE).read_text()))
        if meta.format != CHECKPOINT_FORMAT:
            raise ValueError(f"{directory}: checkpoint format {meta.format}, this version reads {CHECKPOINT_FORMAT}")
        policy = cls(meta, device=device)
        weights = torch.load(directory / WEIGHTS_FILE, map_location="cpu", weights_only=True)
        policy.network.load_state_dict(weights)
        return policy


def meta_to_dict(meta: PolicyMeta) -> dict[str, Any]:
    return asdict(meta)


def meta_from_dict(data: dict[str, Any]) -> PolicyMeta:
    return from_dict(PolicyMeta, data)
