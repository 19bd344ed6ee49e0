"""Logged, joined events as training rows: validation against the policy, rewards and targets; the replay ring.

Shared by every online learner kind (``learner.registry``): BaRP's trains on
the combined reward with the logged propensity, the value learner on the
chosen model's score and normalised cost (both are in the row).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import pyarrow as pa

from banditroute.core.records import EventBatch, JoinedEvent, events_to_table
from banditroute.learner.module import MASK, PROPENSITIES, W_COST
from banditroute.policy.base import RoutingPolicy
from banditroute.policy.reward import normalised_cost, reward

from ray.rllib.core.columns import Columns  # noqa: E402


@dataclass
class TrainRows:
    """Events as the learner trains on them (after validation)."""

    obs: np.ndarray
    w_cost: np.ndarray
    mask: np.ndarray
    actions: np.ndarray
    rewards: np.ndarray
    propensities: np.ndarray
    scores: np.ndarray
    """The chosen model's observed score in [0, 1] (NaN, no recorded answer, counts as 0 as in the reward)."""
    costs: np.ndarray
    """The chosen model's normalised cost min(cost / tau, 1), clipped to [0, 1] (the value learner's cost target)."""
    skipped: dict[str, int] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.actions)

    def columns(self) -> dict[str, np.ndarray]:
        """The RLlib train-batch columns of BaRP's learner (rewards, not the score/cost split)."""
        return {
            Columns.OBS: self.obs,
            W_COST: self.w_cost,
            MASK: self.mask,
            Columns.ACTIONS: self.actions,
            Columns.REWARDS: self.rewards,
            PROPENSITIES: self.propensities,
        }


def events_to_rows(
    events: pa.Table | EventBatch | Sequence[JoinedEvent], policy: RoutingPolicy
) -> TrainRows:
    """Validate events against the policy; compute rewards and the score / normalised-cost targets (with its tau).

    Rows are skipped (and counted in ``skipped``) when the chosen model is not
    in the policy's pool, the embedding has the wrong width, the encoder id
    differs from the policy's, or numbers are not finite. Logged candidates
    outside the pool are ignored (the mask only covers models the policy knows).
    """
    skipped: dict[str, int] = {}
    if not isinstance(events, (pa.Table, EventBatch)):
        events = events_to_table(list(events))
    if isinstance(events, pa.Table):
        table = events
        expected_id = policy.encoder_id
        if expected_id and "encoder_id" in table.column_names and len(table):
            ids = np.asarray(table.column("encoder_id").to_pylist(), dtype=object)
            ok = np.array([(not i) or i == expected_id for i in ids], dtype=bool)
            if not ok.all():
                skipped["encoder_mismatch"] = int((~ok).sum())
                table = table.filter(pa.array(ok))
        batch = EventBatch.from_table(table)
    else:
        batch = events
    n, k = len(batch), len(policy.models)
    empty = TrainRows(
        np.zeros((0, policy.embed_dim), np.float32), np.zeros(0, np.float32), np.zeros((0, k), bool),
        np.zeros(0, np.int64), np.zeros(0, np.float32), np.zeros(0, np.float32), np.zeros(0, np.float32),
        np.zeros(0, np.float32), skipped,
    )
    if n == 0:
        return empty
    if batch.embeddings.shape[1] != policy.embed_dim:
        skipped["embedding_dim"] = skipped.get("embedding_dim", 0) + n
        return empty
    index = {m: i for i, m in enumerate(policy.models)}
    actions = np.array([index.get(m, -1) for m in batch.chosen_models], dtype=np.int64)
    mask = np.zeros((n, k), dtype=bool)
    for row, names in enumerate(batch.candidates):
        if not names:
            mask[row] = True
            continue
        for name in names:
            j = index.get(name)
            if j is not None:
                mask[row, j] = True
    keep = actions >= 0
    if (~keep).any():
        skipped["unknown_model"] = int((~keep).sum())
    fallback = keep & batch.fallback_served()
    if fallback.any():  # another model answered: its outcome is not the chosen model's reward
        skipped["fallback_served"] = int(fallback.sum())
        keep &= ~fallback
    rewards = reward(batch.scores, batch.costs, batch.w_cost, policy.tau)
    finite = (
        np.isfinite(rewards)
        & np.isfinite(batch.propensities)
        & (batch.propensities > 0)
        & np.isfinite(batch.embeddings).all(axis=1)
        & (batch.w_cost >= 0)
        & (batch.w_cost <= 1)
    )
    bad = keep & ~finite
    if bad.any():
        skipped["invalid_values"] = int(bad.sum())
    keep &= finite
    rows = np.flatnonzero(keep)
    mask = mask[rows]
    mask[np.arange(len(rows)), actions[rows]] = True  # the chosen model was certainly available
    return TrainRows(
        obs=batch.embeddings[rows].astype(np.float32),
        w_cost=batch.w_cost[rows].astype(np.float32),
        mask=mask,
        actions=actions[rows],
        rewards=rewards[rows].astype(np.float32),
        propensities=np.minimum(batch.propensities[rows], 1.0).astype(np.float32),
        scores=np.clip(np.nan_to_num(batch.scores[rows].astype(np.float64), nan=0.0), 0.0, 1.0).astype(np.float32),
        costs=np.clip(normalised_cost(batch.costs[rows], policy.tau), 0.0, 1.0).astype(np.float32),
        skipped=skipped,
    )


class ReplayBuffer:
    """Ring buffer of the most recent training rows (numpy, fixed capacity)."""

    def __init__(self, capacity: int, seed: int = 0):
        self.capacity = capacity
        self.size = 0
        self._next = 0
        self._data: dict[str, np.ndarray] | None = None
        self._rng = np.random.default_rng(seed)

    def add(self, columns: dict[str, np.ndarray]) -> None:
        if self.capacity == 0:
            return
        n = len(next(iter(columns.values())))
        if n == 0:
            return
        if self._data is None:
            self._data = {k: np.zeros((self.capacity,) + v.shape[1:], v.dtype) for k, v in columns.items()}
        if n >= self.capacity:
            columns = {k: v[-self.capacity :] for k, v in columns.items()}
            n = self.capacity
        idx = (self._next + np.arange(n)) % self.capacity
        for k, v in columns.items():
            self._data[k][idx] = v
        self._next = int((self._next + n) % self.capacity)
        self.size = min(self.capacity, self.size + n)

    def sample(self, n: int) -> dict[str, np.ndarray] | None:
        if self._data is None or self.size == 0 or n <= 0:
            return None
        idx = self._rng.integers(0, self.size, size=min(n, self.size))
        return {k: v[idx] for k, v in self._data.items()}
