"""The reward of routing a prompt to a model under a quality/cost preference.

BaRP's reward: r = (1 - w_cost) * score - w_cost * min(cost / tau, 1).

``w_cost`` in [0, 1] is the dial (w_quality = 1 - w_cost, so the preference
lives on the simplex). ``tau`` turns USD into a [0, 1] penalty: a call that
costs tau or more gets the full penalty. It is fitted once on training data
(the 95th percentile of per-call cost) and saved with the policy, so the same
dial means the same trade-off at serve time even as traffic changes.
"""

from __future__ import annotations

import numpy as np

DEFAULT_TAU_QUANTILE = 0.95
DEFAULT_PREFERENCE_GRID = (0.0, 0.1, 0.2, 0.3, 0.5, 0.7, 0.9)


class PreferenceError(ValueError):
    """A preference is not a valid point of the quality/cost simplex."""


def fit_tau(costs: np.ndarray, quantile: float = DEFAULT_TAU_QUANTILE) -> float:
    """Cost scale: the ``quantile`` of all per-call costs (positive, finite)."""
    flat = np.asarray(costs, dtype=np.float64).ravel()
    flat = flat[np.isfinite(flat)]
    if flat.size == 0:
        raise ValueError("cannot fit tau: no finite costs")
    tau = float(np.quantile(flat, quantile))
    if tau <= 0:
        positive = flat[flat > 0]
        tau = float(positive.max()) if positive.size else 1.0
    return tau


def normalised_cost(cost: np.ndarray | float, tau: float) -> np.ndarray:
    """min(cost / tau, 1): the cost penalty in [0, 1]."""
    return np.minimum(np.asarray(cost, dtype=np.float64) / tau, 1.0)


def reward(score, cost, w_cost, tau: float) -> np.ndarray:
    """r = (1 - w_cost) * score - w_cost * min(cost / tau, 1), broadcast elementwise.

    NaN scores count as 0 (no recorded answer is a failed answer).
    """
    score = np.nan_to_num(np.asarray(score, dtype=np.float64), nan=0.0)
    w_cost = np.asarray(w_cost, dtype=np.float64)
    return (1.0 - w_cost) * score - w_cost * normalised_cost(cost, tau)


def reward_matrix(scores: np.ndarray, costs: np.ndarray, w_cost: np.ndarray | float, tau: float) -> np.ndarray:
    """Reward of every (prompt, model) pair, shape (n, k); ``w_cost`` is a scalar or shape (n,)."""
    w = np.asarray(w_cost, dtype=np.float64)
    if w.ndim == 1:
        w = w[:, None]
    return reward(scores, costs, w, tau)


def preference_to_w_cost(quality: float, cost: float) -> float:
    """Normalise a (quality, cost) weight pair onto the simplex; returns w_cost.

    Weights must be finite, non-negative and sum to a positive number.
    """
    for name, value in (("quality", quality), ("cost", cost)):
        if isinstance(value, bool) or not isinstance(value, (int, float, np.floating, np.integer)):
            raise PreferenceError(f"preference.{name} must be a number")
        if not np.isfinite(value):
            raise PreferenceError(f"preference.{name} must be finite")
        if value < 0:
            raise PreferenceError(f"preference.{name} must be >= 0, got {value}")
    total = float(quality) + float(cost)
    if total <= 0:
        raise PreferenceError("preference.quality + preference.cost must be > 0")
    return float(cost) / total


def sample_w_cost(rng: np.random.Generator, n: int) -> np.ndarray:
    """Training preferences: uniform on the simplex, i.e. w_cost ~ U[0, 1]."""
    return rng.uniform(0.0, 1.0, size=n)
