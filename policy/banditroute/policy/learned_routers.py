"""Baseline routers that fit the training outcomes (see routers.py for the interface).

* ``best-single``: mean outcomes per model on TRAIN (one model per preference).
* ``knn``, ``full-info``: the FULL train outcome table (every model's answer
  to every prompt): the offline, supervised routers of the literature
  (RouterDC / RouteLLM style). More information than a bandit learner gets.
* ``linucb``: bandit feedback only (the reward of the arm it pulled), with a
  linear model.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn
from banditroute.core.data import RoutingData
from banditroute.policy.reward import normalised_cost
from banditroute.policy.routers import FullInfoConfig, KnnConfig, LinUCBConfig, argmax_cheapest, check_rows, model_columns


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
        return self.models[int(argmax_cheapest(r[None, :], self.mean_cost[None, :])[0])]

    def choose(self, embeddings: np.ndarray, w_cost: float, test: RoutingData) -> np.ndarray:
        check_rows(embeddings, test, self.name)
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
        check_rows(embeddings, test, self.name)
        if not self.models:
            raise RuntimeError(f"{self.name}: call fit() first")
        cols = model_columns(self.models, test, self.name)
        score, cost = self.predict(embeddings)
        value = (1.0 - w_cost) * score - w_cost * cost
        return cols[argmax_cheapest(value, cost)]


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
        check_rows(embeddings, test, self.name)
        if not self.models:
            raise RuntimeError("linucb: call fit() first")
        cols = model_columns(self.models, test, self.name)
        phi = self.features(self._project(embeddings), w_cost)
        return cols[np.argmax(phi @ self.theta.T, axis=1)]
