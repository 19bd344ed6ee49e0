"""Bandit training of the identity policy (``policy/identity_policy.py``).

Training (:func:`train_identity_policy`) reuses the BaRP trainer's loop
(``policy/train.py``: BanditEnvironment reveals only the chosen model's
reward; REINFORCE + learned baseline + entropy). Three augmentations teach
the shared weights to generalise over models rather than memorise the
training pool: a random subset of the pool is offered per request, each
offered price (and the cost the environment charges for it) is scaled by a
random log-normal factor, and a candidate's identity is sometimes replaced
by the wider posterior fitted from a small random quiz (like an onboarded
model's). The IRT is fitted first, on the logged outcomes of the training
data (``irt_pulls_per_prompt`` > 0 restricts it to a sparse random log).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field

import numpy as np
import torch

from banditroute.core.config import to_dict
from banditroute.core.data import RoutingData
from banditroute.policy.encoders import EncoderConfig
from banditroute.policy.identity_policy import IdentityMeta, IdentityNetworkConfig, IdentityPolicy
from banditroute.policy.irt import IrtConfig, IrtModel, ItemMaps, fit_identities, fit_irt, population_prior, single_threaded_torch
from banditroute.policy.model_registry import ModelEntry, ModelRegistry
from banditroute.policy.reward import fit_tau
from banditroute.policy.losses import clipped_importance_weights, reinforce_loss, value_loss
from banditroute.policy.train import TRAIN_MASKED_LOGIT, BanditEnvironment, BanditLoopConfig, bandit_training_loop


@dataclass
class IdentityTrainConfig(BanditLoopConfig):
    """Bandit training of the identity policy: the shared loop settings (other defaults) plus augmentations."""

    epochs: int = 40
    """Passes over the training prompts; each draws fresh preferences, subsets, prices and actions."""
    learning_rate: float = 1e-3
    """Adam learning rate."""
    entropy_coef_start: float = 0.02
    """Entropy bonus at the start (decays linearly)."""
    entropy_coef_end: float = 0.001
    """Entropy bonus at the end."""
    subset_probability: float = 0.5
    """Probability that a training request offers a random subset of the pool instead of all of it."""
    min_candidates: int = 2
    """Smallest random subset offered (capped at the pool size)."""
    price_jitter: float = 0.5
    """Std of the log-normal factor on each offered price (and on the cost charged for it); 0 = off."""
    quiz_augmentation: float = 0.3
    """Probability that a candidate's identity is replaced by a posterior fitted from a small random quiz."""
    quiz_sizes: list[int] = field(default_factory=lambda: [10, 20, 30, 50])
    """Quiz sizes of those replacement posteriors."""
    quiz_bank_size: int = 8
    """Replacement posteriors precomputed per model."""
    irt_pulls_per_prompt: int = 0
    """Outcomes per prompt the IRT may see (random models, a sparse log); 0 = every logged outcome."""
    irt: IrtConfig = field(default_factory=IrtConfig)
    """The variational IRT model that gives each model its identity."""
    network: IdentityNetworkConfig = field(default_factory=IdentityNetworkConfig)
    """Network shape."""

    def validate(self) -> None:
        super().validate()
        for name in ("subset_probability", "quiz_augmentation"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"train.{name} must be in [0, 1]")
        if self.min_candidates < 1:
            raise ValueError("train.min_candidates must be >= 1")
        if self.price_jitter < 0:
            raise ValueError("train.price_jitter must be >= 0")
        if not self.quiz_sizes or min(self.quiz_sizes) < 1:
            raise ValueError("train.quiz_sizes must be a non-empty list of sizes >= 1")
        if self.quiz_bank_size < 0:
            raise ValueError("train.quiz_bank_size must be >= 0")
        if self.irt_pulls_per_prompt < 0:
            raise ValueError("train.irt_pulls_per_prompt must be >= 0")
        self.irt.validate()
        self.network.validate()


def registry_from_irt(irt: IrtModel, data: RoutingData, prices: dict[str, float] | None = None) -> ModelRegistry:
    """A registry of the IRT's models: identity = posterior, price = mean logged cost per call."""
    mu, sigma = irt.posterior()
    entries = []
    for k, name in enumerate(irt.models):
        col = data.model_index(name)
        price = (prices or {}).get(name, float(np.mean(data.costs[:, col])))
        entries.append(
            ModelEntry(
                name=name,
                price=price,
                mu=[float(v) for v in mu[k]],
                sigma=[float(v) for v in sigma[k]],
                n_observations=int((~np.isnan(data.scores[:, col])).sum()),
                source="irt",
                added_at=time.time(),
            )
        )
    return ModelRegistry(irt.dim, entries)


def sparse_log_scores(scores: np.ndarray, pulls_per_prompt: int, rng: np.random.Generator) -> np.ndarray:
    """Keep ``pulls_per_prompt`` random observed outcomes per prompt (the rest NaN): a sparse log."""
    out = np.full_like(scores, np.nan)
    n, k = scores.shape
    for i in range(n):
        keep = rng.permutation(k)[:pulls_per_prompt]
        out[i, keep] = scores[i, keep]
    return out


def quiz_bank(
    item_maps: ItemMaps,
    embeddings: np.ndarray,
    scores: np.ndarray,
    config: IdentityTrainConfig,
    rng: np.random.Generator,
    population: tuple[np.ndarray, np.ndarray] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """(mu, sigma), each (K, R, d): R posteriors per model, each fitted from a small random quiz
    under the population prior (as onboarding does), ``population`` = (mu, sigma) of the pool."""
    n, k = scores.shape
    r = config.quiz_bank_size
    cols = np.full((n, k * r), np.nan, dtype=np.float32)
    for m in range(k):
        observed = np.flatnonzero(~np.isnan(scores[:, m]))
        for j in range(r):
            size = min(int(rng.choice(config.quiz_sizes)), len(observed))
            if size == 0:
                continue
            rows = rng.choice(observed, size=size, replace=False)
            cols[rows, m * r + j] = scores[rows, m]
    prior_mu, prior_std = population_prior(*population) if population is not None and len(population[0]) >= 2 else (None, None)
    mu, sigma = fit_identities(item_maps, embeddings, cols, config.irt, prior_std=prior_std, prior_mu=prior_mu)
    d = item_maps.dim
    return mu.reshape(k, r, d), sigma.reshape(k, r, d)


def train_identity_policy(
    data: RoutingData,
    embeddings: np.ndarray,
    config: IdentityTrainConfig,
    encoder_config: EncoderConfig,
    encoder_id: str,
    tau: float | None = None,
    irt: IrtModel | None = None,
    device: str = "cpu",
):
    """Fit the IRT (unless given), then train the identity policy under bandit feedback.

    Returns (policy, environment with the pull log, per-epoch metrics).
    """
    config.validate()
    if len(data) != len(embeddings):
        raise ValueError(f"{len(data)} prompts but {len(embeddings)} embeddings")
    torch.manual_seed(config.seed)
    rng = np.random.default_rng(config.seed)
    aug_rng = np.random.default_rng([config.seed, 1])
    generator = torch.Generator(device="cpu").manual_seed(config.seed)

    tau = fit_tau(data.costs, config.tau_quantile) if tau is None else float(tau)
    if irt is None:
        scores = data.scores
        if config.irt_pulls_per_prompt > 0:
            scores = sparse_log_scores(scores, config.irt_pulls_per_prompt, np.random.default_rng([config.seed, 2]))
        irt_cfg = IrtConfig(**{**asdict(config.irt), "seed": config.seed})
        irt = fit_irt(embeddings, scores, data.models, irt_cfg)
    elif list(irt.models) != list(data.models):
        raise ValueError(f"the IRT model knows {irt.models}, the data has {list(data.models)}")
    registry = registry_from_irt(irt, data)

    meta = IdentityMeta(
        models=list(data.models),
        tau=tau,
        embed_dim=int(embeddings.shape[1]),
        identity_dim=irt.dim,
        encoder=encoder_config,
        encoder_id=encoder_id,
        network=config.network,
        irt=irt.config,
    )
    policy = IdentityPolicy(meta, registry, device=device)
    net = policy.network
    net.item_maps.load_state_dict(irt.item_maps.state_dict())
    net.item_maps.requires_grad_(False)

    k = data.n_models
    _, mu_all, sigma_all, price_all = registry.snapshot(list(data.models))
    if config.quiz_augmentation > 0 and config.quiz_bank_size > 0:
        bank_mu, bank_sigma = quiz_bank(net.item_maps, embeddings, data.scores, config, aug_rng, (mu_all, sigma_all))
    else:
        bank_mu = bank_sigma = None
    env = BanditEnvironment(data, tau)
    emb_all = torch.as_tensor(embeddings, dtype=torch.float32, device=device)
    mu_t = torch.as_tensor(mu_all, device=device)
    sigma_t = torch.as_tensor(sigma_all, device=device)
    lo = min(config.min_candidates, k)

    def step(rows: np.ndarray, w: np.ndarray, w_t: torch.Tensor):
        b_size = len(rows)
        # candidate subsets: keep the `size` models with the smallest random keys
        mask = np.ones((b_size, k), dtype=bool)
        subset = aug_rng.random(b_size) < config.subset_probability
        if subset.any() and lo < k:
            sizes = aug_rng.integers(lo, k + 1, size=b_size)
            ranks = np.argsort(np.argsort(aug_rng.random((b_size, k)), axis=1), axis=1)
            mask = np.where(subset[:, None], ranks < sizes[:, None], True)
        # identities: the full posterior, or (sometimes) a small-quiz posterior
        mu_b = mu_t.unsqueeze(0).expand(b_size, k, -1).clone()
        sigma_b = sigma_t.unsqueeze(0).expand(b_size, k, -1).clone()
        if bank_mu is not None:
            swap = aug_rng.random((b_size, k)) < config.quiz_augmentation
            if swap.any():
                pick = aug_rng.integers(0, bank_mu.shape[1], size=(b_size, k))
                ii, kk = np.nonzero(swap)
                mu_b[ii, kk] = torch.as_tensor(bank_mu[kk, pick[ii, kk]], device=device)
                sigma_b[ii, kk] = torch.as_tensor(bank_sigma[kk, pick[ii, kk]], device=device)
        # prices: log-normal jitter, charged by the environment too
        scale = np.exp(config.price_jitter * aug_rng.standard_normal((b_size, k))) if config.price_jitter > 0 else np.ones((b_size, k))
        price_n = torch.as_tensor(np.minimum(price_all[None, :] * scale / tau, 1.0), dtype=torch.float32, device=device)
        logits, value = net(emb_all[rows], w_t, mu_b, sigma_b, price_n, torch.as_tensor(mask, device=device))
        return logits, value, scale

    with single_threaded_torch():
        history = bandit_training_loop(
            net, step, env, config, rng, generator, device, desc="training identity policy (bandit feedback)"
        )
    net.eval()
    meta.training = {
        "config": to_dict(config),
        "data_fingerprint": data.fingerprint(),
        "n_prompts": len(data),
        "final_mean_reward": history[-1]["mean_reward"],
        "pulls": int(sum(len(p["row"]) for p in env.pulls)),
        "irt_observations": int((~np.isnan(data.scores)).sum()) if config.irt_pulls_per_prompt == 0 else len(data) * config.irt_pulls_per_prompt,
    }
    return policy, env, history


def identity_online_step(
    network: torch.nn.Module,
    optimiser: torch.optim.Optimizer,
    batch: dict[str, torch.Tensor],
    entropy_coef: float,
    value_coef: float,
    importance_clip: float,
    grad_clip: float,
) -> dict[str, float]:
    """One Adam step of the identity network on LOGGED decisions: the loss of the offline loop
    (``bandit_training_loop``: REINFORCE + learned baseline + entropy), weighted by the clipped
    importance weight pi(a) / mu(a) of the propensity each decision was logged with (the data comes
    from older weights). ``batch``: obs (B, D), w_cost (B,), mu / sigma (1, K, d), price_n (1, K),
    mask (B, K) bool, actions (B,), rewards (B,), propensities (B,)."""
    network.train()
    logits, value = network(batch["obs"], batch["w_cost"], batch["mu"], batch["sigma"], batch["price_n"], batch["mask"])
    network.eval()
    loss_logits = logits.masked_fill(torch.isneginf(logits), TRAIN_MASKED_LOGIT)
    actions, rewards = batch["actions"].long(), batch["rewards"].float()
    pi_a = torch.softmax(loss_logits, dim=-1).gather(1, actions.unsqueeze(1)).squeeze(1)
    iw = clipped_importance_weights(pi_a.detach(), batch["propensities"].float(), importance_clip)
    pg_loss, stats = reinforce_loss(loss_logits, actions, rewards, value, entropy_coef, iw)
    loss = pg_loss + value_coef * value_loss(value, rewards)
    optimiser.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_([p for p in network.parameters() if p.requires_grad], grad_clip)
    optimiser.step()
    return {"total_loss": float(loss.detach()), "entropy": float(stats["entropy"]), "mean_importance_weight": float(iw.mean())}
