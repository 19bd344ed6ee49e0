"""Online, off-policy learner for the BaRP policy, on RLlib's new API stack.

Two layers:

- :class:`BanditTorchLearner` is an RLlib ``TorchLearner``: RLlib owns the
  optimizer, gradient clipping, the update loop and its metrics; we supply
  the loss hook (``compute_loss_for_module``): off-policy REINFORCE with
  clipped importance weights pi/mu, a learned value baseline and an entropy
  bonus.
- :class:`OnlineLearner` (learner kind ``barp``) turns logged, joined events
  into train batches (``learner.rows``: reward with the policy's tau,
  candidate masks from the logged candidate sets, propensities from the
  log), keeps a small replay buffer, counts the monotonic ``policy_version``
  and writes/reads checkpoints (``learner.base``). It needs no Ray
  cluster; the learner actor (:mod:`banditroute.learner.actor`) wraps it.

Off-policy correction. Events were decided by older versions of the policy
(mu = the logged probability of the chosen model; 1 for greedy decisions).
The gradient of E_pi[r] estimated from mu's data is
E_mu[(pi(a|x)/mu(a|x)) (r - V(x)) grad log pi(a|x)]; the ratio is clipped at
``importance_clip`` to bound the variance (a biased, lower-variance
estimator, as in PPO/IMPALA-style truncation).
"""

from __future__ import annotations

import time
from typing import Any, Sequence

import numpy as np
import pyarrow as pa
import torch

from banditroute.core.records import EventBatch, JoinedEvent
from banditroute.learner.base import (  # noqa: F401  (re-exported: imported from here by the actor, tests, benches)
    LearnerBase,
    as_float,
    count_skipped,
    mint_version,
    optimizer_state_from_bytes,
    optimizer_state_to_bytes,
    reward_time_max,
)
from banditroute.learner.config import LearnerConfig
from banditroute.learner.module import PROPENSITIES, BarpRLModule
from banditroute.learner.rows import ReplayBuffer, TrainRows, events_to_rows  # noqa: F401  (re-exported)
from banditroute.policy.barp import BarpPolicy
from banditroute.policy.losses import clipped_importance_weights, reinforce_loss, value_loss

from ray.rllib.algorithms.algorithm_config import AlgorithmConfig  # noqa: E402
from ray.rllib.core import COMPONENT_OPTIMIZER, DEFAULT_MODULE_ID  # noqa: E402
from ray.rllib.core.columns import Columns  # noqa: E402
from ray.rllib.core.learner.torch.torch_learner import TorchLearner  # noqa: E402
from ray.rllib.policy.sample_batch import MultiAgentBatch, SampleBatch  # noqa: E402
from ray.rllib.utils.metrics.metrics_logger import MetricsLogger  # noqa: E402


class BanditTorchLearner(TorchLearner):
    """RLlib TorchLearner whose loss hook is off-policy REINFORCE + value baseline + entropy."""

    def compute_loss_for_module(self, *, module_id, config, batch, fwd_out) -> torch.Tensor:
        settings = self.config.learner_config_dict
        logits = fwd_out[Columns.ACTION_DIST_INPUTS]
        value = fwd_out[Columns.VF_PREDS]
        actions = batch[Columns.ACTIONS].long()
        rewards = batch[Columns.REWARDS].float()
        behaviour = batch[PROPENSITIES].float()
        with torch.no_grad():
            pi_a = torch.softmax(logits.float(), dim=-1).gather(1, actions.unsqueeze(1)).squeeze(1)
            raw_iw = pi_a / behaviour.clamp(min=1e-6)
            iw = clipped_importance_weights(pi_a, behaviour, settings["importance_clip"])
        pg_loss, stats = reinforce_loss(logits, actions, rewards, value, settings["entropy_coef"], iw)
        v_loss = value_loss(value, rewards)
        total = pg_loss + settings["value_coef"] * v_loss
        for key, val in (
            ("policy_loss", stats["policy_loss"]),
            ("entropy", stats["entropy"]),
            ("value_loss", v_loss.detach()),
            ("mean_importance_weight", iw.mean()),
            ("clipped_fraction", (raw_iw > settings["importance_clip"]).float().mean()),
            ("effective_sample_size", iw.sum() ** 2 / (iw.pow(2).sum() + 1e-12)),
        ):
            self.metrics.log_value((module_id, key), float(val), window=1)
        return total


class OnlineLearner(LearnerBase):
    """RLlib learner + version counter + checkpoints for one routing policy.

    ``update(events)`` trains on a batch of joined events (pyarrow table in
    EVENT_SCHEMA, EventBatch, or JoinedEvents), bumps ``policy_version`` by
    one and returns plain-float metrics. ``snapshot()`` is the
    WeightsSnapshot to publish.
    """

    kind = BarpPolicy.kind

    def __init__(self, policy: BarpPolicy, config: LearnerConfig | None = None, learner_state: bytes | None = None):
        self.config = config or LearnerConfig()
        self.config.validate()
        torch.manual_seed(self.config.seed)
        self.policy = policy
        self.policy.network.train()
        module = BarpRLModule.from_meta(policy.meta)
        algo_config = (
            AlgorithmConfig()
            .framework("torch")
            .training(lr=self.config.learning_rate, grad_clip=self.config.grad_clip, grad_clip_by="global_norm")
            .learners(
                learner_config_dict={
                    "entropy_coef": self.config.entropy_coef,
                    "value_coef": self.config.value_coef,
                    "importance_clip": self.config.importance_clip,
                }
            )
        )
        self.rl_learner = BanditTorchLearner(config=algo_config, module=module.as_multi_rl_module())
        self.rl_learner.build()
        # RLlib builds its own module instance from the spec; give it the policy's
        # weights, then let the policy share that network so snapshots need no copy.
        self.module: BarpRLModule = self.rl_learner.module[DEFAULT_MODULE_ID]
        self.module.set_state({k: v.detach().cpu().numpy() for k, v in policy.network.state_dict().items()})
        self.policy.network = self.module.net
        # Adam before any step: what a rebase resets the optimizer to (torch.save round trip = an independent copy).
        self._fresh_optimizer_state = optimizer_state_from_bytes(self.optimizer_state_bytes())
        if learner_state is not None:
            self.rl_learner.set_state({COMPONENT_OPTIMIZER: optimizer_state_from_bytes(learner_state)})
        self.replay = ReplayBuffer(self.config.replay_capacity, self.config.seed)
        self._start_counts()

    def update(self, events: pa.Table | EventBatch | Sequence[JoinedEvent], trained_through: float | None = None) -> dict[str, Any]:
        """One learner update on ``events`` (+ replay); bumps the version if anything was trained."""
        start = time.perf_counter()
        if trained_through is None:
            trained_through = reward_time_max(events)
        rows = events_to_rows(events, self.policy)
        count_skipped(self.skipped, rows.skipped)
        metrics: dict[str, Any] = {"events": len(rows), "skipped": dict(rows.skipped)}
        if len(rows) == 0:
            metrics.update(updated=False, policy_version=self.policy_version)
            return metrics
        fresh = rows.columns()
        train = fresh
        replayed = self.replay.sample(self.config.replay_sample)
        if replayed is not None:
            train = {k: np.concatenate([fresh[k], replayed[k]]) for k in fresh}
        self.replay.add(fresh)
        batch = MultiAgentBatch({DEFAULT_MODULE_ID: SampleBatch(train)}, env_steps=len(train[Columns.ACTIONS]))
        results = self.rl_learner.update(batch=batch, num_epochs=self.config.gradient_steps)
        flat = MetricsLogger.peek_results(results).get(DEFAULT_MODULE_ID, {})
        self._commit_update(len(rows), trained_through)
        metrics.update(
            updated=True,
            policy_version=self.policy_version,
            batch_rows=int(len(train[Columns.ACTIONS])),
            mean_reward=float(rows.rewards.mean()),
            total_loss=as_float(flat.get("total_loss")),
            policy_loss=as_float(flat.get("policy_loss")),
            value_loss=as_float(flat.get("value_loss")),
            entropy=as_float(flat.get("entropy")),
            mean_importance_weight=as_float(flat.get("mean_importance_weight")),
            clipped_fraction=as_float(flat.get("clipped_fraction")),
            effective_sample_size=as_float(flat.get("effective_sample_size")),
            update_s=time.perf_counter() - start,
        )
        return metrics

    # --- optimizer state, rebase ---------------------------------------------

    def optimizer_state_bytes(self) -> bytes:
        return optimizer_state_to_bytes(self.rl_learner.get_state(components=COMPONENT_OPTIMIZER)[COMPONENT_OPTIMIZER])

    def rebase(self, policy: BarpPolicy) -> None:
        """Train on from ``policy``'s weights with Adam's moments reset; the weights get the next version."""
        if policy.kind != self.kind or policy.models != self.policy.models:
            raise ValueError(f"rebase: a {policy.kind!r} policy over {policy.models} cannot replace this learner's weights")
        self.module.set_state({k: v.detach().cpu().numpy() for k, v in policy.network.state_dict().items()})
        self.rl_learner.set_state({COMPONENT_OPTIMIZER: self._fresh_optimizer_state})
        mint_version(self.policy, self.policy_version + 1)
