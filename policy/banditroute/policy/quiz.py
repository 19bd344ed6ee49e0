"""Choosing quiz prompts for a new model: the ones most informative about its ability.

Greedy D-optimal design under the expected Fisher information of each
prompt (:func:`item_information`) over the current population of models,
with stratified (k-means) and random alternatives. Pure torch/numpy.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch
from banditroute.policy.irt import (
    DEFAULT_QUIZ_SIZE,
    IrtConfig,
    ItemMaps,
    expected_probability,
    fit_identities,
    logit_moments,
)


@torch.no_grad()
def item_information(
    item_maps: ItemMaps, embeddings: np.ndarray, population_mu: np.ndarray, population_sigma: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """(c(x) (N,), a(x) (N, d)): the expected Fisher information of prompt x about theta is c(x) a a^T.

    For one model, I(theta) = p (1 - p) a a^T with p = sigmoid(a.theta - b);
    ``c`` averages p (1 - p) over the population of known abilities (the
    prior for a new model), so the information matrix stays rank one.
    """
    a, b = item_maps(torch.as_tensor(np.asarray(embeddings, dtype=np.float32)))
    mu = torch.as_tensor(np.asarray(population_mu, dtype=np.float32)).reshape(-1, a.shape[1])
    if mu.shape[0] == 0:
        mu = torch.zeros(1, a.shape[1])
    sg = torch.zeros_like(mu) if population_sigma is None else torch.as_tensor(np.asarray(population_sigma, dtype=np.float32)).reshape(mu.shape)
    mean, var = logit_moments(a[:, None, :], b[:, None], mu[None], sg[None])
    p = expected_probability(mean, var)  # (N, M)
    c = (p * (1 - p)).mean(dim=1)
    return c.numpy().astype(np.float64), a.numpy().astype(np.float64)


def kmeans(x: np.ndarray, k: int, seed: int = 0, iters: int = 25) -> np.ndarray:
    """Cluster labels (N,) of ``x`` into ``k`` clusters (k-means++ start, Lloyd iterations)."""
    x = np.asarray(x, dtype=np.float64)
    n = len(x)
    if k >= n:
        return np.arange(n)
    rng = np.random.default_rng(seed)
    sq = (x**2).sum(1)
    centres = [x[rng.integers(n)]]
    d2 = np.maximum(sq - 2 * x @ centres[0] + centres[0] @ centres[0], 0)
    for _ in range(1, k):
        probs = d2 / d2.sum() if d2.sum() > 0 else np.full(n, 1.0 / n)
        c = x[rng.choice(n, p=probs)]
        centres.append(c)
        d2 = np.minimum(d2, np.maximum(sq - 2 * x @ c + c @ c, 0))
    c = np.stack(centres)
    labels = np.zeros(n, dtype=np.int64)
    for _ in range(iters):
        dist = sq[:, None] - 2 * x @ c.T + (c**2).sum(1)[None, :]
        new = dist.argmin(1)
        if _ > 0 and np.array_equal(new, labels):
            break
        labels = new
        for j in range(k):
            members = labels == j
            if members.any():
                c[j] = x[members].mean(0)
    return labels


QUIZ_STRATEGIES = ("stratified", "information", "random")


def greedy_information_picks(
    a: np.ndarray,
    c: np.ndarray,
    inv: np.ndarray,
    available: np.ndarray,
    used_cluster: np.ndarray,
    labels: np.ndarray,
    take: int,
) -> tuple[list[int], np.ndarray]:
    """``take`` greedy D-optimal picks among the ``available`` prompts.

    Each pick maximises ``c_j * a_j' inv a_j`` (information gain under the
    current posterior covariance ``inv``) among available prompts of a
    cluster not used yet (any available prompt once every cluster is used),
    then updates ``inv`` by Sherman-Morrison. ``available`` and
    ``used_cluster`` are updated in place; returns (picks, new inv).
    """
    picks: list[int] = []
    for _ in range(take):
        gain = c * np.einsum("nd,de,ne->n", a, inv, a)
        allowed = available & ~used_cluster[labels]
        if not allowed.any():  # fewer non-empty clusters than picks
            allowed = available
        gain[~allowed] = -np.inf
        j = int(np.argmax(gain))
        picks.append(j)
        available[j] = False
        used_cluster[labels[j]] = True
        u = inv @ a[j]
        inv = inv - np.outer(u, u) * c[j] / (1.0 + c[j] * a[j] @ u)
    return picks, inv


def select_quiz(
    item_maps: ItemMaps,
    embeddings: np.ndarray,
    n: int = DEFAULT_QUIZ_SIZE,
    population_mu: np.ndarray | None = None,
    population_sigma: np.ndarray | None = None,
    prior_std: float = 1.0,
    candidates: np.ndarray | None = None,
    strategy: str = "stratified",
    seed: int = 0,
) -> np.ndarray:
    """Indices (into ``embeddings``) of ``n`` quiz prompts that are most informative about a new model.

    Greedy D-optimal design: start from the prior precision I / prior_std^2
    and repeatedly add the prompt that most increases log det of the
    expected posterior precision, Lambda + c(x) a a^T; by the matrix
    determinant lemma the gain is log(1 + c(x) a^T Lambda^-1 a), so each pick
    is one pass over the pool (Sherman-Morrison keeps Lambda^-1 current).

    ``strategy``:

    * ``"stratified"`` (default): the pool is split into ``n`` k-means
      clusters of the prompt embeddings and each pick must come from a
      cluster not used yet, so the quiz covers the whole prompt
      distribution. Pure information picks concentrate on the few regions
      where the fitted item maps have (noisily) the highest discrimination;
      a model that is unusually good there then looks strong everywhere
      (measured in docs/any_model_set.md).
    * ``"information"``: the plain greedy design over the whole pool.
    * ``"random"``: a seeded uniform sample (a baseline).

    A prompt is picked at most once. ``candidates`` restricts the pool.
    """
    if strategy not in QUIZ_STRATEGIES:
        raise ValueError(f"quiz strategy must be one of {list(QUIZ_STRATEGIES)}, got {strategy!r}")
    pool = np.arange(len(embeddings)) if candidates is None else np.asarray(candidates, dtype=np.int64)
    if n < 1:
        raise ValueError("quiz size must be >= 1")
    if len(pool) < n:
        raise ValueError(f"only {len(pool)} candidate prompts for a quiz of {n}")
    if strategy == "random":
        return pool[np.sort(np.random.default_rng(seed).choice(len(pool), n, replace=False))]
    d = item_maps.dim
    pool_emb = np.asarray(embeddings)[pool]
    pop_mu = np.zeros((1, d)) if population_mu is None else np.asarray(population_mu)
    c, a = item_information(item_maps, pool_emb, pop_mu, population_sigma)
    labels = kmeans(pool_emb, n, seed) if strategy == "stratified" else np.zeros(len(pool), dtype=np.int64)
    used_cluster = np.zeros(labels.max() + 1, dtype=bool)
    inv = np.eye(d) * prior_std**2  # Lambda^-1
    available = np.ones(len(pool), dtype=bool)
    chosen, _ = greedy_information_picks(a, c, inv, available, used_cluster, labels, n)
    return pool[np.asarray(chosen, dtype=np.int64)]


def select_quiz_adaptive(
    item_maps: ItemMaps,
    embeddings: np.ndarray,
    answer: "Callable[[np.ndarray], np.ndarray]",
    n: int = DEFAULT_QUIZ_SIZE,
    population_mu: np.ndarray | None = None,
    population_sigma: np.ndarray | None = None,
    prior: tuple[np.ndarray, np.ndarray] | None = None,
    config: IrtConfig | None = None,
    batch: int = 5,
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Adaptive (computerised-adaptive-testing style) quiz: ask, refit, ask where the NEW model is uncertain.

    The pool is split into ``n`` k-means strata (one pick per stratum, as in
    the stratified design). The first ``max(batch, n // 3)`` picks use the
    population's expected information; after that, every ``batch`` picks
    the new model's posterior is refitted from the answers so far and the
    next picks maximise the information under THAT posterior (prompts where
    this model's outcome is still uncertain), starting from its posterior
    precision. ``answer(indices) -> scores`` is called once per batch, only
    for the chosen prompts: it may call an upstream, or read a results
    table (unchosen rows are never looked at).

    Returns (indices, scores, mu, sigma) with the posterior of all answers.
    """
    config = config or IrtConfig(dim=item_maps.dim)
    emb = np.asarray(embeddings, dtype=np.float32)
    if n < 1:
        raise ValueError("quiz size must be >= 1")
    if len(emb) < n:
        raise ValueError(f"only {len(emb)} candidate prompts for a quiz of {n}")
    d = item_maps.dim
    prior_mu, prior_std = (np.zeros(d), np.full(d, config.prior_std)) if prior is None else prior
    pop_mu = np.zeros((1, d)) if population_mu is None else np.asarray(population_mu)
    labels = kmeans(emb, n, seed)
    used_cluster = np.zeros(labels.max() + 1, dtype=bool)
    with torch.no_grad():
        a_t, b_t = item_maps(torch.as_tensor(emb))
    a = a_t.numpy().astype(np.float64)
    c_pop, _ = item_information(item_maps, emb, pop_mu, population_sigma)
    available = np.ones(len(emb), dtype=bool)
    chosen: list[int] = []
    scores: list[float] = []
    mu, sigma = np.asarray(prior_mu, dtype=np.float64), np.asarray(prior_std, dtype=np.float64)
    first = min(n, max(batch, n // 3))
    c = c_pop
    inv = np.diag(sigma**2)
    while len(chosen) < n:
        take = first if not chosen else min(batch, n - len(chosen))
        picks, inv = greedy_information_picks(a, c, inv, available, used_cluster, labels, take)
        got = np.asarray(answer(np.asarray(picks, dtype=np.int64)), dtype=np.float32).reshape(-1)
        if len(got) != len(picks):
            raise ValueError(f"answer() returned {len(got)} scores for {len(picks)} prompts")
        chosen += picks
        scores += got.tolist()
        idx = np.asarray(chosen, dtype=np.int64)
        mu_f, sg_f = fit_identities(item_maps, emb[idx], np.asarray(scores, np.float32)[:, None], config, prior_std=prior_std, prior_mu=prior_mu)
        mu, sigma = mu_f[0].astype(np.float64), sg_f[0].astype(np.float64)
        # information under the new model's own posterior from now on
        with torch.no_grad():
            mean, var = logit_moments(a_t, b_t, torch.as_tensor(mu, dtype=torch.float32), torch.as_tensor(sigma, dtype=torch.float32))
            p = expected_probability(mean, var).numpy().astype(np.float64)
        c = p * (1 - p)
        inv = np.diag(sigma**2)
    return np.asarray(chosen, dtype=np.int64), np.asarray(scores, dtype=np.float32), mu.astype(np.float32), sigma.astype(np.float32)
