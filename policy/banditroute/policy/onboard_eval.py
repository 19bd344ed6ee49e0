"""Onboarding, evaluated: train without a model, onboard it from quizzes of several sizes, compare with retraining.

`banditroute onboard-eval` runs :func:`run_onboard_eval`; :func:`mean_reward_over_grid`
scores any policy with ``decide`` over the preference grid.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
from banditroute.core.data import DataError, RoutingData, split_by_prompt
from banditroute.policy.identity_train import IdentityTrainConfig, train_identity_policy
from banditroute.policy.onboard import (
    MIN_QUIZ_SIZE,
    QUIZ_STRATEGIES,
    QuizError,
    choose_quiz,
    onboard_model,
    onboard_model_adaptive,
)
from banditroute.policy.reward import DEFAULT_PREFERENCE_GRID, fit_tau


class PolicyGridRouter:
    """Router adapter (policy/routers.py interface) for any policy with ``decide``:
    greedy decisions, mapped by model name to the test data's columns."""

    def __init__(self, policy, name: str = "policy", candidates: Sequence[str] | None = None):
        self.policy = policy
        self.name = name
        self.candidates = None if candidates is None else list(candidates)

    def fit(self, train: RoutingData, train_embeddings: np.ndarray, tau: float, seed: int) -> None:
        """Nothing to learn."""

    def choose(self, embeddings: np.ndarray, w_cost: float, test: RoutingData) -> np.ndarray:
        names = self.candidates
        if names is None:
            mask = None
        else:
            mask = self.policy.candidate_mask([names] * len(embeddings), len(embeddings))
        dec = self.policy.decide(np.asarray(embeddings, dtype=np.float32), float(w_cost), mask)
        pool = getattr(dec, "models", None) or self.policy.models
        cols = np.array([test.model_index(m) for m in pool], dtype=np.int64)
        return cols[dec.actions]


def mean_reward_over_grid(
    policy,
    test: RoutingData,
    test_embeddings: np.ndarray,
    tau: float,
    grid: Sequence[float] = DEFAULT_PREFERENCE_GRID,
    candidates: Sequence[str] | None = None,
) -> tuple[float, list[dict[str, float]]]:
    """(mean reward across ``grid``, per-preference points) of greedy routing on ``test``."""
    from banditroute.policy.evaluate import evaluate_router

    points = evaluate_router(PolicyGridRouter(policy, candidates=candidates), test, test_embeddings, grid, tau)
    return float(np.mean([p["reward"] for p in points])), points


def traffic_share(policy, embeddings: np.ndarray, test: RoutingData, model: str, grid: Sequence[float]) -> list[float]:
    """Fraction of test prompts greedily routed to ``model``, per preference of ``grid``."""
    router = PolicyGridRouter(policy)
    col = test.model_index(model)
    return [float(np.mean(router.choose(embeddings, float(w), test) == col)) for w in grid]


def run_onboard_eval(
    data: RoutingData,
    embeddings: np.ndarray,
    holdout: str,
    quiz_sizes: Sequence[int],
    config: IdentityTrainConfig,
    encoder_config,
    encoder_id: str,
    test_fraction: float = 0.2,
    seed: int = 0,
    grid: Sequence[float] = DEFAULT_PREFERENCE_GRID,
    checkpoint_dir: str | os.PathLike | None = None,
    log: Callable[[str], None] = print,
    quiz_strategy: str = "adaptive",
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Train without ``holdout``, onboard it with each quiz size, compare with retraining.

    Returns (the onboard.json document, details). All variants share the
    prompt split (seeded), tau (from the training split WITHOUT the held-out
    model: what a deployed policy would have) and the evaluation grid.
    The held-out model's price is its mean logged cost per call on the
    training split; quizzes are drawn from the training split.
    """
    if holdout not in data.models:
        raise DataError(f"unknown model {holdout!r}; the data has {list(data.models)}")
    if data.n_models < 3:
        raise DataError("onboard-eval needs at least 3 models (2 left after holding one out)")
    if quiz_strategy not in QUIZ_STRATEGIES:
        raise QuizError(f"quiz strategy must be one of {list(QUIZ_STRATEGIES)}, got {quiz_strategy!r}")
    sizes = [int(n) for n in quiz_sizes]
    if not sizes or min(sizes) < MIN_QUIZ_SIZE:
        raise QuizError(f"--quiz sizes must be >= {MIN_QUIZ_SIZE}, got {sizes}")
    order = {s: i for i, s in enumerate(data.sample_ids)}
    train, test = split_by_prompt(data, test_fraction, seed)
    e_train = embeddings[[order[s] for s in train.sample_ids]]
    e_test = embeddings[[order[s] for s in test.sample_ids]]
    others = [m for m in data.models if m != holdout]
    train_wo = train.select_models(others)
    tau = fit_tau(train_wo.costs, config.tau_quantile)
    col = train.model_index(holdout)
    observed = np.flatnonzero(~np.isnan(train.scores[:, col]))
    if len(observed) < max(sizes):
        raise QuizError(f"only {len(observed)} training prompts have a score of {holdout!r}; the largest quiz needs {max(sizes)}")
    price = float(np.mean(train.costs[:, col]))
    config.seed = seed
    timings: dict[str, float] = {}

    t0 = time.perf_counter()
    log(f"training without {holdout!r} on {len(train)} prompts x {len(others)} models")
    policy_wo, _, hist_wo = train_identity_policy(train_wo, e_train, config, encoder_config, encoder_id, tau=tau)
    timings["train_without_s"] = time.perf_counter() - t0
    without_reward, without_points = mean_reward_over_grid(policy_wo, test, e_test, tau, grid)
    log(f"without {holdout!r}: mean reward {without_reward:.4f}")
    if checkpoint_dir is not None:
        policy_wo.save(Path(checkpoint_dir) / "without")

    rows, details_rows = [], []
    base_registry = policy_wo.registry.copy()
    for n in sizes:
        t0 = time.perf_counter()
        policy_wo.registry = base_registry.copy()
        if quiz_strategy == "adaptive":
            entry, quiz, _ = onboard_model_adaptive(
                policy_wo, holdout, price, e_train[observed], lambda ix: train.scores[observed[ix], col], n, seed=seed
            )
        else:
            quiz = choose_quiz(policy_wo, e_train[observed], n, quiz_strategy, seed)
            entry = onboard_model(policy_wo, holdout, price, e_train[observed[quiz]], train.scores[observed[quiz], col])
        rows_q = observed[quiz]
        reward_n, points_n = mean_reward_over_grid(policy_wo, test, e_test, tau, grid)
        share = traffic_share(policy_wo, e_test, test, holdout, grid)
        rows.append({"quiz": n, "mean_reward": reward_n})
        details_rows.append(
            {
                "quiz": n,
                "mean_reward": reward_n,
                "points": points_n,
                "identity_mu": entry.mu,
                "identity_sigma": entry.sigma,
                "quiz_mean_score": float(np.mean(train.scores[rows_q, col])),
                "traffic_share_by_w": share,
                "seconds": time.perf_counter() - t0,
            }
        )
        log(f"onboarded {holdout!r} with {n} quiz prompts: mean reward {reward_n:.4f}")
    policy_wo.registry = base_registry

    t0 = time.perf_counter()
    log(f"retraining with {holdout!r} from the start")
    policy_all, _, hist_all = train_identity_policy(train, e_train, config, encoder_config, encoder_id, tau=tau)
    timings["train_with_s"] = time.perf_counter() - t0
    retrained_reward, retrained_points = mean_reward_over_grid(policy_all, test, e_test, tau, grid)
    log(f"retrained with {holdout!r}: mean reward {retrained_reward:.4f}")
    if checkpoint_dir is not None:
        policy_all.save(Path(checkpoint_dir) / "retrained")
    full_mu, full_sigma = policy_all.registry.get(holdout).mu, policy_all.registry.get(holdout).sigma
    retrained_share = traffic_share(policy_all, e_test, test, holdout, grid)

    doc = {
        "model": holdout,
        "rows": rows,
        "retrained_mean_reward": retrained_reward,
        "without_model_mean_reward": without_reward,
    }
    details = {
        **doc,
        "data": data.source,
        "n_train": len(train),
        "n_test": len(test),
        "tau": tau,
        "price_usd_per_call": price,
        "grid": [float(w) for w in grid],
        "seed": seed,
        "test_fraction": test_fraction,
        "quiz_strategy": quiz_strategy,
        "rows": details_rows,
        "retrained_points": retrained_points,
        "without_points": without_points,
        "retrained_identity": {"mu": full_mu, "sigma": full_sigma},
        "retrained_traffic_share_by_w": retrained_share,
        "timings_s": timings,
        "final_train_reward": {"without": hist_wo[-1]["mean_reward"], "retrained": hist_all[-1]["mean_reward"]},
    }
    return doc, details
