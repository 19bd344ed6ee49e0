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
* ``policy``: a trained ``RoutingPolicy`` checkpoint (bandit feedback only).
* ``oracle``: the TEST outcomes; an upper bound, not a router.

NaN scores count as 0 everywhere (``RoutingData.scores_filled``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Literal, Protocol, Sequence, runtime_checkable

import numpy as np
import torch
from torch import nn

from banditroute.core.data import DataError, RoutingData
from banditroute.policy.reward import normalised_cost, reward_matrix

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


def _argmax_cheapest(values: np.ndarray, costs: np.ndarray, atol: float = 1e-12) -> np.ndarray:
    """Row-wise argmax of ``values``; ties go to the cheaper model (then the lower index)."""
    best = values.max(axis=1, keepdims=True)
    tied = values >= best - atol
    return np.where(tied, costs, np.inf).argmin(axis=1).astype(np.int64)


def _check_rows(embeddings: np.ndarray, test: RoutingData, who: str) -> None:
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
        _check_rows(embeddings, test, self.name)
        return self._rng.integers(0, test.n_models, size=len(test)).astype(np.int64)


class SingleModelRouter:
    """Always the same model (one router per model of the pool: 'single:<model>')."""

    def __init__(self, model: str) -> None:
        self.model = model
        self.name = f"single:{model}"

    def fit(self, train: RoutingData, train_embeddings: np.ndarray, tau: float, seed: int) -> None:
        pass

    def choose(self, embeddings: np.ndarray, w_cost: float, test: RoutingData) -> np.ndarray:
        _check_rows(embeddings, test, self.name)
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
        _check_rows(embeddings, test, self.name)
        if self.tau is None:
            raise RuntimeError("oracle: call fit() first (it needs tau)")
        r = reward_matrix(test.scores_filled, test.costs, w_cost, self.tau)
        return _argmax_cheapest(r, test.costs)


# --- routers that learn from the full outcome table -----------------------------


class BestSingleRouter:
    """For each preference, the one model with the best mean reward on TRAIN."""

    name = "best-single"

    def __init__(self) -> None:
        self.models: tuple[str, ...] = ()

    def fit(self, train: RoutingData, train_embeddings: np.ndarray, tau: float, seed: int) -> None:
        self.models = train.models
        self.mean_score = train.scores_filled.mean(axis=0).astype(np.float64)
        self.mean_norm_cost = normalised_cost(train.costs, tau).mean(axis=0)
        self.mean_cost = train.costs.mean(axis=0)

    def best_model(self, w_cost: float) -> str:
        """Name of the model with the best mean train reward at ``w_cost`` (ties: cheaper)."""
        # The reward is linear in (score, normalised cost), so its mean is the reward of the means.
        r = (1.0 - w_cost) * self.mean_score - w_cost * self.mean_norm_cost
        return self.models[int(_argmax_cheapest(r[None, :], self.mean_cost[None, :])[0])]

    def choose(self, embeddings: np.ndarray, w_cost: float, test: RoutingData) -> np.ndarray:
        _check_rows(embeddings, test, self.name)
        model_columns(self.models, test, self.name)
        return np.full(len(test), test.model_index(self.best_model(w_cost)), dtype=np.int64)


class _PredictedOutcomeRouter:
    """Shared by knn and full-info: predict every model's score and normalised cost, take the argmax."""

    name = ""
    models: tuple[str, ...] = ()

    def predict(self, embeddings: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(predicted score, predicted min(cost/tau, 1)), each (n, k) in train.models order."""
        raise NotImplementedError

    def choose(self, embeddings: np.ndarray, w_cost: float, test: RoutingData) -> np.ndarray:
        _check_rows(embeddings, test, self.name)
        if not self.models:
            raise RuntimeError(f"{self.name}: call fit() first")
        cols = model_columns(self.models, test, self.name)
        score, cost = self.predict(embeddings)
        value = (1.0 - w_cost) * score - w_cost * cost
        return cols[_argmax_cheapest(value, cost)]


def _unit_rows(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    norm = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(norm, 1e-12)


class KnnRouter(_PredictedOutcomeRouter):
    """Average score and normalised cost of each model over the k most similar training prompts."""

    name = "knn"

    def __init__(self, config: KnnConfig | None = None) -> None:
        self.config = config or KnnConfig()

    def fit(self, train: RoutingData, train_embeddings: np.ndarray, tau: float, seed: int) -> None:
        self.config.validate()
        if len(train_embeddings) != len(train):
            raise ValueError(f"knn: {len(train_embeddings)} embeddings for {len(train)} prompts")
        self.models = train.models
        self._keys = _unit_rows(train_embeddings)
        self._score = train.scores_filled.astype(np.float32)
        self._cost = normalised_cost(train.costs, tau).astype(np.float32)

    def predict(self, embeddings: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        queries = _unit_rows(embeddings)
        k = min(self.config.k, len(self._keys))
        score = np.empty((len(queries), len(self.models)), dtype=np.float64)
        cost = np.empty_like(score)
        for start in range(0, len(queries), self.config.batch_size):
            sims = queries[start : start + self.config.batch_size] @ self._keys.T
            nearest = np.argpartition(-sims, k - 1, axis=1)[:, :k]
            score[start : start + len(sims)] = self._score[nearest].mean(axis=1)
            cost[start : start + len(sims)] = self._cost[nearest].mean(axis=1)
        return score, cost


class _OutcomeMLP(nn.Module):
    def __init__(self, in_dim: int, n_models: int, config: FullInfoConfig):
        super().__init__()
        layers: list[nn.Module] = []
        width = in_dim
        for _ in range(config.n_hidden_layers):
            layers += [nn.Linear(width, config.hidden_dim), nn.ReLU(), nn.Dropout(config.dropout)]
            width = config.hidden_dim
        self.trunk = nn.Sequential(*layers)
        self.head = nn.Linear(width, 2 * n_models)  # score logits, then cost logits

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.trunk(x))


class FullInfoRouter(_PredictedOutcomeRouter):
    """Supervised MLP on the FULL outcome table: predicts every model's score and normalised cost.

    The offline router of the literature (RouterDC / RouteLLM style); it sees
    every model's answer to every training prompt, which a bandit learner never
    does, so it is the reference the bandit policy should approach.
    """

    name = "full-info"

    def __init__(self, config: FullInfoConfig | None = None) -> None:
        self.config = config or FullInfoConfig()
        self.history: list[dict[str, float]] = []

    def fit(self, train: RoutingData, train_embeddings: np.ndarray, tau: float, seed: int) -> None:
        cfg = self.config
        cfg.validate()
        if len(train_embeddings) != len(train):
            raise ValueError(f"full-info: {len(train_embeddings)} embeddings for {len(train)} prompts")
        self.models = train.models
        k = train.n_models
        torch.manual_seed(seed)
        rng = np.random.default_rng(seed)
        x = torch.as_tensor(np.asarray(train_embeddings, dtype=np.float32))
        y = torch.as_tensor(
            np.concatenate([train.scores_filled, normalised_cost(train.costs, tau)], axis=1).astype(np.float32)
        )
        order = rng.permutation(len(train))
        n_val = int(round(cfg.validation_fraction * len(train))) if len(train) >= 20 else 0
        val_rows, fit_rows = order[:n_val], order[n_val:]
        self._net = _OutcomeMLP(x.shape[1], k, cfg)
        optimiser = torch.optim.Adam(self._net.parameters(), lr=cfg.learning_rate, weight_decay=cfg.weight_decay)

        def loss_fn(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
            if cfg.loss == "bce":
                return nn.functional.binary_cross_entropy_with_logits(logits, target)
            return nn.functional.mse_loss(torch.sigmoid(logits), target)

        from banditroute.policy.train import torch_threads

        with torch_threads(cfg.cpu_threads):
            self._train(x, y, fit_rows, val_rows, optimiser, loss_fn, rng)
        self._net.eval()

    def _train(self, x, y, fit_rows, val_rows, optimiser, loss_fn, rng: np.random.Generator) -> None:
        """Mini-batch Adam with early stopping on the held-out rows; keeps the best weights."""
        cfg = self.config
        n_val = len(val_rows)
        best_loss, best_state, since_best = float("inf"), None, 0
        self.history = []
        for epoch in range(cfg.epochs):
            self._net.train()
            perm = fit_rows[rng.permutation(len(fit_rows))]
            for start in range(0, len(perm), cfg.batch_size):
                rows = torch.as_tensor(perm[start : start + cfg.batch_size])
                loss = loss_fn(self._net(x[rows]), y[rows])
                optimiser.zero_grad(set_to_none=True)
                loss.backward()
                optimiser.step()
            if n_val == 0:
                continue
            self._net.eval()
            with torch.no_grad():
                val = float(loss_fn(self._net(x[val_rows]), y[val_rows]))
            self.history.append({"epoch": epoch, "val_loss": val})
            if val < best_loss - 1e-6:
                best_loss, since_best = val, 0
                best_state = {n: t.detach().clone() for n, t in self._net.state_dict().items()}
            else:
                since_best += 1
                if since_best >= cfg.patience:
                    break
        if best_state is not None:
            self._net.load_state_dict(best_state)

    @torch.no_grad()
    def predict(self, embeddings: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        out = torch.sigmoid(self._net(torch.as_tensor(np.asarray(embeddings, dtype=np.float32)))).double().numpy()
        k = len(self.models)
        return out[:, :k], out[:, k:]


# --- bandit-feedback baseline -------------------------------------------------------


class LinUCBRouter:
    """Classic disjoint LinUCB (Li et al., 2010) trained online under bandit feedback.

    Context of a (prompt, preference) pair: phi = [z, w*z, 1, w], where z is the
    (PCA-reduced) prompt embedding. The reward (1-w)*score - w*cost is linear in
    w, so with these features a per-arm linear model can represent it whenever
    score and cost are linear in z. One ridge regression per model (arm); for
    each training prompt (w_cost ~ U[0, 1]) the arm with the highest upper
    confidence bound is pulled and ONLY its reward is observed (through the
    same ``BanditEnvironment`` the policy trains against); A^-1 is updated by
    Sherman-Morrison. At test time the router exploits the mean (alpha = 0).
    """

    name = "linucb"

    def __init__(self, config: LinUCBConfig | None = None) -> None:
        self.config = config or LinUCBConfig()
        self.models: tuple[str, ...] = ()
        self.training_reward: list[float] = []

    def _project(self, embeddings: np.ndarray) -> np.ndarray:
        z = np.asarray(embeddings, dtype=np.float64) - self._mean
        if self._components is not None:
            z = z @ self._components
        return z * self._scale

    @staticmethod
    def features(z: np.ndarray, w_cost: np.ndarray | float) -> np.ndarray:
        """phi = [z, w*z, 1, w] per row."""
        w = np.broadcast_to(np.asarray(w_cost, dtype=np.float64).reshape(-1, 1), (len(z), 1))
        return np.concatenate([z, w * z, np.ones_like(w), w], axis=1)

    def fit(self, train: RoutingData, train_embeddings: np.ndarray, tau: float, seed: int) -> None:
        from banditroute.policy.train import BanditEnvironment

        cfg = self.config
        cfg.validate()
        if len(train_embeddings) != len(train):
            raise ValueError(f"linucb: {len(train_embeddings)} embeddings for {len(train)} prompts")
        self.models = train.models
        rng = np.random.default_rng(seed)
        x = np.asarray(train_embeddings, dtype=np.float64)
        self._mean = x.mean(axis=0)
        centred = x - self._mean
        self._components = None
        if 0 < cfg.pca_dim < x.shape[1]:
            _, _, vt = np.linalg.svd(centred, full_matrices=False)
            self._components = vt[: cfg.pca_dim].T
            centred = centred @ self._components
        self._scale = 1.0
        if cfg.whiten:
            self._scale = 1.0 / np.maximum(centred.std(axis=0), 1e-8)
        z = centred * self._scale

        k, d = train.n_models, 2 * z.shape[1] + 2
        a_inv = np.repeat(np.eye(d)[None] / cfg.ridge, k, axis=0)
        b = np.zeros((k, d))
        theta = np.zeros((k, d))
        env = BanditEnvironment(train, tau)  # reveals the pulled arm's reward only
        one = np.ones(1)
        self.training_reward = []
        for _ in range(cfg.passes):
            order = rng.permutation(len(train))
            ws = rng.uniform(0.0, 1.0, size=len(train))
            phis = self.features(z[order], ws)
            jitter = rng.uniform(0.0, 1e-9, size=(len(train), k))  # random tie-breaks
            total = 0.0
            for t, row in enumerate(order):
                phi = phis[t]
                a_phi = a_inv @ phi  # (k, d)
                ucb = theta @ phi + cfg.alpha * np.sqrt(np.maximum(a_phi @ phi, 0.0)) + jitter[t]
                arm = int(np.argmax(ucb))
                r = float(env.pull(np.array([row]), np.array([arm]), ws[t : t + 1], one)[0])
                v = a_phi[arm]
                a_inv[arm] -= np.outer(v, v) / (1.0 + phi @ v)
                b[arm] += r * phi
                theta[arm] = a_inv[arm] @ b[arm]
                total += r
            self.training_reward.append(total / len(train))
        self.theta = theta
        self.pulls = sum(len(p["row"]) for p in env.pulls)

    def choose(self, embeddings: np.ndarray, w_cost: float, test: RoutingData) -> np.ndarray:
        _check_rows(embeddings, test, self.name)
        if not self.models:
            raise RuntimeError("linucb: call fit() first")
        cols = model_columns(self.models, test, self.name)
        phi = self.features(self._project(embeddings), w_cost)
        return cols[np.argmax(phi @ self.theta.T, axis=1)]


# --- the trained policy ---------------------------------------------------------------


class PolicyRouter:
    """A trained ``RoutingPolicy`` (BaRP checkpoint) with greedy decisions.

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
        _check_rows(embeddings, test, self.name)
        cols = model_columns(self.models, test, self.name)
        if embeddings.shape[1] != self.policy.meta.embed_dim:
            raise ValueError(
                f"policy: embeddings of width {embeddings.shape[1]}, the policy expects {self.policy.meta.embed_dim}"
            )
        decisions = self.policy.decide(np.asarray(embeddings, dtype=np.float32), float(w_cost), explore=False)
        return cols[decisions.actions]


# --- registry -----------------------------------------------------------------------

ROUTERS: dict[str, type] = {
    "random": RandomRouter,
    "single": SingleModelRouter,  # expands to one 'single:<model>' per model of the pool
    "best-single": BestSingleRouter,
    "oracle": OracleRouter,
    "full-info": FullInfoRouter,
    "knn": KnnRouter,
    "linucb": LinUCBRouter,
    "policy": PolicyRouter,
}
"""Router classes by name. 'single' is a factory family: 'single:<model>' builds one."""

DEFAULT_ROUTERS = ("random", "single", "best-single", "knn", "full-info", "linucb", "policy", "oracle")
"""What ``banditroute eval`` compares when ``--routers`` is not given."""

UPPER_BOUNDS = frozenset({"oracle"})
"""Names of entries that read the test outcomes: upper bounds, not routers."""


def make_router(name: str, config: RoutersConfig | None = None, policy=None):
    """One router by name ('single:<model>' for a fixed model)."""
    config = config or RoutersConfig()
    if name.startswith("single:"):
        model = name[len("single:") :]
        if not model:
            raise ValueError("router 'single:<model>' needs a model name")
        return SingleModelRouter(model)
    if name == "single":
        raise ValueError("'single' is a family: use make_routers(['single'], models) or 'single:<model>'")
    if name not in ROUTERS:
        raise ValueError(f"unknown router {name!r}; known: {sorted(ROUTERS)} and 'single:<model>'")
    if name == "full-info":
        return FullInfoRouter(config.full_info)
    if name == "knn":
        return KnnRouter(config.knn)
    if name == "linucb":
        return LinUCBRouter(config.linucb)
    if name == "policy":
        return PolicyRouter(policy, config.policy)
    return ROUTERS[name]()


def make_routers(
    names: Sequence[str], models: Sequence[str], config: RoutersConfig | None = None, policy=None
) -> list:
    """Routers for ``names``; 'single' expands to 'single:<model>' for every model of ``models``."""
    routers = []
    for name in names:
        if name == "single":
            routers.extend(single_model_routers(models))
        else:
            routers.append(make_router(name, config, policy))
    seen: set[str] = set()
    for r in routers:
        if r.name in seen:
            raise ValueError(f"router {r.name!r} listed twice")
        seen.add(r.name)
    return routers
