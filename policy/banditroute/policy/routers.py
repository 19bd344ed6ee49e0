"""Baseline routers to compare the bandit-trained policy against.

Every router has the same narrow interface (``Router``): ``fit`` on the
training prompts (their embeddings, the outcome table and the cost scale
``tau`` of the policy being evaluated) and ``choose`` one model per test
prompt for a given preference ``w_cost``. ``choose`` returns indices into
``test.models``; routers that learned on ``train.models`` map by name, so
the two files may list the models in different orders (but must hold the
same pool).

What each router may look at differs, and that is the point of comparing
them:

* ``random``, ``single:<model>``: nothing.
* ``best-single``: mean outcomes per model on TRAIN (one model per preference).
* ``knn``, ``full-info``: the FULL train outcome table (every model's
  answer to every prompt): the offline, supervised routers of the
  literature (RouterDC / RouteLLM style). More information than a bandit
  learner ever gets.
* ``linucb``: bandit feedback only (the reward of the arm it pulled), like
  the policy, but with a linear model.
* ``policy``: a trained policy checkpoint (bandit feedback only).
* ``oracle``: the TEST outcomes; an upper bound, not a router.

NaN scores count as 0 everywhere (``RoutingData.scores_filled``).

This module holds the interface, the configs, the routers that learn
nothing and the trained policy; learned_routers.py the ones that fit the
training outcomes; baselines.py the registry by name.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Literal, Protocol, Sequence, runtime_checkable

import numpy as np

from banditroute.core.data import DataError, RoutingData
from banditroute.policy.reward import reward_matrix

# --- interface ----------------------------------------------------------------


@runtime_checkable
class Router(Protocol):
    """Picks one model per prompt for a quality/cost preference."""

    name: str
    """Name in reports (e.g. 'knn', 'single:gpt-4-1106-preview')."""

    def fit(self, train: RoutingData, train_embeddings: np.ndarray, tau: float, seed: int) -> None:
        """Learn from the training prompts (what a router may use is its own business)."""

    def choose(self, embeddings: np.ndarray, w_cost: float, test: RoutingData) -> np.ndarray:
        """Chosen model index into ``test.models`` per row of ``embeddings``, shape (n,), int64."""


def model_columns(models: Sequence[str], data: RoutingData, who: str) -> np.ndarray:
    """Index into ``data.models`` of each of ``models``; the two pools must be the same set."""
    missing = [m for m in models if m not in data.models]
    extra = [m for m in data.models if m not in models]
    if missing or extra:
        raise DataError(
            f"{who}: the model pools differ: known to the router but not in the data: {missing}; "
            f"in the data but unknown to the router: {extra}"
        )
    return np.asarray([data.models.index(m) for m in models], dtype=np.int64)


def argmax_cheapest(values: np.ndarray, costs: np.ndarray, atol: float = 1e-12) -> np.ndarray:
    """Row-wise argmax of ``values``; ties go to the cheaper model (then the lower index)."""
    best = values.max(axis=1, keepdims=True)
    tied = values >= best - atol
    return np.where(tied, costs, np.inf).argmin(axis=1).astype(np.int64)


def check_rows(embeddings: np.ndarray, test: RoutingData, who: str) -> None:
    if len(embeddings) != len(test):
        raise ValueError(f"{who}: {len(embeddings)} embeddings for {len(test)} prompts")


# --- configs --------------------------------------------------------------------


@dataclass
class FullInfoConfig:
    """Supervised router trained on every model's outcome (full information)."""

    hidden_dim: int = 256
    """Width of the MLP's hidden layers."""
    n_hidden_layers: int = 2
    """Hidden layers of the MLP."""
    dropout: float = 0.1
    """Dropout after each hidden layer (training only)."""
    loss: Literal["bce", "mse"] = "bce"
    """'bce': sigmoid outputs with binary cross-entropy (soft targets allowed); 'mse': sigmoid outputs with squared error."""
    epochs: int = 200
    """Maximum passes over the training prompts."""
    batch_size: int = 128
    """Prompts per gradient step."""
    learning_rate: float = 1e-3
    """Adam learning rate."""
    weight_decay: float = 1e-4
    """Adam weight decay."""
    validation_fraction: float = 0.1
    """Share of the training prompts held out for early stopping (0 = train on all, no early stopping)."""
    patience: int = 20
    """Epochs without a better validation loss before stopping; the best weights are kept."""
    cpu_threads: int = 1
    """Torch threads while fitting on CPU (the MLP is small: one thread is fastest on a shared machine)."""

    def validate(self) -> None:
        if self.hidden_dim < 1 or self.n_hidden_layers < 1 or self.epochs < 1 or self.batch_size < 1:
            raise ValueError("full_info: hidden_dim, n_hidden_layers, epochs and batch_size must be >= 1")
        if not 0 <= self.validation_fraction < 1 or not 0 <= self.dropout < 1:
            raise ValueError("full_info: validation_fraction and dropout must be in [0, 1)")
        if self.learning_rate <= 0:
            raise ValueError("full_info.learning_rate must be > 0")


@dataclass
class KnnConfig:
    """k-nearest-neighbour router (full information on the neighbours)."""

    k: int = 10
    """Number of nearest training prompts (cosine similarity) whose outcomes are averaged."""
    batch_size: int = 1024
    """Test prompts per similarity block (bounds memory: batch_size x n_train floats)."""

    def validate(self) -> None:
        if self.k < 1 or self.batch_size < 1:
            raise ValueError("knn: k and batch_size must be >= 1")


@dataclass
class LinUCBConfig:
    """Disjoint LinUCB, trained online under bandit feedback over the training prompts."""

    alpha: float = 1.0
    """Width of the upper confidence bound during training (at test time the mean is used: alpha = 0)."""
    passes: int = 3
    """Passes over the training prompts; each pass draws a fresh order and fresh w_cost ~ U[0, 1]."""
    ridge: float = 1.0
    """Ridge prior: A starts as ridge * I for every arm."""
    pca_dim: int = 16
    """Embedding dimensions kept by a PCA fitted on the training embeddings (0 = keep all); 16 did best on inner validation splits of both data sets."""
    whiten: bool = True
    """Scale the PCA components to unit variance on the training prompts."""

    def validate(self) -> None:
        if self.alpha < 0 or self.ridge <= 0:
            raise ValueError("linucb: alpha must be >= 0 and ridge > 0")
        if self.passes < 1 or self.pca_dim < 0:
            raise ValueError("linucb: passes must be >= 1 and pca_dim >= 0")


@dataclass
class PolicyRouterConfig:
    """A trained BaRP checkpoint used as a router (greedy decisions)."""

    checkpoint: str | None = None
    """Folder of the checkpoint (policy.pt + meta.json); ignored when a loaded policy is passed in."""
    device: str = "cpu"
    """Torch device to run the policy on."""


@dataclass
class RoutersConfig:
    """Settings of every router that has any."""

    full_info: FullInfoConfig = field(default_factory=FullInfoConfig)
    """The supervised full-information router ('full-info')."""
    knn: KnnConfig = field(default_factory=KnnConfig)
    """The k-nearest-neighbour router ('knn')."""
    linucb: LinUCBConfig = field(default_factory=LinUCBConfig)
    """The LinUCB contextual bandit ('linucb')."""
    policy: PolicyRouterConfig = field(default_factory=PolicyRouterConfig)
    """The BaRP checkpoint ('policy')."""

    def validate(self) -> None:
        self.full_info.validate()
        self.knn.validate()
        self.linucb.validate()


# --- routers that learn nothing -----------------------------------------------


class RandomRouter:
    """Uniformly random model per prompt (seeded)."""

    name = "random"

    def __init__(self) -> None:
        self._rng = np.random.default_rng(0)

    def fit(self, train: RoutingData, train_embeddings: np.ndarray, tau: float, seed: int) -> None:
        self._rng = np.random.default_rng(seed)

    def choose(self, embeddings: np.ndarray, w_cost: float, test: RoutingData) -> np.ndarray:
        check_rows(embeddings, test, self.name)
        return self._rng.integers(0, test.n_models, size=len(test)).astype(np.int64)


class SingleModelRouter:
    """Always the same model (one router per model of the pool: 'single:<model>')."""

    def __init__(self, model: str) -> None:
        self.model = model
        self.name = f"single:{model}"

    def fit(self, train: RoutingData, train_embeddings: np.ndarray, tau: float, seed: int) -> None:
        pass

    def choose(self, embeddings: np.ndarray, w_cost: float, test: RoutingData) -> np.ndarray:
        check_rows(embeddings, test, self.name)
        return np.full(len(test), test.model_index(self.model), dtype=np.int64)


def single_model_routers(models: Sequence[str]) -> list[SingleModelRouter]:
    """The factory of 'single:<model>' routers: one per model of the pool."""
    return [SingleModelRouter(m) for m in models]


class OracleRouter:
    """UPPER BOUND, not a router: per prompt the best reward, read from the TEST outcomes.

    Ties (e.g. several models answer correctly at w_cost = 0) go to the cheapest.
    """

    name = "oracle"

    def __init__(self) -> None:
        self.tau: float | None = None

    def fit(self, train: RoutingData, train_embeddings: np.ndarray, tau: float, seed: int) -> None:
        self.tau = float(tau)

    def choose(self, embeddings: np.ndarray, w_cost: float, test: RoutingData) -> np.ndarray:
        check_rows(embeddings, test, self.name)
        if self.tau is None:
            raise RuntimeError("oracle: call fit() first (it needs tau)")
        r = reward_matrix(test.scores_filled, test.costs, w_cost, self.tau)
        return argmax_cheapest(r, test.costs)


# --- the trained policy ---------------------------------------------------------------


class PolicyRouter:
    """A trained policy checkpoint (any kind, ``policy.checkpoint.load_policy``) with greedy decisions.

    The policy must know exactly the data's pool of models (any order); its
    actions are mapped by model name to ``test.models``.
    """

    name = "policy"

    def __init__(self, policy=None, config: PolicyRouterConfig | None = None) -> None:
        from banditroute.policy.checkpoint import load_policy

        self.config = config or PolicyRouterConfig()
        if policy is None:
            if not self.config.checkpoint:
                raise ValueError("policy router: pass a loaded policy or set policy.checkpoint")
            policy = load_policy(os.path.expanduser(self.config.checkpoint), device=self.config.device)
        self.policy = policy

    @property
    def models(self) -> tuple[str, ...]:
        return tuple(self.policy.models)

    def fit(self, train: RoutingData, train_embeddings: np.ndarray, tau: float, seed: int) -> None:
        """Nothing to learn (already trained); checks the pool and the embedding width."""
        model_columns(self.models, train, self.name)
        if train_embeddings.ndim != 2 or train_embeddings.shape[1] != self.policy.meta.embed_dim:
            raise ValueError(
                f"policy: embeddings of width {train_embeddings.shape[-1]}, the policy expects {self.policy.meta.embed_dim}"
            )

    def choose(self, embeddings: np.ndarray, w_cost: float, test: RoutingData) -> np.ndarray:
        check_rows(embeddings, test, self.name)
        cols = model_columns(self.models, test, self.name)
        if embeddings.shape[1] != self.policy.meta.embed_dim:
            raise ValueError(
                f"policy: embeddings of width {embeddings.shape[1]}, the policy expects {self.policy.meta.embed_dim}"
            )
        decisions = self.policy.decide(np.asarray(embeddings, dtype=np.float32), float(w_cost), explore=False)
        return cols[decisions.actions]
