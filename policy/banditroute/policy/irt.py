"""Variational multidimensional item response theory (IRT) over prompts and models.

The model (a compensatory MIRT, 2PL family)::

    P(correct | prompt x, model m) = sigmoid(a(x) . theta_m - b(x))

* ``theta_m`` (``dim`` numbers): the model's ABILITY, its identity vector.
  Each model has a Gaussian variational posterior q(theta_m) = N(mu_m,
  diag sigma_m^2) under the prior N(0, prior_std^2 I). A model with few
  observations keeps a wide posterior: its identity is uncertain, not wrong.
* ``a(x)`` (``dim`` numbers, >= 0 by default: more ability never hurts) is
  the prompt's DISCRIMINATION along each ability dimension, ``b(x)`` its
  DIFFICULTY; both are small maps (linear, or one hidden layer) of the frozen
  prompt embedding, so unseen prompts get item parameters too.

Likelihood: Bernoulli cross-entropy. Continuous scores in [0, 1] (F1, partial
credit) use the same cross-entropy with fractional targets. NaN scores (no
answer recorded, or a cell the log never observed) are masked out, so a
sparse bandit log fits the same way as a full outcome table.

Fitting maximises the ELBO, E_q[log p(scores | theta)] - KL(q || prior),
with reparameterised samples and Adam; the item maps are point estimates
with a small L2 penalty. :func:`fit_new_model_identity` fits ONLY a new
model's posterior with the item maps frozen (onboarding), and
:func:`banditroute.policy.quiz.select_quiz` picks the prompts that are most informative about a new
model's ability (greedy D-optimal design under the expected Fisher
information over the current population of models).

Pure torch/numpy: no Ray, no I/O.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Any, Iterator, Sequence

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

DEFAULT_QUIZ_SIZE = 30


@contextmanager
def single_threaded_torch() -> Iterator[None]:
    """Run torch single-threaded inside the block (restored after).

    The IRT and the identity policy are tiny models: one thread is as fast
    as several, and on a busy machine (CPU-only training next to other
    jobs) multi-threaded OpenMP spin-waiting makes them several times slower.
    """
    before = torch.get_num_threads()
    if before > 1:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        if before > 1:
            torch.set_num_threads(before)


@dataclass
class IrtConfig:
    """Shape and fitting of the variational IRT model."""

    dim: int = 4
    """Dimensions of a model's ability (identity) vector."""
    hidden_dim: int = 0
    """Hidden width of the prompt -> (discrimination, difficulty) map; 0 = linear maps."""
    positive_discrimination: bool = True
    """Keep a(x) >= 0 (softplus), so a higher ability never lowers the predicted score."""
    prior_std: float = 1.0
    """Std of the N(0, prior_std^2 I) prior on every ability vector."""
    steps: int = 800
    """Full-batch Adam steps when fitting the whole model."""
    learning_rate: float = 0.02
    """Adam learning rate of the full fit."""
    l2: float = 1e-4
    """L2 penalty on the item-map weights (per observation, like the likelihood)."""
    mc_samples: int = 4
    """Reparameterised ability samples per ELBO evaluation."""
    init_sigma: float = 0.1
    """Initial posterior std of every ability coordinate in the full fit."""
    identity_steps: int = 300
    """Adam steps when fitting one new model's posterior (item maps frozen)."""
    identity_learning_rate: float = 0.05
    """Adam learning rate of the identity-only fit."""
    identity_mc_samples: int = 16
    """Reparameterised samples per step of the identity-only fit."""
    seed: int = 0
    """Seeds initial weights and the Monte Carlo samples."""

    def validate(self) -> None:
        if self.dim < 1:
            raise ValueError("irt.dim must be >= 1")
        if self.hidden_dim < 0:
            raise ValueError("irt.hidden_dim must be >= 0")
        if not (self.prior_std > 0 and math.isfinite(self.prior_std)):
            raise ValueError("irt.prior_std must be a positive number")
        if self.steps < 1 or self.identity_steps < 1:
            raise ValueError("irt.steps and irt.identity_steps must be >= 1")
        if self.learning_rate <= 0 or self.identity_learning_rate <= 0:
            raise ValueError("irt.learning_rate and irt.identity_learning_rate must be > 0")
        if self.l2 < 0:
            raise ValueError("irt.l2 must be >= 0")
        if self.mc_samples < 1 or self.identity_mc_samples < 1:
            raise ValueError("irt.mc_samples and irt.identity_mc_samples must be >= 1")
        if self.init_sigma <= 0:
            raise ValueError("irt.init_sigma must be > 0")


class ItemMaps(nn.Module):
    """Prompt embedding -> (discrimination a(x) (B, dim), difficulty b(x) (B,))."""

    def __init__(self, embed_dim: int, config: IrtConfig):
        super().__init__()
        self.embed_dim, self.dim = int(embed_dim), int(config.dim)
        self.positive = bool(config.positive_discrimination)
        if config.hidden_dim > 0:
            self.trunk: nn.Module = nn.Sequential(nn.Linear(embed_dim, config.hidden_dim), nn.Tanh())
            width = config.hidden_dim
        else:
            self.trunk = nn.Identity()
            width = embed_dim
        self.discrimination_head = nn.Linear(width, config.dim)
        self.difficulty_head = nn.Linear(width, 1)
        with torch.no_grad():  # start near a(x) = 1, b(x) = 0: a flat, neutral item bank
            self.discrimination_head.weight.mul_(0.1)
            self.discrimination_head.bias.fill_(0.55 if self.positive else 1.0)  # softplus(0.55) ~ 1
            self.difficulty_head.weight.mul_(0.1)
            self.difficulty_head.bias.zero_()

    def forward(self, embeddings: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.trunk(embeddings.float())
        a = self.discrimination_head(h)
        if self.positive:
            a = F.softplus(a)
        return a, self.difficulty_head(h).squeeze(-1)

    def penalty(self) -> torch.Tensor:
        """Sum of squared weights (not biases)."""
        return sum((p**2).sum() for n, p in self.named_parameters() if n.endswith("weight"))


def irt_logits(a: torch.Tensor, b: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """a(x) . theta - b(x). a: (N, d), b: (N,), theta: (..., M, d) -> (..., N, M)."""
    return torch.einsum("nd,...md->...nm", a, theta) - b[:, None]


def logit_moments(a: torch.Tensor, b: torch.Tensor, mu: torch.Tensor, sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and variance of the logit a.theta - b under theta ~ N(mu, diag sigma^2).

    a: (..., d), b: (...), mu/sigma: broadcastable to a -> (mean (...), var (...)).
    """
    mean = (a * mu).sum(-1) - b
    var = (a**2 * sigma**2).sum(-1)
    return mean, var


def expected_probability(mean: torch.Tensor, var: torch.Tensor) -> torch.Tensor:
    """E[sigmoid(z)] for z ~ N(mean, var), by the probit approximation (MacKay 1992)."""
    return torch.sigmoid(mean / torch.sqrt(1.0 + (math.pi / 8.0) * var))


def gaussian_kl(mu: torch.Tensor, log_sigma: torch.Tensor, prior_std, prior_mu=0.0) -> torch.Tensor:
    """KL(N(mu, sigma^2) || N(prior_mu, prior_std^2)), summed over every coordinate.

    ``prior_std`` and ``prior_mu`` are numbers or tensors broadcastable to ``mu``.
    """
    var = torch.exp(2 * log_sigma)
    prior_std = torch.as_tensor(prior_std, dtype=mu.dtype)
    return (torch.log(prior_std) - log_sigma + (var + (mu - prior_mu) ** 2) / (2 * prior_std**2) - 0.5).sum()


def _targets_and_mask(scores: np.ndarray | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    y = torch.as_tensor(np.asarray(scores, dtype=np.float32))
    mask = ~torch.isnan(y)
    if mask.any():
        observed = y[mask]
        if observed.min() < 0 or observed.max() > 1:
            raise ValueError("IRT scores must lie in [0, 1] (NaN = not observed)")
    return torch.nan_to_num(y, nan=0.0), mask


class IrtModel(nn.Module):
    """Item maps (shared by all models) + one Gaussian ability posterior per model."""

    def __init__(self, embed_dim: int, models: Sequence[str], config: IrtConfig):
        super().__init__()
        config.validate()
        self.config = config
        self.models = list(models)
        self.item_maps = ItemMaps(embed_dim, config)
        m, d = len(self.models), config.dim
        self.mu = nn.Parameter(torch.zeros(m, d))
        self.log_sigma = nn.Parameter(torch.full((m, d), math.log(config.init_sigma)))

    @property
    def embed_dim(self) -> int:
        return self.item_maps.embed_dim

    @property
    def dim(self) -> int:
        return self.config.dim

    def posterior(self, name: str | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(mu, sigma) of one model, shape (dim,) each, or of all models (M, dim) when name is None."""
        mu = self.mu.detach().cpu().numpy()
        sigma = torch.exp(self.log_sigma.detach()).cpu().numpy()
        if name is None:
            return mu, sigma
        if name not in self.models:
            raise KeyError(f"unknown model {name!r}; the IRT model knows {self.models}")
        k = self.models.index(name)
        return mu[k], sigma[k]

    @torch.no_grad()
    def predict_proba(self, embeddings, mu=None, sigma=None) -> np.ndarray:
        """Expected P(correct) of each (prompt, model), (N, M); defaults to this model's posteriors."""
        a, b = self.item_maps(torch.as_tensor(np.asarray(embeddings), dtype=torch.float32))
        mu_t = self.mu if mu is None else torch.as_tensor(np.asarray(mu), dtype=torch.float32)
        sg_t = torch.exp(self.log_sigma) if sigma is None else torch.as_tensor(np.asarray(sigma), dtype=torch.float32)
        mean, var = logit_moments(a[:, None, :], b[:, None], mu_t[None], sg_t[None])
        return expected_probability(mean, var).numpy()

    def negative_elbo(self, embeddings: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor, n_samples: int) -> torch.Tensor:
        """-(ELBO) / (number of observations), plus the item-map L2 penalty."""
        a, b = self.item_maps(embeddings)
        sigma = torch.exp(self.log_sigma)
        eps = torch.randn((n_samples,) + tuple(self.mu.shape))
        theta = self.mu + sigma * eps  # (S, M, d)
        logits = irt_logits(a, b, theta)  # (S, N, M)
        nll = F.binary_cross_entropy_with_logits(logits, targets.expand_as(logits), reduction="none")
        n_obs = mask.sum().clamp(min=1)
        expected_nll = (nll * mask).sum() / n_samples
        kl = gaussian_kl(self.mu, self.log_sigma, self.config.prior_std)
        return (expected_nll + kl) / n_obs + self.config.l2 * self.item_maps.penalty()

    # --- persistence ------------------------------------------------------------

    def state(self) -> dict[str, Any]:
        """Picklable snapshot: numpy weights, model names and config."""
        return {
            "config": asdict(self.config),
            "models": list(self.models),
            "embed_dim": self.embed_dim,
            "weights": {k: v.detach().cpu().numpy() for k, v in self.state_dict().items()},
        }

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> "IrtModel":
        from banditroute.core.config import from_dict

        model = cls(int(state["embed_dim"]), state["models"], from_dict(IrtConfig, state["config"]))
        model.load_state_dict({k: torch.as_tensor(np.asarray(v)) for k, v in state["weights"].items()})
        return model


def fit_irt(
    embeddings: np.ndarray,
    scores: np.ndarray,
    models: Sequence[str] | None = None,
    config: IrtConfig | None = None,
) -> IrtModel:
    """Fit item maps and every model's ability posterior by maximising the ELBO.

    ``embeddings`` (N, D); ``scores`` (N, M) in [0, 1], NaN = not observed.
    """
    config = config or IrtConfig()
    config.validate()
    embeddings = np.asarray(embeddings, dtype=np.float32)
    scores = np.asarray(scores, dtype=np.float32)
    if embeddings.ndim != 2 or scores.ndim != 2 or len(embeddings) != len(scores):
        raise ValueError(f"fit_irt: embeddings {embeddings.shape} and scores {scores.shape} must be (N, D) and (N, M)")
    models = list(models) if models is not None else [f"m{k}" for k in range(scores.shape[1])]
    if len(models) != scores.shape[1]:
        raise ValueError(f"fit_irt: {len(models)} model names for {scores.shape[1]} score columns")
    targets, mask = _targets_and_mask(scores)
    if not mask.any():
        raise ValueError("fit_irt: no observed scores")
    torch.manual_seed(config.seed)
    model = IrtModel(embeddings.shape[1], models, config)
    emb = torch.as_tensor(embeddings)
    opt = torch.optim.Adam(model.parameters(), lr=config.learning_rate)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=config.steps, eta_min=config.learning_rate * 0.05)
    mask_f = mask.float()
    with single_threaded_torch():
        for _ in range(config.steps):
            loss = model.negative_elbo(emb, targets, mask_f, config.mc_samples)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    model.eval()
    return model


def population_prior(mu: np.ndarray, sigma: np.ndarray | None = None, min_std: float = 0.1) -> tuple[np.ndarray, np.ndarray]:
    """Empirical-Bayes prior for a NEW model: the known models' abilities as a diagonal Gaussian.

    (mean (d,), std (d,)) of the population's posterior means, the std
    widened by the average posterior variance and floored at ``min_std``.
    A model nobody has quizzed yet is then "a typical model, uncertain",
    not "ability 0", which may lie far from every real model.
    """
    mu = np.asarray(mu, dtype=np.float64).reshape(len(mu), -1)
    if len(mu) < 2:
        raise ValueError("a population prior needs at least 2 known models")
    var = mu.var(axis=0, ddof=1)
    if sigma is not None:
        var = var + (np.asarray(sigma, dtype=np.float64).reshape(mu.shape) ** 2).mean(axis=0)
    return mu.mean(axis=0), np.maximum(np.sqrt(var), min_std)


def fit_identities(
    item_maps: ItemMaps,
    embeddings: np.ndarray,
    scores: np.ndarray,
    config: IrtConfig,
    prior_std: float | np.ndarray | None = None,
    prior_mu: float | np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Fit R independent ability posteriors with the item maps FROZEN.

    ``embeddings`` (N, D) the prompts; ``scores`` (N, R), NaN where model r
    was not asked prompt n. Prior N(prior_mu, diag prior_std^2) (default:
    the model's N(0, config.prior_std^2 I); numbers, (dim,) arrays, or (R, dim) arrays: one prior per column).
    Returns (mu (R, dim), sigma (R, dim)). A column with no observation
    returns the prior.
    """
    prior_std = config.prior_std if prior_std is None else prior_std
    embeddings = np.asarray(embeddings, dtype=np.float32)
    scores = np.asarray(scores, dtype=np.float32)
    if scores.ndim == 1:
        scores = scores[:, None]
    if len(embeddings) != len(scores):
        raise ValueError(f"{len(embeddings)} prompts but {len(scores)} score rows")
    targets, mask = _targets_and_mask(scores)
    with torch.no_grad():
        a, b = item_maps(torch.as_tensor(embeddings))
    r, d = scores.shape[1], item_maps.dim
    gen = torch.Generator().manual_seed(config.seed)
    # one prior for all R columns ((dim,) or a number), or one per column ((R, dim): e.g. each model's own posterior)
    p_std = torch.as_tensor(np.broadcast_to(np.asarray(prior_std, dtype=np.float32), (r, d)).copy())
    p_mu = torch.as_tensor(np.broadcast_to(np.asarray(0.0 if prior_mu is None else prior_mu, dtype=np.float32), (r, d)).copy())
    if not (torch.isfinite(p_std).all() and (p_std > 0).all() and torch.isfinite(p_mu).all()):
        raise ValueError("identity prior: mean must be finite and std > 0")
    mu = p_mu.clone().requires_grad_(True)
    log_sigma = torch.log(p_std).clone().requires_grad_(True)
    opt = torch.optim.Adam([mu, log_sigma], lr=config.identity_learning_rate)
    mask_f = mask.float()
    s = config.identity_mc_samples
    with single_threaded_torch():
        for _ in range(config.identity_steps):
            eps = torch.randn((s, r, d), generator=gen)
            theta = mu + torch.exp(log_sigma) * eps
            logits = irt_logits(a, b, theta)  # (S, N, R)
            nll = F.binary_cross_entropy_with_logits(logits, targets.expand_as(logits), reduction="none")
            expected_nll = (nll * mask_f).sum() / s
            loss = expected_nll + gaussian_kl(mu, log_sigma, p_std, p_mu)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return mu.detach().numpy().copy(), torch.exp(log_sigma.detach()).numpy().copy()


def fit_new_model_identity(
    irt: IrtModel | ItemMaps,
    quiz_embeddings: np.ndarray,
    quiz_scores: np.ndarray,
    config: IrtConfig | None = None,
    prior: tuple[np.ndarray, np.ndarray] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Posterior (mu, sigma), each shape (dim,), of ONE new model from its quiz scores.

    Only the new ability vector is fitted; the item maps (and every other
    model) stay as they are. ``prior`` = (mean, std) of the ability prior,
    e.g. :func:`population_prior` of the known models; default N(0, I * prior_std^2).
    """
    maps = irt.item_maps if isinstance(irt, IrtModel) else irt
    config = config or (irt.config if isinstance(irt, IrtModel) else IrtConfig(dim=maps.dim))
    quiz_scores = np.asarray(quiz_scores, dtype=np.float32).reshape(-1)
    if len(quiz_scores) == 0:
        raise ValueError("fit_new_model_identity: no quiz scores")
    if np.isnan(quiz_scores).all():
        raise ValueError("fit_new_model_identity: every quiz score is NaN")
    p_mu, p_std = (None, None) if prior is None else prior
    mu, sigma = fit_identities(maps, quiz_embeddings, quiz_scores[:, None], config, prior_std=p_std, prior_mu=p_mu)
    return mu[0], sigma[0]


# --- quiz selection ------------------------------------------------------------------
