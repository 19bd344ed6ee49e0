"""The variational IRT model: recovery on data drawn from the model itself, uncertainty, quizzes."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from banditroute.policy.irt import (
    IrtConfig,
    IrtModel,
    fit_identities,
    fit_irt,
    fit_new_model_identity,
)
from banditroute.policy.quiz import item_information, select_quiz


def irt_world(n=600, embed_dim=16, n_models=15, dim=1, seed=0):
    """Prompts, true item maps and abilities, and Bernoulli scores drawn from the IRT model."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, embed_dim)).astype(np.float32)
    a_w = rng.normal(size=(embed_dim, dim)) * 0.4
    b_w = rng.normal(size=embed_dim) * 0.4
    a = np.log1p(np.exp(x @ a_w + 0.6))  # softplus: positive discrimination
    b = x @ b_w
    theta = rng.normal(size=(n_models, dim))
    p = 1 / (1 + np.exp(-(a @ theta.T - b[:, None])))
    y = (rng.random(p.shape) < p).astype(np.float32)
    return x, a, b, theta, p, y, rng


def test_recovers_known_abilities():
    x, a, b, theta, p, y, _ = irt_world()
    model = fit_irt(x, y, config=IrtConfig(dim=1, steps=600))
    mu, sigma = model.posterior()
    assert np.corrcoef(mu[:, 0], theta[:, 0])[0, 1] > 0.95
    assert (sigma > 0).all() and (sigma < 0.5).all()
    # predictions on the training prompts track the true probabilities
    assert np.corrcoef(model.predict_proba(x).ravel(), p.ravel())[0, 1] > 0.9


def test_recovers_multidimensional_model_up_to_rotation():
    x, a, b, theta, p, y, _ = irt_world(n=800, n_models=20, dim=2, seed=1)
    model = fit_irt(x, y, config=IrtConfig(dim=2, steps=600))
    mu, _ = model.posterior()
    # abilities are identified up to an invertible linear map: regress truth on the fit
    design = np.c_[mu, np.ones(len(mu))]
    coef, *_ = np.linalg.lstsq(design, theta, rcond=None)
    resid = theta - design @ coef
    r2 = 1 - resid.var(axis=0) / theta.var(axis=0)
    assert (r2 > 0.8).all(), r2
    assert np.corrcoef(model.predict_proba(x).ravel(), p.ravel())[0, 1] > 0.9


def test_fractional_scores_and_missing_cells():
    x, a, b, theta, p, y, rng = irt_world(seed=2)
    partial = p.astype(np.float32).copy()  # continuous scores in [0, 1]
    partial[rng.random(partial.shape) < 0.5] = np.nan  # half the log is missing
    model = fit_irt(x, partial, config=IrtConfig(dim=1, steps=500))
    mu, _ = model.posterior()
    assert np.isfinite(mu).all()
    assert np.corrcoef(mu[:, 0], theta[:, 0])[0, 1] > 0.9


def test_posterior_std_shrinks_with_more_observations():
    x, a, b, theta, p, y, rng = irt_world(seed=3)
    model = fit_irt(x, y, config=IrtConfig(dim=1, steps=400))
    new_theta = np.array([1.0])
    p_new = 1 / (1 + np.exp(-(a @ new_theta - b)))
    y_new = (rng.random(len(x)) < p_new).astype(np.float32)
    sigmas = []
    for n in (5, 20, 100, 600):
        mu, sigma = fit_new_model_identity(model, x[:n], y_new[:n])
        assert mu.shape == sigma.shape == (1,)
        sigmas.append(float(sigma[0]))
    assert sigmas == sorted(sigmas, reverse=True), sigmas
    assert sigmas[-1] < 0.5 * sigmas[0]
    # with no information the posterior is the prior
    mu0, sigma0 = fit_identities(model.item_maps, x[:3], np.full((3, 1), np.nan, np.float32), model.config)
    assert abs(mu0[0, 0]) < 0.1 and abs(sigma0[0, 0] - 1.0) < 0.1


def test_new_model_identity_places_it_among_the_others():
    x, a, b, theta, p, y, rng = irt_world(seed=4)
    model = fit_irt(x, y, config=IrtConfig(dim=1, steps=500))
    mu_all, _ = model.posterior()
    fitted = []
    for t in (-1.5, 1.5):
        p_new = 1 / (1 + np.exp(-(a[:, 0] * t - b)))
        y_new = (rng.random(len(x)) < p_new).astype(np.float32)
        quiz = select_quiz(model.item_maps, x, 30, mu_all)
        mu, _ = fit_new_model_identity(model, x[quiz], y_new[quiz])
        fitted.append(float(mu[0]))
    assert fitted[0] < fitted[1]
    # the strong model lands in the upper part of the population, the weak one in the lower part
    assert fitted[1] > np.median(mu_all[:, 0]) > fitted[0]


def test_quiz_selection_is_more_informative_than_random():
    x, a, b, theta, p, y, rng = irt_world(n=500, dim=2, seed=5)
    model = fit_irt(x, y, config=IrtConfig(dim=2, steps=300))
    mu, sigma = model.posterior()
    quiz = select_quiz(model.item_maps, x, 20, mu, sigma, strategy="information")
    assert len(quiz) == len(set(quiz.tolist())) == 20
    c, av = item_information(model.item_maps, x, mu, sigma)

    def logdet(rows):
        prec = np.eye(2) + (c[rows, None, None] * np.einsum("nd,ne->nde", av[rows], av[rows])).sum(0)
        return np.linalg.slogdet(prec)[1]

    random_sets = [logdet(rng.choice(len(x), 20, replace=False)) for _ in range(20)]
    assert logdet(quiz) > max(random_sets)
    # candidates restrict the pool
    pool = np.arange(100, 200)
    assert set(select_quiz(model.item_maps, x, 10, mu, candidates=pool).tolist()) <= set(pool.tolist())
    with pytest.raises(ValueError, match="only 5 candidate"):
        select_quiz(model.item_maps, x, 10, mu, candidates=np.arange(5))
    with pytest.raises(ValueError, match="strategy"):
        select_quiz(model.item_maps, x, 10, mu, strategy="best")
    rand = select_quiz(model.item_maps, x, 10, mu, strategy="random", seed=3)
    assert len(set(rand.tolist())) == 10 and np.array_equal(rand, select_quiz(model.item_maps, x, 10, mu, strategy="random", seed=3))


def test_stratified_quiz_covers_every_region_of_the_prompt_pool():
    x, a, b, theta, p, y, rng = irt_world(n=400, dim=2, seed=7)
    model = fit_irt(x, y, config=IrtConfig(dim=2, steps=200))
    mu, sigma = model.posterior()
    # a pool made of 6 tight, far-apart groups of prompts
    centres = rng.normal(size=(6, x.shape[1])) * 6
    group = np.repeat(np.arange(6), 50)
    pool = (centres[group] + rng.normal(size=(300, x.shape[1])) * 0.1).astype(np.float32)
    quiz = select_quiz(model.item_maps, pool, 6, mu, sigma, strategy="stratified")
    assert sorted(group[quiz].tolist()) == list(range(6))
    # a new model's identity prior: the population, not N(0, I)
    from banditroute.policy.irt import population_prior

    p_mu, p_std = population_prior(mu, sigma)
    assert p_mu.shape == p_std.shape == (2,) and (p_std >= 0.1).all()
    np.testing.assert_allclose(p_mu, mu.mean(0), atol=1e-6)


def test_bad_input_is_rejected():
    x = np.zeros((4, 3), np.float32)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        fit_irt(x, np.full((4, 2), 1.5, np.float32), config=IrtConfig(steps=2))
    with pytest.raises(ValueError, match="no observed"):
        fit_irt(x, np.full((4, 2), np.nan, np.float32), config=IrtConfig(steps=2))
    with pytest.raises(ValueError, match="must be"):
        fit_irt(x, np.zeros((5, 2), np.float32), config=IrtConfig(steps=2))
    with pytest.raises(ValueError, match="irt.dim"):
        IrtConfig(dim=0).validate()
    model = IrtModel(3, ["a", "b"], IrtConfig())
    with pytest.raises(ValueError, match="NaN"):
        fit_new_model_identity(model, x, np.full(4, np.nan))


def test_state_round_trip():
    x, a, b, theta, p, y, _ = irt_world(n=100, n_models=4, seed=6)
    model = fit_irt(x, y, ["w", "x", "y", "z"], IrtConfig(dim=2, steps=50))
    again = IrtModel.from_state(model.state())
    assert again.models == ["w", "x", "y", "z"]
    np.testing.assert_allclose(again.predict_proba(x), model.predict_proba(x), atol=1e-6)
    assert torch.equal(again.mu, model.mu)


def test_adaptive_quiz_asks_only_what_it_picks_and_learns_the_model():
    from banditroute.policy.irt import population_prior
    from banditroute.policy.quiz import select_quiz_adaptive

    x, a, b, theta, p, y, rng = irt_world(n=500, dim=2, seed=8)
    model = fit_irt(x, y, config=IrtConfig(dim=2, steps=300, identity_steps=150))
    mu_pop, sg_pop = model.posterior()
    true = np.array([1.2, -0.5])
    p_new = 1 / (1 + np.exp(-(a @ true - b)))
    y_new = (rng.random(len(x)) < p_new).astype(np.float32)
    asked: list[list[int]] = []

    def answer(ix):
        asked.append(ix.tolist())
        return y_new[ix]

    idx, scores, mu, sigma = select_quiz_adaptive(
        model.item_maps, x, answer, 20, mu_pop, sg_pop, prior=population_prior(mu_pop, sg_pop), config=model.config, batch=5
    )
    assert len(idx) == len(set(idx.tolist())) == 20
    assert sum(asked, []) == idx.tolist() and len(asked) == 4  # 6 + 5 + 5 + 4, each asked once
    np.testing.assert_array_equal(scores, y_new[idx])
    # its predictions for the new model beat the population average's
    pred = model.predict_proba(x, mu[None], sigma[None])[:, 0]
    assert np.corrcoef(pred, p_new)[0, 1] > 0.8
