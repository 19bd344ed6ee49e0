"""Offline training of the value policy (kind ``value``) under bandit feedback only.

The same simulation as BaRP's (``policy.train``): a ``BanditEnvironment``
reveals, per (prompt, preference, chosen model), that one model's score and
cost; decisions are ``ValuePolicy.logits`` through ``policy.decide.decide``
within the exploration bounds, exactly as a Router replica decides, and every
pull is logged with its propensity.

What differs is the update. The policy predicts each model's score and
normalised cost, so a pull is a supervised example for the chosen model's
outputs, whatever the preference and whatever policy chose it. Every pull
goes to a replay buffer, and after each decision batch the trainer takes
``updates_per_batch`` Adam steps on minibatches drawn from all pulls so far:
binary cross-entropy of the chosen model's score and cost heads against what
it returned. Each pull carries one Poisson(1) weight per bootstrap head (the
online bootstrap), so the heads fit different resamplings of the evidence
and their spread is the uncertainty Thompson sampling explores on.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
from banditroute.core.config import to_dict
from banditroute.core.data import RoutingData
from banditroute.core.progress import progress_bar
from banditroute.policy.decide import decide
from banditroute.policy.encoders import EncoderConfig
from banditroute.policy.exploration import (
    DEFAULT_EXPLORATION_CEILING,
    DEFAULT_EXPLORATION_FLOOR,
    ExplorationBounds,
    check_bounds,
)
from banditroute.policy.reward import (
    DEFAULT_TAU_QUANTILE,
    fit_tau,
    normalised_cost,
    sample_w_cost,
)
from banditroute.policy.train import BanditEnvironment, torch_threads
from banditroute.policy.value_policy import (
    ValueNetworkConfig,
    ValuePolicy,
    ValuePolicyMeta,
)


@dataclass
class ValueTrainConfig:
    """Bandit training of the value policy."""

    epochs: int = 6
    """Passes over the training prompts; each pass draws fresh preferences and actions (held-out reward
    peaked near 10k pulls on RouterBench's 1.8k training prompts, then slowly declined as replay overfits)."""
    max_pulls: int = 0
    """Stop after this many pulls (decisions with feedback), however many epochs that takes; 0 = epochs x prompts."""
    batch_size: int = 32
    """Prompts decided with the same weights before the next update (a replica between weight pushes)."""
    updates_per_batch: int = 2
    """Adam steps after each decision batch, each on a minibatch replayed from all pulls so far."""
    replay_batch_size: int = 256
    """Pulls per replayed minibatch (fewer while the buffer is smaller)."""
    learning_rate: float = 1e-3
    """Adam learning rate."""
    weight_decay: float = 1e-3
    """Adam weight decay (1e-3 did best on an inner RouterBench split; 1e-2 collapses to one model)."""
    grad_clip: float = 1.0
    """Max global gradient norm."""
    cost_loss_weight: float = 1.0
    """Weight of the cost heads' loss against the score heads'."""
    bootstrap: bool = True
    """Weight each pull by Poisson(1) per head (online bootstrap); False: every head sees every pull once."""
    tau_quantile: float = DEFAULT_TAU_QUANTILE
    """tau = this quantile of per-call cost in the training data."""
    seed: int = 0
    """Seeds preferences, actions, bootstrap weights and initial weights."""
    exploration_floor: float = DEFAULT_EXPLORATION_FLOOR
    """Explore-mode floor on each candidate's sampling probability (as the Router replicas apply it)."""
    exploration_ceiling: float = DEFAULT_EXPLORATION_CEILING
    """Explore-mode ceiling on each candidate's sampling probability (as the Router replicas apply it)."""
    network: ValueNetworkConfig = field(default_factory=ValueNetworkConfig)
    """Network shape and decision temperature."""

    def validate(self) -> None:
        if self.epochs < 1 or self.batch_size < 1 or self.replay_batch_size < 1 or self.updates_per_batch < 0:
            raise ValueError("train.epochs, train.batch_size and train.replay_batch_size must be >= 1, "
                             "train.updates_per_batch >= 0")
        if self.max_pulls < 0:
            raise ValueError("train.max_pulls must be >= 0")
        if self.learning_rate <= 0 or self.cost_loss_weight < 0:
            raise ValueError("train.learning_rate must be > 0 and train.cost_loss_weight >= 0")
        if not 0 < self.tau_quantile <= 1:
            raise ValueError("train.tau_quantile must be in (0, 1]")
        check_bounds(self.exploration_floor, self.exploration_ceiling, "train.")
        self.network.validate()

    @property
    def exploration_bounds(self) -> ExplorationBounds:
        return ExplorationBounds(self.exploration_floor, self.exploration_ceiling)


def value_loss(
    score_logits: torch.Tensor,
    cost_logits: torch.Tensor,
    actions: torch.Tensor,
    score: torch.Tensor,
    cost: torch.Tensor,
    head_weights: torch.Tensor,
    cost_loss_weight: float = 1.0,
) -> torch.Tensor:
    """Bootstrap-weighted BCE of the CHOSEN model's score and cost heads against its observed outcome.

    ``score_logits``/``cost_logits`` (B, H, K) from ``ValueNetwork``; ``actions``
    (B,) the chosen models; ``score``/``cost`` (B,) targets in [0, 1]
    (normalised cost); ``head_weights`` (B, H) each pull's weight per head.
    Other models' outputs get no gradient: their outcome was not seen.
    """
    index = actions.long().reshape(-1, 1, 1).expand(-1, score_logits.shape[1], 1)
    s_logit = score_logits.gather(2, index).squeeze(2)
    c_logit = cost_logits.gather(2, index).squeeze(2)
    bce = torch.nn.functional.binary_cross_entropy_with_logits
    per_head = bce(s_logit, score.reshape(-1, 1).expand_as(s_logit), reduction="none")
    per_head = per_head + cost_loss_weight * bce(c_logit, cost.reshape(-1, 1).expand_as(c_logit), reduction="none")
    return (head_weights * per_head).sum() / head_weights.sum().clamp(min=1.0)


class ReplayBuffer:
    """Every pull seen so far: prompt row, chosen model, observed score and normalised cost, per-head weights.

    Columns grow by doubling, so adding a batch and sampling stay O(batch) however long training runs.
    """

    def __init__(self, n_heads: int):
        self.n_heads = n_heads
        self._size = 0
        self._columns: tuple[np.ndarray, ...] = (
            np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float32), np.zeros(0, np.float32),
            np.zeros((0, n_heads), np.float32),
        )

    def __len__(self) -> int:
        return self._size

    def add(self, rows: np.ndarray, actions: np.ndarray, score: np.ndarray, cost: np.ndarray, weights: np.ndarray) -> None:
        new = (rows, actions, score, cost, weights)
        end = self._size + len(rows)
        if end > len(self._columns[0]):
            capacity = max(end, 2 * len(self._columns[0]), 1024)
            self._columns = tuple(np.resize(col, (capacity, *col.shape[1:])) for col in self._columns)
        for col, values in zip(self._columns, new):
            col[self._size : end] = values
        self._size = end

    def sample(self, rng: np.random.Generator, size: int) -> tuple[np.ndarray, ...]:
        """(rows, actions, score, cost, weights) of ``size`` pulls drawn uniformly with replacement (all when fewer)."""
        pick = np.arange(self._size) if self._size <= size else rng.integers(0, self._size, size=size)
        return tuple(col[pick] for col in self._columns)


def train_value_policy(
    data: RoutingData,
    embeddings: np.ndarray,
    config: ValueTrainConfig,
    encoder_config: EncoderConfig,
    encoder_id: str,
    device: str = "cpu",
    cpu_threads: int | None = 1,
    after_update: Callable[[int, ValuePolicy], None] | None = None,
) -> tuple[ValuePolicy, BanditEnvironment, list[dict[str, float]]]:
    """Train a value policy on bandit feedback; returns (policy, environment with its pull log, per-epoch metrics).

    ``after_update(pulls, policy)``, when given, is called after every update
    with the pulls so far (learning curves read the policy there).
    """
    config.validate()
    if len(data) != len(embeddings):
        raise ValueError(f"{len(data)} prompts but {len(embeddings)} embeddings")
    torch.manual_seed(config.seed)
    rng = np.random.default_rng(config.seed)
    generator = torch.Generator(device="cpu").manual_seed(config.seed)
    tau = fit_tau(data.costs, config.tau_quantile)
    meta = ValuePolicyMeta(models=list(data.models), tau=tau, embed_dim=int(embeddings.shape[1]),
                           encoder=encoder_config, encoder_id=encoder_id, network=config.network)
    policy = ValuePolicy(meta, device=device)
    env = BanditEnvironment(data, tau)
    emb_all = torch.as_tensor(embeddings, dtype=torch.float32, device=device)
    buffer = ReplayBuffer(config.network.n_heads)
    optimiser = torch.optim.Adam(policy.network.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay)
    n, budget = len(data), config.max_pulls or config.epochs * len(data)
    history: list[dict[str, float]] = []
    pulls = 0
    with torch_threads(cpu_threads, device), progress_bar(total=budget, desc="training value policy (bandit feedback)") as bar:
        for epoch in range(-(-budget // n)):
            order = rng.permutation(n)[: budget - pulls]
            epoch_reward = 0.0
            for start in range(0, len(order), config.batch_size):
                rows = order[start : start + config.batch_size]
                w = sample_w_cost(rng, len(rows))
                decided = decide(policy.logits(emb_all[rows], w).cpu(), True, config.exploration_bounds, generator)
                actions = decided.actions.numpy()
                r = env.pull(rows, actions, w, decided.propensities.numpy())
                seen = env.pulls[-1]
                weights = bootstrap_weights(rng, len(rows), buffer.n_heads, config.bootstrap)
                buffer.add(rows, actions, seen["score"], normalised_cost(seen["cost"], tau), weights)
                _update(policy, optimiser, buffer, emb_all, config, rng)
                if after_update is not None:
                    after_update(pulls + start + len(rows), policy)
                epoch_reward += float(r.sum())
                bar.update(len(rows))
            pulls += len(order)
            history.append({"epoch": epoch, "mean_reward": epoch_reward / max(1, len(order)), "pulls": pulls})
            if hasattr(bar, "set_postfix_str"):
                bar.set_postfix_str(f"reward {history[-1]['mean_reward']:.3f}")
    policy.network.eval()
    meta.training = {
        "config": to_dict(config),
        "data_fingerprint": data.fingerprint(),
        "n_prompts": n,
        "final_mean_reward": history[-1]["mean_reward"],
        "pulls": pulls,
    }
    return policy, env, history


def bootstrap_weights(rng: np.random.Generator, n: int, n_heads: int, enabled: bool = True) -> np.ndarray:
    """(n, n_heads) per-pull, per-head weights: Poisson(1) draws (online bootstrap), or ones when not ``enabled``."""
    if not enabled:
        return np.ones((n, n_heads), np.float32)
    return rng.poisson(1.0, size=(n, n_heads)).astype(np.float32)


def value_gradient_step(
    network: torch.nn.Module,
    optimiser: torch.optim.Optimizer,
    embeddings: torch.Tensor,
    actions: torch.Tensor,
    score: torch.Tensor,
    cost: torch.Tensor,
    head_weights: torch.Tensor,
    cost_loss_weight: float = 1.0,
    grad_clip: float = 1.0,
) -> float:
    """One Adam step of :func:`value_loss` on a minibatch of pulls; returns the loss before the step.

    The one update rule of the value policy: the offline trainer and the
    online learner (``banditroute.learner.value_learner``) both call it.
    """
    network.train()
    score_logits, cost_logits = network(embeddings)
    loss = value_loss(score_logits, cost_logits, actions, score, cost, head_weights, cost_loss_weight)
    optimiser.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(network.parameters(), grad_clip)
    optimiser.step()
    network.eval()
    return float(loss.detach())


def _update(policy: ValuePolicy, optimiser: torch.optim.Optimizer, buffer: ReplayBuffer, emb_all: torch.Tensor,
            config: ValueTrainConfig, rng: np.random.Generator) -> None:
    """``updates_per_batch`` Adam steps on minibatches replayed from ``buffer``."""
    device = emb_all.device
    for _ in range(config.updates_per_batch):
        rows, actions, score, cost, weights = buffer.sample(rng, config.replay_batch_size)
        value_gradient_step(
            policy.network, optimiser, emb_all[torch.as_tensor(rows, device=device)],
            torch.as_tensor(actions, device=device), torch.as_tensor(score, device=device),
            torch.as_tensor(cost, device=device), torch.as_tensor(weights, device=device),
            config.cost_loss_weight, config.grad_clip,
        )
