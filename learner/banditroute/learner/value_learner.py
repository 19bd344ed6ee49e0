"""Online learner of the value policy (learner kind ``value``): per-model score and cost regression from the log.

Each joined event is one pull: the chosen model's observed score and
normalised cost (``learner.rows``), whatever the preference and whichever
policy version chose it, so no importance weights are needed. Every pull
goes to a replay ring of ``learner.replay_capacity`` rows with one Poisson(1)
weight per bootstrap head; each update takes ``learner.value.gradient_steps``
Adam steps on ``learner.value.replay_sample`` pulls drawn from the replay, with the
same loss and step as the offline trainer (``policy.value_train``:
``value_gradient_step``, ``bootstrap_weights``). Exploration is the policy's
(Thompson over the heads, logged with its propensity), so OPE and the
promotion gate see it like any other kind.

Plain torch, not RLlib's TorchLearner: the update is a supervised regression
with per-head bootstrap weights (no returns, advantages or importance
weights), and sharing one step function with the offline trainer keeps the
two identical; RLlib would only wrap the same Adam step.
"""

from __future__ import annotations

import time
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
from banditroute.policy.value_policy import ValuePolicy
from banditroute.policy.value_train import bootstrap_weights, value_gradient_step

OBS, ACTIONS, SCORE, COST, HEAD_WEIGHTS = "obs", "actions", "score", "cost", "head_weights"


class ValueLearner(LearnerBase):
    """Trains a :class:`ValuePolicy` in place from joined events; same contract as BaRP's ``OnlineLearner``."""

    kind = ValuePolicy.kind

    def __init__(self, policy: ValuePolicy, config: LearnerConfig | None = None, learner_state: bytes | None = None):
        self.config = config or LearnerConfig()
        self.config.validate()
        if policy.kind != self.kind:
            raise ValueError(f"ValueLearner trains 'value' policies, not {policy.kind!r}")
        torch.manual_seed(self.config.seed)
        self.policy = policy
        self.settings = self.config.value
        self.optimiser = self._new_optimiser()
        if learner_state is not None:
            self.optimiser.load_state_dict(optimizer_state_from_bytes(learner_state))
        self.replay = ReplayBuffer(self.config.replay_capacity, self.config.seed)
        self.rng = np.random.default_rng(self.config.seed)
        self._start_counts()

    def _new_optimiser(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.policy.network.parameters(), lr=self.config.learning_rate,
                                weight_decay=self.settings.weight_decay)

    def update(self, events: pa.Table | EventBatch | Sequence[JoinedEvent], trained_through: float | None = None) -> dict[str, Any]:
        """Add the events' pulls to the replay and take the configured Adam steps; bumps the version if any row was valid."""
        start = time.perf_counter()
        if trained_through is None:
            trained_through = reward_time_max(events)
        rows = events_to_rows(events, self.policy)
        count_skipped(self.skipped, rows.skipped)
        metrics: dict[str, Any] = {"events": len(rows), "skipped": dict(rows.skipped)}
        if len(rows) == 0:
            metrics.update(updated=False, policy_version=self.policy_version)
            return metrics
        fresh = {OBS: rows.obs, ACTIONS: rows.actions, SCORE: rows.scores, COST: rows.costs,
                 HEAD_WEIGHTS: bootstrap_weights(self.rng, len(rows), self.policy.network.n_heads, self.settings.bootstrap)}
        self.replay.add(fresh)
        losses, batch_rows = [], 0
        for _ in range(self.settings.gradient_steps):
            batch = self.replay.sample(self.settings.replay_sample)
            batch = batch if batch is not None else fresh  # replay off (capacity 0): the fresh pulls only
            batch_rows += len(batch[ACTIONS])
            losses.append(self._step(batch))
        self._commit_update(len(rows), trained_through)
        metrics.update(
            updated=True,
            policy_version=self.policy_version,
            batch_rows=batch_rows,
            mean_reward=float(rows.rewards.mean()),
            total_loss=float(np.mean(losses)),
            replay_size=int(self.replay.size),
            update_s=time.perf_counter() - start,
        )
        return metrics

    def _step(self, batch: dict[str, np.ndarray]) -> float:
        device = self.policy.device
        t = {k: torch.as_tensor(v, device=device) for k, v in batch.items()}
        return value_gradient_step(self.policy.network, self.optimiser, t[OBS].float(), t[ACTIONS], t[SCORE], t[COST],
                                   t[HEAD_WEIGHTS], self.settings.cost_loss_weight, self.config.grad_clip)

    def optimizer_state_bytes(self) -> bytes:
        return optimizer_state_to_bytes(self.optimiser.state_dict())

    def rebase(self, policy: ValuePolicy) -> None:
        """Train on from ``policy``'s weights with a fresh Adam (the replay is kept); the weights get the next version."""
        if policy.kind != self.kind or policy.models != self.policy.models:
            raise ValueError(f"rebase: a {policy.kind!r} policy over {policy.models} cannot replace this learner's weights")
        self.policy.network.load_state_dict({k: v.detach().clone() for k, v in policy.network.state_dict().items()})
        self.optimiser = self._new_optimiser()
        mint_version(self.policy, self.policy_version + 1)
