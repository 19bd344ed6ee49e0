"""A routing policy over ANY set of candidate models: shared weights, per-model identities.

BaRP (``policy/barp.py``) has one output per known model, so a new model
means retraining. This policy instead scores each CANDIDATE from

* the prompt embedding x (frozen encoder),
* the preference w = (1 - w_cost, w_cost),
* the candidate's identity: the posterior mean and std of its IRT ability
  vector (``policy/irt.py``), and the IRT's prediction for (x, candidate):
  logit mean / std and expected score p_hat = E_q[sigmoid(a(x).theta - b(x))],
* the candidate's CURRENT price, normalised like the reward: min(price / tau, 1),

(by default the prompt and the identity reach the shared MLP through the IRT terms only, see
``prompt_features`` / ``identity_features``: that generalised better to onboarded models), with the
same weights for every candidate, then normalises with a softmax across the candidates offered. Everything model-specific
comes from the model registry (``policy/model_registry.py``), read at every
decision: registering a model makes it routable immediately, and a price
change changes the routing immediately, with no retraining.

::

    x ──> prompt proj ─┐
    w ──> pref MLP ────┼─> candidate MLP (shared) ─> [set attention across the
    per candidate: ────┘    offered candidates]     ─> score head ─> logit_k
      mu, log sigma, p_hat, logit moments, price_n        + beta * ((1-w) p_hat_k - w price_n_k)
                                                                          │
                                          masked softmax over candidates <┘

Permutation invariance: candidates carry no position (no positional code,
attention and pooling are symmetric), so reordering the candidates reorders
the logits the same way and the probability of each model is unchanged.
Any number of candidates >= 1 works; an empty candidate set is an error.

The ``beta * ((1 - w) p_hat - w price_n)`` term is the reward the IRT
predicts; it makes the untrained network a sensible plug-in router, and,
as beta >= 0 and the learned correction on top is bounded
(``correction_bound * tanh``), a large enough price change always moves
traffic the right way. The MLP and the attention learn that correction from
bandit feedback only.

Training lives in ``policy/identity_train.py`` (:func:`train_identity_policy`).
State, snapshots, checkpoints and ``decide`` are ``policy.base.PolicyBase``'s;
the identity policy adds its registry to each. Served logits (:meth:`IdentityPolicy.logits`)
keep freshly onboarded models inside a probability band (policy/fresh_models.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from banditroute.policy.barp import preference_features
from banditroute.policy.base import CHECKPOINT_FORMAT, PolicyBase
from banditroute.policy.candidate_mask import CandidateMask, as_candidate_mask as _as_candidate_mask
from banditroute.policy.decide import DEFAULT_BOUNDS, Decisions, decide
from banditroute.policy.encoders import EncoderConfig
from banditroute.policy.exploration import ExplorationBounds
from banditroute.policy.fresh_models import FreshModelConfig, band_logits, fresh_columns
from banditroute.policy.irt import IrtConfig, ItemMaps, expected_probability, logit_moments
from banditroute.policy.model_registry import REGISTRY_FILE, ModelRegistry, UnknownModelError

KIND = "identity"
DEFAULT_REGISTRY_REFRESH_S = 0.5
"""A checkpoint-loaded policy re-reads its registry document this often while routing, so an admin change
(serve/pool_admin.py) reaches every replica within a second."""


class CandidateSetError(ValueError):
    """A request offered no candidate (or a mask does not fit the pool)."""


# --- configuration -----------------------------------------------------------------------


@dataclass
class IdentityNetworkConfig:
    """Shape of the identity policy network."""

    hidden_dim: int = 128
    """Width of the shared per-candidate MLP and of the attention layer."""
    prompt_dim: int = 64
    """Width of the projected prompt embedding."""
    preference_dim: int = 16
    """Output width of the preference encoder MLP."""
    prompt_features: bool = False
    """Also feed the projected prompt embedding to the candidate MLP (default off: the prompt
    then acts through the IRT's item maps, i.e. p_hat and the logit moments, which generalised
    better in the onboarding evaluation; the raw embedding lets the MLP memorise prompts)."""
    identity_features: bool = False
    """Also feed the raw identity (posterior mean and log std) to the candidate MLP, besides the
    IRT prediction it implies (False: the candidate is seen only through p_hat, the logit
    moments and its price, so a new model's correction cannot depend on where its vector lies)."""
    set_attention: bool = True
    """One self-attention layer across the offered candidates (each sees its alternatives)."""
    attention_heads: int = 4
    """Heads of the candidate self-attention (must divide hidden_dim)."""
    reward_prior: bool = True
    """Add beta * ((1 - w) * p_hat - w * price_n) to each logit (IRT-predicted reward, beta >= 0 learned)."""
    reward_prior_init: float = 20.0
    """Initial beta of the reward-prior term (logit units per unit of predicted reward)."""
    correction_bound: float = 1.0
    """The learned per-candidate correction is bound * tanh(raw / bound), so it cannot bury a
    candidate for good (REINFORCE never revisits a model at probability ~0); 0 = unbounded."""

    def validate(self) -> None:
        if min(self.hidden_dim, self.prompt_dim, self.preference_dim) < 1:
            raise ValueError("identity_network: hidden_dim, prompt_dim and preference_dim must be >= 1")
        if self.attention_heads < 1 or self.hidden_dim % self.attention_heads:
            raise ValueError("identity_network.attention_heads must be >= 1 and divide hidden_dim")
        if self.reward_prior_init <= 0:
            raise ValueError("identity_network.reward_prior_init must be > 0")
        if self.correction_bound < 0:
            raise ValueError("identity_network.correction_bound must be >= 0")


@dataclass
class IdentityMeta:
    """Everything besides the weights and the registry that an identity checkpoint carries."""

    models: list[str]
    """The pool when the checkpoint was written (informative: the registry is authoritative)."""
    tau: float
    """Cost normalisation: cost penalty = min(cost / tau, 1) (USD)."""
    embed_dim: int
    """Width of the prompt embedding the network expects."""
    identity_dim: int
    """Dimensions of a model's identity (IRT ability) vector."""
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    """The frozen encoder the policy was trained on (must match at serve time)."""
    encoder_id: str = ""
    """The encoder's vector id (cache key); checked when serving."""
    network: IdentityNetworkConfig = field(default_factory=IdentityNetworkConfig)
    """Network shape."""
    irt: IrtConfig = field(default_factory=IrtConfig)
    """IRT settings (used again to fit new models' identities when onboarding)."""
    fresh_models: FreshModelConfig = field(default_factory=FreshModelConfig)
    """Serving: the probability band of freshly onboarded models (policy/fresh_models.py)."""
    registry_uri: str = ""
    """Where the live registry lives ('' = registry.json next to the weights; or a path / s3:// URI)."""
    policy_version: int = 0
    """Version of these weights: from the snapshot or checkpoint they came in."""
    created_at: float = 0.0
    """Unix time the checkpoint was written."""
    training: dict[str, Any] = field(default_factory=dict)
    """Free-form provenance: training config, data fingerprint, metrics."""
    format: int = CHECKPOINT_FORMAT
    """Checkpoint format number."""
    kind: str = KIND
    """Policy family ('identity'); ``banditroute.policy.checkpoint.POLICY_KINDS`` maps it to the class."""


# --- network ---------------------------------------------------------------------------------


class IdentityNetwork(nn.Module):
    """Logit per offered candidate from (prompt, preference, identity, price); shared weights."""

    N_EXTRA_FEATURES = 6  # p_hat, logit mean, logit std, price_n, w * price_n, (1 - w) * p_hat

    def __init__(self, embed_dim: int, irt_config: IrtConfig, config: IdentityNetworkConfig):
        super().__init__()
        self.embed_dim, self.identity_dim = int(embed_dim), int(irt_config.dim)
        self.config = config
        self.item_maps = ItemMaps(embed_dim, irt_config)
        self.item_maps.requires_grad_(False)  # frozen: fitted by the IRT, shared with onboarding
        h = config.hidden_dim
        self.preference_encoder = nn.Sequential(
            nn.Linear(2, config.preference_dim), nn.ReLU(), nn.Linear(config.preference_dim, config.preference_dim), nn.ReLU()
        )
        self.prompt_proj = nn.Sequential(nn.Linear(embed_dim, config.prompt_dim), nn.ReLU())
        n_feat = 2 * self.identity_dim + self.N_EXTRA_FEATURES
        self.candidate_mlp = nn.Sequential(
            nn.Linear(config.prompt_dim + config.preference_dim + n_feat, h), nn.ReLU(), nn.Linear(h, h), nn.ReLU()
        )
        if config.set_attention:
            self.attention = nn.MultiheadAttention(h, config.attention_heads, batch_first=True)
            self.attention_norm = nn.LayerNorm(h)
            self.attention_ff = nn.Sequential(nn.Linear(h, h), nn.ReLU(), nn.Linear(h, h))
        self.score_head = nn.Linear(h, 1)
        with torch.no_grad():  # start as the plug-in router of the reward prior; learn corrections
            self.score_head.weight.zero_()
            self.score_head.bias.zero_()
        self.value_head = nn.Sequential(nn.Linear(h + config.prompt_dim + config.preference_dim, h), nn.ReLU(), nn.Linear(h, 1))
        # softplus^-1(init): beta starts at reward_prior_init
        self.reward_prior_raw = nn.Parameter(torch.tensor(math.log(math.expm1(config.reward_prior_init))))

    def forward(
        self,
        embeddings: torch.Tensor,
        w_cost: torch.Tensor,
        mu: torch.Tensor,
        sigma: torch.Tensor,
        price_norm: torch.Tensor,
        mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(masked logits (B, K), value (B,)).

        embeddings (B, D); w_cost (B,); mu, sigma (B or 1, K, d); price_norm
        (B or 1, K) = min(price / tau, 1); mask (B, K) bool (True = offered).
        """
        emb = embeddings.float()
        b_size = emb.shape[0]
        k = mu.shape[1]
        mu = mu.float().expand(b_size, k, -1)
        sigma = sigma.float().expand(b_size, k, -1)
        price_norm = price_norm.float().expand(b_size, k)
        w = w_cost.reshape(-1, 1).float().expand(b_size, 1)
        with torch.no_grad():
            a, b = self.item_maps(emb)
        mean, var = logit_moments(a[:, None, :], b[:, None], mu, sigma)  # (B, K)
        p_hat = expected_probability(mean, var)
        if not self.config.identity_features:
            mu, sigma = torch.zeros_like(mu), torch.ones_like(sigma)
        feats = torch.cat(
            [
                mu,
                torch.log(sigma.clamp(min=1e-4)),
                p_hat.unsqueeze(-1),
                (mean / 4.0).clamp(-5, 5).unsqueeze(-1),
                torch.sqrt(var).clamp(max=10).unsqueeze(-1),
                price_norm.unsqueeze(-1),
                (w * price_norm).unsqueeze(-1),
                ((1 - w) * p_hat).unsqueeze(-1),
            ],
            dim=-1,
        )
        pref = self.preference_encoder(preference_features(w.reshape(-1)))  # (B, P)
        px = self.prompt_proj(emb)  # (B, Hp)
        if not self.config.prompt_features:
            px = torch.zeros_like(px)
        context = torch.cat([px, pref], dim=-1)
        h = self.candidate_mlp(torch.cat([context[:, None, :].expand(b_size, k, -1), feats], dim=-1))  # (B, K, H)
        if mask is None:
            mask = torch.ones(b_size, k, dtype=torch.bool, device=emb.device)
        mask = mask.bool()
        if self.config.set_attention:
            attn, _ = self.attention(h, h, h, key_padding_mask=~mask, need_weights=False)
            h = self.attention_norm(h + attn)
            h = h + self.attention_ff(h)
        logits = self.score_head(h).squeeze(-1)
        bound = self.config.correction_bound
        if bound > 0:
            logits = bound * torch.tanh(logits / bound)
        if self.config.reward_prior:
            beta = F.softplus(self.reward_prior_raw)
            logits = logits + beta * ((1 - w) * p_hat - w * price_norm)
        logits = logits.masked_fill(~mask, float("-inf"))
        m = mask.unsqueeze(-1).float()
        pooled = (h * m).sum(1) / m.sum(1).clamp(min=1.0)
        value = self.value_head(torch.cat([pooled, context], dim=-1)).squeeze(-1)
        return logits, value


# --- the policy --------------------------------------------------------------------------------


@dataclass
class IdentityDecisions(Decisions):
    """Decisions plus the pool their indices refer to (the registry may change afterwards)."""

    models: list[str] = field(default_factory=list)
    """Model names: action k means models[k]; probabilities' columns follow it."""


class IdentityPolicy(PolicyBase):
    """Identity network + registry (pool, identities, live prices) + tau + encoder.

    A :class:`banditroute.policy.base.RoutingPolicy` whose ``models`` is the
    registry's current pool; its state and checkpoints carry the registry.
    """

    kind = KIND
    meta_class = IdentityMeta

    def __init__(
        self,
        meta: IdentityMeta,
        registry: ModelRegistry,
        network: IdentityNetwork | None = None,
        device: str | torch.device = "cpu",
    ):
        if registry.dim != meta.identity_dim:
            raise ValueError(f"registry identities have {registry.dim} dimensions, the policy expects {meta.identity_dim}")
        self.meta = meta
        self.registry = registry
        self.device = torch.device(device)
        self.network = (network or IdentityNetwork(meta.embed_dim, meta.irt, meta.network)).to(self.device)
        self.network.eval()
        self.registry_version_used: int | None = None
        """Registry version of the last batch decided (serve/core.py records it with each decision)."""

    # --- what serving reads ------------------------------------------------------------

    @property
    def models(self) -> list[str]:
        """The routable pool now (the registry's active models)."""
        self.registry.maybe_refresh()
        return self.registry.models

    @property
    def item_maps(self) -> ItemMaps:
        """The frozen IRT item maps (quiz selection and identity fitting use them)."""
        return self.network.item_maps

    def candidate_mask(self, candidates: Sequence[Sequence[str] | None] | None, batch: int) -> CandidateMask:
        """Boolean (B, K) mask over ``models`` from per-row lists of names (None = every model).

        Unknown names raise UnknownModelError (a KeyError); an empty list
        raises CandidateSetError. The mask remembers the pool it was built
        against, so a registry change before :meth:`decide` is handled.
        """
        models = self.models
        mask = np.ones((batch, len(models)), dtype=bool)
        if candidates is not None:
            if len(candidates) != batch:
                raise CandidateSetError(f"{len(candidates)} candidate lists for a batch of {batch}")
            index = {m: k for k, m in enumerate(models)}
            for row, names in enumerate(candidates):
                if names is None:
                    continue
                if len(names) == 0:
                    raise CandidateSetError(f"request {row}: empty candidate set")
                mask[row] = False
                for name in names:
                    if name not in index:
                        raise UnknownModelError(f"request {row}: unknown model {name!r}; routable models: {models}")
                    mask[row, index[name]] = True
        if not models:
            raise CandidateSetError("the registry holds no routable model")
        return _as_candidate_mask(mask, models)

    def _align_mask(self, mask, names: list[str], batch: int) -> np.ndarray:
        if mask is None:
            return np.ones((batch, len(names)), dtype=bool)
        mask_models = getattr(mask, "models", None)
        arr = np.asarray(mask, dtype=bool)
        if arr.ndim == 1:
            arr = np.broadcast_to(arr, (batch, arr.shape[0]))
        if mask_models is not None and list(mask_models) != names:
            # The pool changed since the mask was built: re-map its columns by name.
            index = {m: k for k, m in enumerate(names)}
            out = np.zeros((arr.shape[0], len(names)), dtype=bool)
            for j, name in enumerate(mask_models):
                if name in index:
                    out[:, index[name]] = arr[:, j]
            arr = out
        elif arr.shape[1] != len(names):
            raise CandidateSetError(f"candidate mask has {arr.shape[1]} columns but the pool has {len(names)} models")
        if arr.shape[0] != batch:
            raise CandidateSetError(f"candidate mask has {arr.shape[0]} rows for a batch of {batch}")
        empty = ~arr.any(axis=1)
        if empty.any():
            raise CandidateSetError(f"request {int(np.flatnonzero(empty)[0])}: empty candidate set")
        return arr

    @torch.inference_mode()
    def logits_for(
        self,
        embeddings,
        w_cost,
        mask=None,
        names: Sequence[str] | None = None,
        prices: Sequence[float] | None = None,
        band_fresh: bool = False,
    ) -> tuple[torch.Tensor, list[str]]:
        """(masked logits (B, K), the K model names they refer to), from ONE registry snapshot (its
        version is left in ``registry_version_used``); ``band_fresh``: fresh models' probabilities
        moved into the ``meta.fresh_models`` band (policy/fresh_models.py)."""
        self.network.eval()
        self.registry.maybe_refresh()
        view = self.registry.view(names)
        pool, mu, sigma, price = view.names, view.mu, view.sigma, view.price
        self.registry_version_used = view.version
        if not pool:
            raise CandidateSetError("no candidate: the registry holds no routable model" if names is None else "empty candidate set")
        if prices is not None:
            price = np.asarray(prices, dtype=np.float64)
            if price.shape != (len(pool),) or not np.isfinite(price).all() or (price < 0).any():
                raise ValueError(f"prices must be {len(pool)} finite numbers >= 0")
        # numpy or torch inputs (torch tensors may already be on the policy's device: serving)
        if torch.is_tensor(embeddings):
            emb = embeddings.to(self.device, torch.float32)
        else:
            emb = torch.as_tensor(np.asarray(embeddings, dtype=np.float32), device=self.device)
        if emb.ndim == 1:
            emb = emb.unsqueeze(0)
        if emb.shape[1] != self.meta.embed_dim:
            raise ValueError(f"embeddings of width {emb.shape[1]}, the policy expects {self.meta.embed_dim}")
        b_size = emb.shape[0]
        if torch.is_tensor(w_cost):
            w = w_cost.to(self.device, torch.float32).reshape(-1)
        else:
            w = torch.as_tensor(np.asarray(w_cost, dtype=np.float32), device=self.device).reshape(-1)
        if w.numel() == 1 and b_size != 1:
            w = w.expand(b_size)
        if w.numel() != b_size:
            raise ValueError(f"{w.numel()} preferences for a batch of {b_size}")
        if torch.is_tensor(mask):
            mask_t = mask.to(self.device, torch.bool)
            if mask_t.shape != (b_size, len(pool)):
                raise CandidateSetError(f"candidate mask of shape {tuple(mask_t.shape)}, expected ({b_size}, {len(pool)})")
            if not bool(mask_t.any(dim=1).all()):
                raise CandidateSetError("a request has an empty candidate set")
        else:
            mask_t = torch.as_tensor(self._align_mask(mask, pool, b_size), device=self.device)
        price_n = torch.as_tensor(np.minimum(price / self.meta.tau, 1.0), dtype=torch.float32, device=self.device)
        logits, _ = self.network(
            emb,
            w,
            torch.as_tensor(mu, device=self.device)[None],
            torch.as_tensor(sigma, device=self.device)[None],
            price_n[None],
            mask_t,
        )
        fresh = fresh_columns(view.n_observations, self.meta.fresh_models)
        if band_fresh and any(fresh):
            cfg = self.meta.fresh_models
            logits = band_logits(logits, torch.as_tensor(fresh, device=logits.device), cfg.floor, cfg.cap)
        return logits, pool

    def logits(self, embeddings, w_cost, mask=None) -> torch.Tensor:
        """Masked logits (B, K) over ``models`` (numpy or device tensors), as SERVED: fresh models
        banded (``meta.fresh_models``). Build the mask from ``models`` read just before: the pool is live."""
        return self.logits_for(embeddings, w_cost, mask, band_fresh=True)[0]

    def decide(
        self,
        embeddings,
        w_cost,
        mask=None,
        explore: bool = False,
        generator: torch.Generator | None = None,
        bounds: ExplorationBounds = DEFAULT_BOUNDS,
        prices: Sequence[float] | None = None,
        band_fresh: bool = False,
    ) -> IdentityDecisions:
        """Route a batch: sample within ``bounds`` (explore) or argmax (greedy) over each row's candidates.
        Offline evaluators call this with the raw policy (``band_fresh`` False); serving goes through :meth:`logits`."""
        logits, pool = self.logits_for(embeddings, w_cost, mask, prices=prices, band_fresh=band_fresh)
        return IdentityDecisions(*Decisions.host_columns(decide(logits, explore, bounds, generator)), models=pool)

    def probabilities(self, embeddings, w_cost, candidates: Sequence[str]) -> dict[str, np.ndarray]:
        """{model: probability (B,)} when only ``candidates`` (in any order) are offered."""
        if len(candidates) == 0:
            raise CandidateSetError("empty candidate set")
        logits, pool = self.logits_for(embeddings, w_cost, None, names=list(candidates))
        probs = torch.softmax(logits, dim=-1).cpu().numpy()
        return {name: probs[:, k] for k, name in enumerate(pool)}

    # --- what the registry adds to state and checkpoints ---------------------------------

    def _extra_state(self) -> dict[str, Any]:
        return {"registry": self.registry.to_dict()}

    @classmethod
    def _new_from_state(cls, meta: IdentityMeta, state: dict[str, Any], device: str | torch.device) -> "IdentityPolicy":
        """With ``meta.registry_uri`` set, the LIVE registry there (re-read while routing: replicas and the
        online learner built from weights snapshots see admin changes and refined identities); else the
        state's copy. A live location not written yet starts from the state's copy, persisted there on change."""
        if meta.registry_uri:
            try:
                registry = ModelRegistry.load(meta.registry_uri, auto_refresh_s=DEFAULT_REGISTRY_REFRESH_S)
            except FileNotFoundError:
                registry = ModelRegistry.from_dict(state["registry"], path=meta.registry_uri,
                                                   auto_refresh_s=DEFAULT_REGISTRY_REFRESH_S)
            return cls(meta, registry, device=device)
        return cls(meta, ModelRegistry.from_dict(state["registry"]), device=device)

    def _load_network_weights(self, tensors: dict[str, torch.Tensor]) -> None:
        self.network.load_state_dict(tensors)
        self.network.item_maps.requires_grad_(False)

    def _save_extra(self, directory: Path, registry_path: str | Path | None = None) -> None:
        """The registry goes to ``registry_path``, else the meta's location, else ``registry.json`` beside the weights."""
        self.meta.models = self.registry.models
        if registry_path is None and self.meta.registry_uri and self.registry.path == str(self.meta.registry_uri):
            return  # the live document: every change persists itself; rewriting this copy could undo a newer change
        self.registry.save(registry_path or self.meta.registry_uri or directory / REGISTRY_FILE)

    @classmethod
    def _new_from_checkpoint(
        cls, meta: IdentityMeta, directory: Path, device: str | torch.device,
        registry_refresh_s: float | None = DEFAULT_REGISTRY_REFRESH_S,
    ) -> "IdentityPolicy":
        """With the registry at its live location, re-read every ``registry_refresh_s`` seconds while
        routing (None = never), so another process's change (admin API, price config) applies."""
        registry = ModelRegistry.load(meta.registry_uri or directory / REGISTRY_FILE, auto_refresh_s=registry_refresh_s)
        return cls(meta, registry, device=device)
