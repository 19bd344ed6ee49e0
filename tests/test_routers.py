"""Baseline routers on synthetic outcome tables with a known structure (no encoder needed)."""

from __future__ import annotations

import numpy as np
import pytest

from banditroute.core.data import DataError, RoutingData
from banditroute.policy.barp import BarpPolicy, NetworkConfig, PolicyMeta
from banditroute.policy.evaluate import evaluate_router, score_choices
from banditroute.policy.baselines import DEFAULT_ROUTERS, ROUTERS, make_router, make_routers
from banditroute.policy.learned_routers import BestSingleRouter, FullInfoRouter, KnnRouter, LinUCBRouter
from banditroute.policy.routers import (
    FullInfoConfig,
    KnnConfig,
    LinUCBConfig,
    OracleRouter,
    PolicyRouter,
    RandomRouter,
    Router,
    RoutersConfig,
    SingleModelRouter,
)

GRID = (0.0, 0.1, 0.3, 0.5, 0.7, 0.9)


def make_data(scores: np.ndarray, costs: np.ndarray, models: tuple[str, ...], tasks=None) -> RoutingData:
    n = len(scores)
    return RoutingData(
        sample_ids=np.array([f"p{i}" for i in range(n)]),
        prompts=[f"prompt {i}" for i in range(n)],
        eval_names=np.array(tasks if tasks is not None else ["t"] * n),
        models=models,
        scores=np.asarray(scores, dtype=np.float32),
        costs=np.asarray(costs, dtype=np.float64),
    )


def cluster_problem(n: int, seed: int, dim: int = 16):
    """Three prompt clusters; a different cheap model is right on each, one expensive model is right everywhere."""
    rng = np.random.default_rng(seed)
    centres = np.random.default_rng(123).normal(size=(3, dim))
    cluster = rng.integers(0, 3, size=n)
    emb = (centres[cluster] + 0.3 * rng.normal(size=(n, dim))).astype(np.float32)
    models = ("cheap-a", "cheap-b", "cheap-c", "big")
    p_right = np.full((n, 4), 0.1)
    p_right[np.arange(n), cluster] = 0.95
    p_right[:, 3] = 0.9
    scores = (rng.uniform(size=(n, 4)) < p_right).astype(np.float32)
    scores[rng.uniform(size=(n, 4)) < 0.01] = np.nan  # a few missing answers (count as 0)
    costs = np.tile([0.001, 0.001, 0.001, 0.02], (n, 1)) * rng.uniform(0.8, 1.2, size=(n, 4))
    return make_data(scores, costs, models), emb


def mean_reward(router: Router, test: RoutingData, emb: np.ndarray, tau: float, grid=GRID) -> float:
    return float(np.mean([p["reward"] for p in evaluate_router(router, test, emb, grid, tau)]))


def test_registry_contents():
    assert set(ROUTERS) == {"random", "single", "best-single", "oracle", "full-info", "knn", "linucb", "policy"}
    assert set(DEFAULT_ROUTERS) <= set(ROUTERS)
    models = ("m1", "m2", "m3")
    routers = make_routers(["random", "single", "best-single", "oracle", "knn", "full-info", "linucb"], models)
    names = [r.name for r in routers]
    assert names == ["random", "single:m1", "single:m2", "single:m3", "best-single", "oracle", "knn", "full-info", "linucb"]
    for r in routers:
        assert isinstance(r, Router)
    assert make_router("single:m2").model == "m2"
    knn = make_router("knn", RoutersConfig(knn=KnnConfig(k=3)))
    assert knn.config.k == 3
    with pytest.raises(ValueError, match="unknown router"):
        make_router("nope")
    with pytest.raises(ValueError, match="twice"):
        make_routers(["random", "random"], models)
    with pytest.raises(ValueError, match="policy"):
        make_router("policy")  # neither a loaded policy nor a checkpoint


def test_single_always_picks_its_model_even_with_reordered_pool():
    train, emb = cluster_problem(60, seed=0)
    test = train.select_models(("big", "cheap-c", "cheap-a", "cheap-b"))
    for model in train.models:
        router = SingleModelRouter(model)
        router.fit(train, emb, 0.02, 0)
        for w in GRID:
            picks = router.choose(emb, w, test)
            assert picks.dtype == np.int64 and (picks == test.models.index(model)).all()


def test_best_single_picks_best_for_quality_and_cheapest_good_for_cost():
    rng = np.random.default_rng(0)
    n = 400
    models = ("small", "big", "mid")
    scores = (rng.uniform(size=(n, 3)) < np.array([0.5, 0.9, 0.7])).astype(np.float32)
    costs = np.tile([0.01, 1.0, 0.1], (n, 1))
    data = make_data(scores, costs, models)
    emb = rng.normal(size=(n, 4)).astype(np.float32)
    router = BestSingleRouter()
    router.fit(data, emb, tau=1.0, seed=0)
    assert router.best_model(0.0) == "big"
    assert router.best_model(0.95) == "small"
    assert (router.choose(emb, 0.0, data) == 1).all()
    assert (router.choose(emb, 0.95, data) == 0).all()


def test_oracle_is_an_upper_bound_and_prefers_cheaper_ties():
    train, train_emb = cluster_problem(300, seed=1)
    test, test_emb = cluster_problem(150, seed=2)
    tau = 0.02
    routers = make_routers(
        ["random", "single", "best-single", "knn", "full-info", "linucb", "oracle"],
        train.models,
        RoutersConfig(full_info=FullInfoConfig(epochs=30, hidden_dim=32), linucb=LinUCBConfig(passes=1, pca_dim=8)),
    )
    per_w: dict[str, list[float]] = {}
    for r in routers:
        r.fit(train, train_emb, tau, 0)
        per_w[r.name] = [p["reward"] for p in evaluate_router(r, test, test_emb, GRID, tau)]
    for name, rewards in per_w.items():
        assert all(o >= x - 1e-12 for o, x in zip(per_w["oracle"], rewards)), name
    # At w = 0 several models are often right; the oracle takes the cheapest of them.
    oracle = next(r for r in routers if r.name == "oracle")
    picks = oracle.choose(test_emb, 0.0, test)
    right = test.scores_filled[np.arange(len(test)), picks] == test.scores_filled.max(axis=1)
    assert right.all()
    cheap_right = test.scores_filled[:, :3].max(axis=1) == test.scores_filled.max(axis=1)
    assert (picks[cheap_right] != 3).all()


def test_knn_and_full_info_beat_random_when_best_model_depends_on_prompt():
    train, train_emb = cluster_problem(400, seed=3)
    test, test_emb = cluster_problem(200, seed=4)
    tau = 0.02
    random_router = RandomRouter()
    random_router.fit(train, train_emb, tau, 0)
    best = BestSingleRouter()
    best.fit(train, train_emb, tau, 0)
    base = mean_reward(random_router, test, test_emb, tau)
    single = mean_reward(best, test, test_emb, tau)
    for router in (KnnRouter(), FullInfoRouter(FullInfoConfig(epochs=60, hidden_dim=64))):
        router.fit(train, train_emb, tau, 0)
        got = mean_reward(router, test, test_emb, tau)
        assert got > base + 0.2, (router.name, got, base)
        assert got > single + 0.1, (router.name, got, single)
        # With a strong cost preference the cheap, prompt-specific model is picked.
        picks = router.choose(test_emb, 0.5, test)
        assert (picks != 3).mean() > 0.9


def test_linucb_learns_a_linear_problem_from_bandit_feedback():
    rng = np.random.default_rng(5)
    dim, k = 8, 4
    directions = rng.normal(size=(k, dim))

    def problem(n, seed):
        r = np.random.default_rng(seed)
        x = r.normal(size=(n, dim))
        scores = np.clip(0.5 + 0.15 * x @ directions.T, 0.0, 1.0)
        costs = np.tile([0.001, 0.002, 0.004, 0.008], (n, 1))
        return make_data(scores, costs, tuple(f"m{j}" for j in range(k))), x.astype(np.float32)

    train, train_emb = problem(1500, 6)
    test, test_emb = problem(400, 7)
    tau = 0.01
    linucb = LinUCBRouter(LinUCBConfig(passes=2, pca_dim=0))
    linucb.fit(train, train_emb, tau, 0)
    assert linucb.pulls == 2 * len(train)  # one observed reward per (prompt, pass): bandit feedback
    rand = RandomRouter()
    rand.fit(train, train_emb, tau, 0)
    best = BestSingleRouter()
    best.fit(train, train_emb, tau, 0)
    oracle = OracleRouter()
    oracle.fit(train, train_emb, tau, 0)
    got, base, single, top = (mean_reward(r, test, test_emb, tau) for r in (linucb, rand, best, oracle))
    assert got > base + 0.1, (got, base)
    assert got > single + 0.05, (got, single)
    assert got > top - 0.05, (got, top)


def _tiny_policy(models, embed_dim) -> BarpPolicy:
    meta = PolicyMeta(models=list(models), tau=0.02, embed_dim=embed_dim,
                      network=NetworkConfig(hidden_dim=8, n_hidden_layers=1, preference_dim=4))
    return BarpPolicy(meta)


def test_policy_router_maps_models_by_name_and_rejects_other_pools():
    data, emb = cluster_problem(50, seed=8)
    policy = _tiny_policy(("big", "cheap-c", "cheap-a", "cheap-b"), emb.shape[1])
    router = PolicyRouter(policy)
    router.fit(data, emb, policy.tau, 0)
    picks = router.choose(emb, 0.3, data)
    greedy = policy.decide(emb, 0.3).actions
    assert [data.models[i] for i in picks] == [policy.models[a] for a in greedy]
    score_choices(picks, data, 0.3, policy.tau)

    with pytest.raises(DataError, match="pools differ"):
        router.choose(emb, 0.3, data.select_models(("cheap-a", "cheap-b", "big")))
    other = _tiny_policy(("big", "cheap-a"), emb.shape[1])
    with pytest.raises(DataError, match="pools differ"):
        PolicyRouter(other).fit(data, emb, other.tau, 0)
    with pytest.raises(ValueError, match="width"):
        PolicyRouter(_tiny_policy(data.models, 3)).fit(data, emb, 0.02, 0)


def test_learned_routers_reject_a_different_test_pool():
    train, emb = cluster_problem(80, seed=9)
    router = KnnRouter()
    router.fit(train, emb, 0.02, 0)
    with pytest.raises(DataError, match="pools differ"):
        router.choose(emb, 0.0, train.select_models(("cheap-a", "big")))
