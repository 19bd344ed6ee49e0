"""Online, off-policy learner for the BaRP policy, on RLlib's new API stack.

Two layers:

- :class:`BanditTorchLearner` is an RLlib ``TorchLearner``: RLlib owns the
  optimizer, gradient clipping, the update loop and its metrics; we supply
  the loss hook (``compute_loss_for_module``): off-policy REINFORCE with
  clipped importance weights pi/mu, a learned value baseline and an entropy
  bonus.
- :class:`OnlineLearner` turns logged, joined events into train batches
  (reward with the policy's tau, candidate masks from the logged candidate
  sets, propensities from the log), keeps a small replay buffer, counts the
  monotonic ``policy_version`` and writes/reads checkpoints. It needs no Ray
  cluster; the learner actor (:mod:`banditroute.learner.actor`) wraps it.

Off-policy correction. Events were decided by older versions of the policy
(mu = the logged probability of the chosen model; 1 for greedy decisions).
The gradient of E_pi[r] estimated from mu's data is
E_mu[(pi(a|x)/mu(a|x)) (r - V(x)) grad log pi(a|x)]; the ratio is clipped at
``importance_clip`` to bound the variance (a biased, lower-variance
estimator, as in PPO/IMPALA-style truncation).
"""

from __future__ import annotations

import io
import time
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import pyarrow as pa
import torch

from banditroute.learner.checkpoint import (
    load_latest_checkpoint,
    save_checkpoint,
)
from banditroute.learner.module import MASK, PROPENSITIES, W_COST, BarpRLModule
from banditroute.learner.config import LearnerConfig
from banditroute.policy.barp import BarpPolicy
from banditroute.policy.losses import clipped_importance_weights, reinforce_loss, value_loss
from banditroute.policy.reward import reward
from banditroute.core.records import EventBatch, JoinedEvent, WeightsSnapshot, events_to_table
from banditroute.core.storage import Storage

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


@dataclass
class TrainRows:
    """Events as the learner trains on them (after validation)."""

    obs: np.ndarray
    w_cost: np.ndarray
    mask: np.ndarray
    actions: np.ndarray
    rewards: np.ndarray
    propensities: np.ndarray
    skipped: dict[str, int] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.actions)

    def columns(self) -> dict[str, np.ndarray]:
        return {
            Columns.OBS: self.obs,
            W_COST: self.w_cost,
            MASK: self.mask,
            Columns.ACTIONS: self.actions,
            Columns.REWARDS: self.rewards,
            PROPENSITIES: self.propensities,
        }


def events_to_rows(
    events: pa.Table | EventBatch | Sequence[JoinedEvent], policy: BarpPolicy
) -> TrainRows:
    """Validate events against the policy and compute rewards (with the policy's tau).

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
        np.zeros(0, np.int64), np.zeros(0, np.float32), np.zeros(0, np.float32), skipped,
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


def mint_version(policy: BarpPolicy, version: int) -> None:
    """Number the weights ``policy`` holds as the NEW version ``version``: the one place versions are minted.

    Everywhere else a policy's version comes with the weights it loaded (a
    WeightsSnapshot through ``load_weights``/``from_snapshot``, a checkpoint's
    meta.json). The learner's weights change in place (its network IS the
    RLlib module's), and pinned weights are renumbered into the learner's
    sequence, so their new number is given here, without copying the weights
    through a snapshot of themselves. Callers keep versions moving forward.
    """
    policy.meta.policy_version = int(version)


def _tensors_for_save(value: Any) -> Any:
    """numpy arrays -> tensors, recursively: what torch.load(weights_only=True) accepts."""
    if isinstance(value, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(value))
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, dict):
        return {k: _tensors_for_save(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_tensors_for_save(v) for v in value)
    return value


def optimizer_state_to_bytes(state: dict[str, Any]) -> bytes:
    """RLlib's optimizer state as torch.save bytes holding only tensors and plain values (no pickled objects)."""
    buf = io.BytesIO()
    torch.save(_tensors_for_save(state), buf)
    return buf.getvalue()


def optimizer_state_from_bytes(data: bytes) -> dict[str, Any]:
    """The inverse of :func:`optimizer_state_to_bytes`; ``weights_only=True`` refuses anything but tensors
    and plain containers, so bytes from storage cannot run code (torch.load's unpickler is restricted)."""
    state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    if not isinstance(state, dict):
        raise ValueError(f"optimizer state: expected a mapping, got {type(state).__name__}")
    return state


class OnlineLearner:
    """RLlib learner + version counter + checkpoints for one routing policy.

    ``update(events)`` trains on a batch of joined events (pyarrow table in
    EVENT_SCHEMA, EventBatch, or JoinedEvents), bumps ``policy_version`` by
    one and returns plain-float metrics. ``snapshot()`` is the
    WeightsSnapshot to publish.
    """

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
        if learner_state is not None:
            self.rl_learner.set_state({COMPONENT_OPTIMIZER: optimizer_state_from_bytes(learner_state)})
        self.replay = ReplayBuffer(self.config.replay_capacity, self.config.seed)
        self.updates = 0
        self.events_trained = 0
        self.trained_through = 0.0
        self.skipped: dict[str, int] = {}

    @property
    def policy_version(self) -> int:
        """The version of the weights being trained; the learner mints each new one (``update``)."""
        return self.policy.policy_version

    def ensure_version_at_least(self, version: int) -> None:
        """Versions never go backwards: continue counting above ``version`` (e.g. what replicas serve)."""
        if version > self.policy.policy_version:
            mint_version(self.policy, version)

    def update(self, events: pa.Table | EventBatch | Sequence[JoinedEvent], trained_through: float | None = None) -> dict[str, Any]:
        """One learner update on ``events`` (+ replay); bumps the version if anything was trained."""
        start = time.perf_counter()
        if trained_through is None and isinstance(events, pa.Table) and "reward_time" in events.column_names and len(events):
            trained_through = float(pa.compute.max(events.column("reward_time")).as_py())
        rows = events_to_rows(events, self.policy)
        for key, n in rows.skipped.items():
            self.skipped[key] = self.skipped.get(key, 0) + n
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
        mint_version(self.policy, self.policy_version + 1)
        self.updates += 1
        self.events_trained += len(rows)
        if trained_through is not None:
            self.trained_through = max(self.trained_through, float(trained_through))
        metrics.update(
            updated=True,
            policy_version=self.policy_version,
            batch_rows=int(len(train[Columns.ACTIONS])),
            mean_reward=float(rows.rewards.mean()),
            total_loss=_f(flat.get("total_loss")),
            policy_loss=_f(flat.get("policy_loss")),
            value_loss=_f(flat.get("value_loss")),
            entropy=_f(flat.get("entropy")),
            mean_importance_weight=_f(flat.get("mean_importance_weight")),
            clipped_fraction=_f(flat.get("clipped_fraction")),
            effective_sample_size=_f(flat.get("effective_sample_size")),
            update_s=time.perf_counter() - start,
        )
        return metrics

    # --- weights out ----------------------------------------------------------

    def snapshot(self) -> WeightsSnapshot:
        """The current weights as a WeightsSnapshot of their version (numpy, picklable)."""
        return self.policy.snapshot(trained_through=self.trained_through)

    # --- checkpoints ----------------------------------------------------------

    def optimizer_state_bytes(self) -> bytes:
        return optimizer_state_to_bytes(self.rl_learner.get_state(components=COMPONENT_OPTIMIZER)[COMPONENT_OPTIMIZER])

    def save_checkpoint(self, storage: Storage, extra: dict[str, Any] | None = None, protect: Sequence[int] = ()) -> str:
        """Write checkpoint ``v<policy_version>`` under ``storage`` (a Storage rooted at the checkpoint prefix).

        ``extra`` goes into the manifest; ``protect`` lists versions pruning must keep.
        """
        return save_checkpoint(
            storage,
            self.policy,
            self.optimizer_state_bytes(),
            extra={"events_trained": self.events_trained, "updates": self.updates, "trained_through": self.trained_through,
                   **(extra or {})},
            keep=self.config.keep_checkpoints,
            protect=protect,
        )

    @classmethod
    def resume_or_start(
        cls, storage: Storage | None, initial: BarpPolicy | None, config: LearnerConfig | None = None
    ) -> "OnlineLearner":
        """Resume from the newest checkpoint in ``storage``; else start from ``initial``.

        The newer of the two wins (by version), so pointing a fresh learner at
        storage with older checkpoints does not roll a deployed policy back.
        """
        found = load_latest_checkpoint(storage) if storage is not None else None
        if found is not None and (initial is None or found[0].policy_version >= initial.policy_version):
            policy, learner_state, manifest = found
            learner = cls(policy, config, learner_state)
            learner.events_trained = int(manifest.get("events_trained", 0))
            learner.trained_through = float(manifest.get("trained_through", 0.0))
            return learner
        if initial is None:
            raise FileNotFoundError("no checkpoint in storage and no initial policy to start from")
        return cls(initial, config)


def _f(value: Any) -> float | None:
    if value is None:
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        return None
