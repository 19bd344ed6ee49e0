"""What every online learner kind shares: the version counter, optimizer-state bytes, checkpoints and resume.

A learner kind (``learner.registry.LEARNER_KINDS``, keyed by the policy kind
it trains) subclasses :class:`LearnerBase` and supplies ``update(events)``,
``optimizer_state_bytes()`` and ``rebase(policy)``; the learner actor, the
promotion gate and checkpoints then treat every kind alike.
"""

from __future__ import annotations

import io
from typing import Any, ClassVar, Sequence

import numpy as np
import pyarrow as pa
import torch

from banditroute.core.records import EventBatch, JoinedEvent, WeightsSnapshot
from banditroute.core.storage import Storage
from banditroute.learner.checkpoint import load_latest_checkpoint, save_checkpoint
from banditroute.learner.config import LearnerConfig
from banditroute.policy.base import RoutingPolicy


def mint_version(policy: RoutingPolicy, version: int) -> None:
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


def count_skipped(total: dict[str, int], skipped: dict[str, int]) -> None:
    """Add one batch's skipped-row counts (by reason) into the learner's running ``total``."""
    for key, n in skipped.items():
        total[key] = total.get(key, 0) + n


def reward_time_max(events: Any) -> float | None:
    """The newest ``reward_time`` of an event table (None when it has none): how far training has read."""
    if isinstance(events, pa.Table) and "reward_time" in events.column_names and len(events):
        return float(pa.compute.max(events.column("reward_time")).as_py())
    return None


class LearnerBase:
    """The contract of an online learner kind and the code the kinds share.

    ``update(events)`` trains on joined events and, when anything was
    trained, mints ``policy_version + 1`` (:func:`mint_version`); it returns
    plain-float metrics with ``events``, ``skipped``, ``updated`` and
    ``policy_version``. ``snapshot()`` is the WeightsSnapshot to publish;
    ``save_checkpoint`` / ``resume_or_start`` write and read versioned
    checkpoints (optimizer state as torch.save bytes, read back with
    weights_only=True: no pickle). ``rebase(policy)`` replaces the trained
    weights by ``policy``'s (the actor's guard against drift).
    """

    kind: ClassVar[str]
    """The policy kind this learner trains (its key in ``learner.registry.LEARNER_KINDS``)."""
    policy: Any
    config: LearnerConfig
    updates: int
    events_trained: int
    trained_through: float
    skipped: dict[str, int]

    @property
    def policy_version(self) -> int:
        """The version of the weights being trained; the learner mints each new one (``update``)."""
        return self.policy.policy_version

    def ensure_version_at_least(self, version: int) -> None:
        """Versions never go backwards: continue counting above ``version`` (e.g. what replicas serve)."""
        if version > self.policy.policy_version:
            mint_version(self.policy, version)

    def update(self, events: pa.Table | EventBatch | Sequence[JoinedEvent], trained_through: float | None = None) -> dict[str, Any]:
        raise NotImplementedError

    def _start_counts(self) -> None:
        """Zero the counters every kind keeps (checkpoint manifests, status and resume read them)."""
        self.updates = 0
        self.events_trained = 0
        self.trained_through = 0.0
        self.skipped = {}

    def _commit_update(self, trained: int, trained_through: float | None) -> None:
        """Count one update that trained on ``trained`` events and number the changed weights: the next version."""
        mint_version(self.policy, self.policy_version + 1)
        self.updates += 1
        self.events_trained += trained
        if trained_through is not None:
            self.trained_through = max(self.trained_through, float(trained_through))

    def optimizer_state_bytes(self) -> bytes:
        raise NotImplementedError

    def rebase(self, policy: RoutingPolicy) -> None:
        """Continue training from ``policy``'s weights (same kind and shape) with a fresh optimizer; a new version."""
        raise NotImplementedError

    def snapshot(self) -> WeightsSnapshot:
        """The current weights as a WeightsSnapshot of their version (numpy, picklable)."""
        return self.policy.snapshot(trained_through=self.trained_through)

    def save_checkpoint(self, storage: Storage, extra: dict[str, Any] | None = None, protect: Sequence[int] = ()) -> str:
        """Write checkpoint ``v<policy_version>`` under ``storage`` (a Storage rooted at the checkpoint prefix).

        ``extra`` goes into the manifest; ``protect`` lists versions pruning must keep.
        """
        return save_checkpoint(
            storage,
            self.policy,
            self.optimizer_state_bytes(),
            extra={"events_trained": self.events_trained, "updates": self.updates, "trained_through": self.trained_through,
                   "learner_kind": self.kind, **(extra or {})},
            keep=self.config.keep_checkpoints,
            protect=protect,
        )

    @classmethod
    def resume_or_start(cls, storage: Storage | None, initial: Any, config: LearnerConfig | None = None) -> "LearnerBase":
        """Resume from the newest checkpoint in ``storage``; else start from ``initial``.

        The newer of the two wins (by version), so pointing a fresh learner at
        storage with older checkpoints does not roll a deployed policy back.
        A checkpoint of another kind than this learner's is ValueError (use
        ``learner.registry.resume_or_start_learner``, which picks the kind).
        """
        found = load_latest_checkpoint(storage) if storage is not None else None
        if found is not None and (initial is None or found[0].policy_version >= initial.policy_version):
            policy, learner_state, manifest = found
            if policy.kind != cls.kind:
                raise ValueError(f"checkpoint v{policy.policy_version} holds a {policy.kind!r} policy; "
                                 f"{cls.__name__} trains {cls.kind!r}")
            learner = cls(policy, config, learner_state)
            learner.events_trained = int(manifest.get("events_trained", 0))
            learner.trained_through = float(manifest.get("trained_through", 0.0))
            return learner
        if initial is None:
            raise FileNotFoundError("no checkpoint in storage and no initial policy to start from")
        return cls(initial, config)


def as_float(value: Any) -> float | None:
    if value is None:
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        return None
