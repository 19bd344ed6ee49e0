"""Online learner of the identity policy (learner kind ``identity``): shared weights AND model identities from the log.

Two things learn from the same joined events:

* **The network** (shared over models): each update takes
  ``learner.gradient_steps`` Adam steps of the offline trainer's loss
  (``policy.identity_train.identity_online_step``: REINFORCE + baseline +
  entropy) on the fresh events plus ``learner.replay_sample`` replayed ones,
  weighted by the clipped importance weight pi/mu of the logged propensity.
  Events are mapped to the registry's pool BY NAME at training time: the
  replay keeps model names (a table of ``learner.identity.max_models``
  columns), so a model added, retired or repriced since an event was logged
  is handled; rows whose chosen model left the pool are dropped, and the
  features of a candidate are its identity and price now.
* **The identities** (per model): every ``learner.identity.refit_every``
  updates, each model with new scored outcomes gets its IRT posterior refitted
  with the item maps frozen (``policy.irt.fit_identities``), the prior being
  the identity the learner first saw for it (an onboarded model: its quiz
  posterior; an IRT-fitted one: its fitted posterior) and the data its
  outcomes from feedback since (the last ``max_observations_per_model``).
  ``n_observations`` grows by the outcomes seen, so a freshly onboarded model
  leaves the fresh-model band (policy/fresh_models.py) once enough feedback
  arrived. The refined identities are written to the LIVE registry document
  (``meta.registry_uri``, through ``core.storage``) with one new registry
  version, after re-reading it so an admin change made meanwhile is kept
  (``ModelRegistry.update_identities``); replicas and the pool admin re-read it
  within a second. After a learner restart the identity in the registry is
  the new prior (the outcomes behind it are counted in its n_observations).

The registry therefore has one home: the network weights travel as
WeightsSnapshots (learner -> parameter server -> replicas), the identities and
prices as the registry document; both are versioned.
"""

from __future__ import annotations

import time
from collections import deque
from types import SimpleNamespace
from typing import Any, Sequence

import numpy as np
import pyarrow as pa
import torch

from banditroute.core.records import EventBatch, JoinedEvent
from banditroute.learner.base import (
    LearnerBase,
    count_skipped,
    mint_version,
    optimizer_state_from_bytes,
    optimizer_state_to_bytes,
    reward_time_max,
)
from banditroute.learner.config import LearnerConfig
from banditroute.learner.rows import ReplayBuffer, events_to_rows
from banditroute.policy.identity_policy import IdentityPolicy
from banditroute.policy.identity_train import identity_online_step
from banditroute.policy.irt import fit_identities

OBS, W_COST, MASK, ACTION, REWARD, PROPENSITY = "obs", "w_cost", "mask", "action", "reward", "propensity"


class IdentityLearner(LearnerBase):
    """Trains an :class:`IdentityPolicy` in place and refines its registry's identities; contract of LearnerBase."""

    kind = IdentityPolicy.kind

    def __init__(self, policy: IdentityPolicy, config: LearnerConfig | None = None, learner_state: bytes | None = None):
        self.config = config or LearnerConfig()
        self.config.validate()
        if policy.kind != self.kind:
            raise ValueError(f"IdentityLearner trains 'identity' policies, not {policy.kind!r}")
        if not policy.meta.registry_uri:
            raise ValueError("meta.registry_uri: the identity learner writes refined identities to the live registry "
                             "document that replicas read; the policy's meta must name it (a path or storage URI)")
        torch.manual_seed(self.config.seed)
        self.policy = policy
        self.settings = self.config.identity
        self.optimiser = self._new_optimiser()
        if learner_state is not None:
            self.optimiser.load_state_dict(optimizer_state_from_bytes(learner_state))
        self.replay = ReplayBuffer(self.config.replay_capacity, self.config.seed)
        self.names: list[str] = []
        """Model names of the replay's columns (grows, never reordered)."""
        self.outcomes: dict[str, deque] = {}
        """Per model: its recent (embedding, score) outcomes from feedback, for identity refits."""
        self.outcome_counts: dict[str, int] = {}
        """Per model: outcomes seen since its prior was taken (all of them, not only those kept)."""
        self.priors: dict[str, tuple[float, np.ndarray, np.ndarray, int]] = {}
        """Per model: (added_at, mu, sigma, n_observations) of the identity the refits start from."""
        self.pending_refit: set[str] = set()
        self._start_counts()
        self.identity_refits = 0
        self.last_refit: dict[str, Any] = {}

    def _new_optimiser(self) -> torch.optim.Optimizer:
        return torch.optim.Adam([p for p in self.policy.network.parameters() if p.requires_grad],
                                lr=self.config.learning_rate)

    def _name_ids(self, pool: Sequence[str]) -> np.ndarray:
        """Replay column of each pool name (-1: the table is full)."""
        ids = []
        for name in pool:
            if name not in self.names and len(self.names) < self.settings.max_models:
                self.names.append(name)
            ids.append(self.names.index(name) if name in self.names else -1)
        return np.asarray(ids, dtype=np.int64)

    def update(self, events: pa.Table | EventBatch | Sequence[JoinedEvent], trained_through: float | None = None) -> dict[str, Any]:
        """Replay the events' decisions, take the configured Adam steps, refit identities when due; bumps the version."""
        start = time.perf_counter()
        if trained_through is None:
            trained_through = reward_time_max(events)
        pool = list(self.policy.models)  # ONE read of the live pool for the mapping by name
        view = SimpleNamespace(models=pool, embed_dim=self.policy.embed_dim, encoder_id=self.policy.encoder_id,
                               tau=self.policy.tau)
        rows = events_to_rows(events, view)
        ids = self._name_ids(pool)
        keep = ids[rows.actions] >= 0 if len(rows) else np.zeros(0, dtype=bool)
        if (~keep).any():
            rows.skipped["model_table_full"] = int((~keep).sum())
        count_skipped(self.skipped, rows.skipped)
        metrics: dict[str, Any] = {"events": int(keep.sum()), "skipped": dict(rows.skipped)}
        if not keep.any():
            metrics.update(updated=False, policy_version=self.policy_version)
            return metrics
        sel = np.flatnonzero(keep)
        gmask = np.zeros((len(sel), self.settings.max_models), dtype=bool)
        local = rows.mask[sel]
        valid = ids >= 0
        gmask[:, ids[valid]] = local[:, valid]
        fresh = {OBS: rows.obs[sel], W_COST: rows.w_cost[sel], MASK: gmask, ACTION: ids[rows.actions[sel]],
                 REWARD: rows.rewards[sel], PROPENSITY: rows.propensities[sel]}
        self._record_outcomes([pool[a] for a in rows.actions[sel]], rows.obs[sel], rows.scores[sel])
        self.replay.add(fresh)
        losses, batch_rows = [], 0
        for _ in range(self.config.gradient_steps):
            replayed = self.replay.sample(self.config.replay_sample)
            batch = fresh if replayed is None else {k: np.concatenate([fresh[k], replayed[k]]) for k in fresh}
            result = self._step(batch)
            if result is not None:
                batch_rows += result.pop("rows")
                losses.append(result["total_loss"])
        self._commit_update(len(sel), trained_through)
        if self.settings.refine_identities and self.updates % self.settings.refit_every == 0:
            metrics["identities_refitted"] = self.refit_identities()
        metrics.update(
            updated=True,
            policy_version=self.policy_version,
            batch_rows=batch_rows,
            mean_reward=float(rows.rewards[sel].mean()),
            total_loss=float(np.mean(losses)) if losses else None,
            replay_size=int(self.replay.size),
            update_s=time.perf_counter() - start,
        )
        return metrics

    def _step(self, batch: dict[str, np.ndarray]) -> dict[str, Any] | None:
        """One Adam step on ``batch`` (replay columns) mapped to the pool NOW; None when no row maps."""
        view = self.policy.registry.view()
        col = np.full(self.settings.max_models, -1, dtype=np.int64)
        for k, name in enumerate(view.names):
            if name in self.names:
                col[self.names.index(name)] = k
        actions = col[batch[ACTION]]
        keep = actions >= 0
        if not keep.any():
            return None
        in_pool = np.flatnonzero(col >= 0)
        mask = np.zeros((int(keep.sum()), len(view.names)), dtype=bool)
        mask[:, col[in_pool]] = batch[MASK][keep][:, in_pool]
        mask[np.arange(len(mask)), actions[keep]] = True
        device = self.policy.device
        price_n = np.minimum(view.price / self.policy.tau, 1.0)
        t = {
            "obs": torch.as_tensor(batch[OBS][keep], device=device).float(),
            "w_cost": torch.as_tensor(batch[W_COST][keep], device=device).float(),
            "mu": torch.as_tensor(view.mu, device=device)[None],
            "sigma": torch.as_tensor(view.sigma, device=device)[None],
            "price_n": torch.as_tensor(price_n, dtype=torch.float32, device=device)[None],
            "mask": torch.as_tensor(mask, device=device),
            "actions": torch.as_tensor(actions[keep], device=device),
            "rewards": torch.as_tensor(batch[REWARD][keep], device=device),
            "propensities": torch.as_tensor(batch[PROPENSITY][keep], device=device),
        }
        out = identity_online_step(self.policy.network, self.optimiser, t, self.config.entropy_coef, self.config.value_coef,
                                   self.config.importance_clip, self.config.grad_clip)
        return dict(out, rows=int(keep.sum()))

    # --- identities -------------------------------------------------------------------------

    def _record_outcomes(self, models: list[str], obs: np.ndarray, scores: np.ndarray) -> None:
        cap = self.settings.max_observations_per_model
        for name, x, s in zip(models, obs, scores):
            self.outcomes.setdefault(name, deque(maxlen=cap)).append((x, float(s)))
            self.outcome_counts[name] = self.outcome_counts.get(name, 0) + 1
            self.pending_refit.add(name)

    def refit_identities(self) -> list[str]:
        """Refit the identity of every model with new outcomes (item maps frozen; prior: the identity first seen);
        write them to the live registry (one new version). Returns the names written."""
        registry = self.policy.registry
        registry.maybe_refresh()
        irt = self.policy.meta.irt
        updates: dict[str, tuple[np.ndarray, np.ndarray, int, float]] = {}
        for name in sorted(self.pending_refit):
            if name not in registry:
                continue
            entry = registry.get(name)
            prior = self.priors.get(name)
            if prior is None or prior[0] != entry.added_at:  # first sight, or re-onboarded: a new prior
                if prior is not None:  # re-onboarded: only the outcomes still kept stand behind the refit
                    self.outcome_counts[name] = len(self.outcomes.get(name, ()))
                prior = (entry.added_at, np.asarray(entry.mu, np.float32), np.asarray(entry.sigma, np.float32),
                         int(entry.n_observations))
                self.priors[name] = prior
            kept = self.outcomes.get(name)
            if not kept:
                continue
            emb = np.stack([x for x, _ in kept]).astype(np.float32)
            scores = np.asarray([s for _, s in kept], dtype=np.float32)
            mu, sigma = fit_identities(self.policy.network.item_maps, emb, scores, irt, prior_std=prior[2], prior_mu=prior[1])
            updates[name] = (mu[0], sigma[0], prior[3] + self.outcome_counts[name], prior[0])
        self.pending_refit.clear()
        written = registry.update_identities(updates) if updates else []
        if written:
            self.identity_refits += 1
            self.last_refit = {"at": time.time(), "models": written, "registry_version": registry.version}
        return written

    # --- the contract ---------------------------------------------------------------------------

    def optimizer_state_bytes(self) -> bytes:
        return optimizer_state_to_bytes(self.optimiser.state_dict())

    def rebase(self, policy: IdentityPolicy) -> None:
        """Train on from ``policy``'s network weights with a fresh Adam (replay and identities kept); a new version."""
        if policy.kind != self.kind or policy.embed_dim != self.policy.embed_dim:
            raise ValueError(f"rebase: a {policy.kind!r} policy of embedding width {policy.embed_dim} cannot replace "
                             f"this learner's weights")
        self.policy.network.load_state_dict({k: v.detach().clone() for k, v in policy.network.state_dict().items()})
        self.policy.network.item_maps.requires_grad_(False)
        self.optimiser = self._new_optimiser()
        mint_version(self.policy, self.policy_version + 1)
