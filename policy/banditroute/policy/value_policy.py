"""The value-decomposed routing policy (kind ``value``): predict each model's score and cost, apply the dial late.

prompt embedding (frozen encoder) -> shared MLP trunk -> per model and per bootstrap head:
    score in [0, 1]                (the model's answer quality)
    normalised cost in [0, 1]      (min(cost / tau, 1), the reward's cost penalty)

Neither prediction depends on the preference, so the trunk does not see it:
the dial is applied at decision time, r = (1 - w_cost) * score - w_cost * cost
(``policy.reward``), and every pull teaches every preference. Training
(``policy.value_train``) fits only the chosen model's outputs to what it
returned: a regression, so logged pulls can be replayed without importance
weights.

Exploration is Thompson sampling over bootstrap heads: each head h is
trained on its own resampling of the pulls, and the explore distribution is
P(model) = mean over heads of softmax(r_h / temperature) over the candidates
(temperature 0: each head votes for its argmax). That distribution enters
``policy.decide.decide`` as its log, ``logits = log P``, so serving, OPE and
the offline trainers need nothing new: explore rows sample from P projected
into the exploration floor and ceiling and log THAT probability as the
propensity; greedy rows take argmax P, the model the ensemble most often
ranks first.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from banditroute.policy.base import CHECKPOINT_FORMAT, PolicyBase
from banditroute.policy.encoders import EncoderConfig
from torch import nn

KIND = "value"
MIN_PROBABILITY = 1e-12
"""Floor of P(model) before the log: keeps a candidate's logit finite, so ``decide`` still
counts it as a candidate (the exploration floor then lifts it to its share)."""


@dataclass
class ValueNetworkConfig:
    """Shape of the value network and its decision rule."""

    hidden_dim: int = 256
    """Width of the shared trunk's hidden layers."""
    n_hidden_layers: int = 2
    """Hidden layers of the shared trunk."""
    n_heads: int = 8
    """Bootstrap heads per output; their disagreement is the uncertainty Thompson sampling explores on."""
    temperature: float = 0.01
    """Softness of each head's vote: P = mean_h softmax(r_h / temperature); 0 = each head votes for its argmax."""

    def validate(self) -> None:
        if self.hidden_dim < 1 or self.n_hidden_layers < 1 or self.n_heads < 1:
            raise ValueError("network: hidden_dim, n_hidden_layers and n_heads must be >= 1")
        if not (self.temperature >= 0 and np.isfinite(self.temperature)):
            raise ValueError("network.temperature must be a finite number >= 0")


class ValueNetwork(nn.Module):
    """Per-head, per-model score and normalised-cost logits (B, H, K) from prompt embeddings."""

    def __init__(self, embed_dim: int, n_models: int, config: ValueNetworkConfig):
        super().__init__()
        config.validate()
        self.embed_dim, self.n_models, self.n_heads = embed_dim, n_models, config.n_heads
        layers: list[nn.Module] = []
        width = embed_dim
        for _ in range(config.n_hidden_layers):
            layers += [nn.Linear(width, config.hidden_dim), nn.ReLU()]
            width = config.hidden_dim
        self.trunk = nn.Sequential(*layers)
        self.score_head = nn.Linear(width, config.n_heads * n_models)
        self.cost_head = nn.Linear(width, config.n_heads * n_models)

    def forward(self, embeddings: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(score logits, cost logits), each (B, H, K); sigmoid gives the predictions in [0, 1]."""
        h = self.trunk(embeddings.float())
        shape = (h.shape[0], self.n_heads, self.n_models)
        return self.score_head(h).reshape(shape), self.cost_head(h).reshape(shape)


def head_rewards(score: torch.Tensor, cost: torch.Tensor, w_cost: torch.Tensor) -> torch.Tensor:
    """(1 - w) * score - w * cost for every head and model: (B, H, K) from (B, H, K) predictions and (B,) w_cost."""
    w = w_cost.reshape(-1, 1, 1).to(score.dtype)
    return (1.0 - w) * score - w * cost


def thompson_probabilities(rewards: torch.Tensor, mask: torch.Tensor, temperature: float) -> torch.Tensor:
    """P(model is chosen by a uniformly random head), (B, K), 0 outside ``mask`` (B, K bool).

    Each head's vote is softmax(r_h / temperature) over the candidates, or
    one-hot on its argmax when ``temperature`` is 0.
    """
    m = mask.unsqueeze(1)
    masked = rewards.masked_fill(~m, float("-inf"))
    if temperature > 0:
        votes = torch.softmax(masked / temperature, dim=-1)
    else:
        votes = torch.nn.functional.one_hot(masked.argmax(dim=-1), rewards.shape[-1]).to(rewards.dtype)
    votes = torch.where(m, votes, torch.zeros_like(votes))  # rows with no candidate: NaN softmax -> 0
    return votes.mean(dim=1)


def decision_logits(probabilities: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """log P for the candidates (P floored at MIN_PROBABILITY), -inf for the rest: softmax gives P back."""
    logp = torch.log(probabilities.clamp(min=MIN_PROBABILITY))
    return logp.masked_fill(~mask, float("-inf"))


@dataclass
class ValuePolicyMeta:
    """Everything besides the weights that a value checkpoint must carry."""

    models: list[str]
    """Model names; output k of every head is models[k]."""
    tau: float
    """Cost normalisation: cost penalty = min(cost / tau, 1) (USD); the cost heads predict it."""
    embed_dim: int
    """Width of the prompt embedding the network expects."""
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    """The frozen encoder the policy was trained on (must match at serve time)."""
    encoder_id: str = ""
    """The encoder's vector id (cache key); checked when serving."""
    network: ValueNetworkConfig = field(default_factory=ValueNetworkConfig)
    """Network shape and decision temperature."""
    policy_version: int = 0
    """Version of these weights: from the snapshot or checkpoint they came in (bumped by every learner update)."""
    created_at: float = 0.0
    """Unix time the checkpoint was written."""
    training: dict[str, Any] = field(default_factory=dict)
    """Free-form provenance: training config, data fingerprint, metrics."""
    format: int = CHECKPOINT_FORMAT
    """Checkpoint format number."""
    kind: str = KIND
    """Policy family of the checkpoint ('value' here); ``banditroute.policy.checkpoint.POLICY_KINDS`` maps it to the class."""


class ValuePolicy(PolicyBase):
    """A value network plus what gives its outputs meaning (model names, tau, encoder, version)."""

    kind = KIND
    meta_class = ValuePolicyMeta

    def __init__(self, meta: ValuePolicyMeta, network: ValueNetwork | None = None, device: str | torch.device = "cpu"):
        self.meta = meta
        self.device = torch.device(device)
        self.network = (network or ValueNetwork(meta.embed_dim, len(meta.models), meta.network)).to(self.device)

    def predictions(self, embeddings: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """Predicted (score, normalised cost), each (B, H, K) in [0, 1], with gradients (training mode is the caller's)."""
        emb = torch.as_tensor(embeddings, device=self.device, dtype=torch.float32)
        score_logits, cost_logits = self.network(emb)
        return torch.sigmoid(score_logits), torch.sigmoid(cost_logits)

    def expected_rewards(self, embeddings: Any, w_cost: Any) -> torch.Tensor:
        """The heads' mean predicted reward (B, K) under ``w_cost`` (diagnostics and comparisons)."""
        with torch.inference_mode():
            self.network.eval()
            score, cost = self.predictions(embeddings)
            return head_rewards(score, cost, self._w(w_cost, score.shape[0])).mean(dim=1)

    @torch.inference_mode()
    def logits(self, embeddings, w_cost, mask=None) -> torch.Tensor:
        """log of the Thompson distribution over the candidates (-inf for the rest); see the module docstring."""
        self.network.eval()
        score, cost = self.predictions(embeddings)
        rewards = head_rewards(score, cost, self._w(w_cost, score.shape[0]))
        if mask is None:
            m = torch.ones(rewards.shape[0], rewards.shape[2], dtype=torch.bool, device=self.device)
        else:
            m = torch.as_tensor(np.asarray(mask) if not torch.is_tensor(mask) else mask, device=self.device).bool()
        return decision_logits(thompson_probabilities(rewards, m, self.meta.network.temperature), m)

    def _w(self, w_cost: Any, batch: int) -> torch.Tensor:
        w = torch.as_tensor(w_cost, device=self.device, dtype=torch.float32).reshape(-1)
        return w.expand(batch) if w.numel() == 1 and batch != 1 else w
