"""The learner actor: OnlineLearner + checkpoints + publishing to the parameter server.

Named ``banditroute-learner`` in namespace ``banditroute``, detached,
``max_restarts=-1``. The feedback actor calls ``update(table)`` with
batches of joined events (one call in flight at a time); after every update
the new weights are published to the parameter server, so replicas pick
them up with their next long-poll answer.

Start-up / restart: the actor resumes from the newest of (a) the newest
checkpoint in storage, (b) the parameter server's newest snapshot, (c) the
initial policy it was created with; and it never counts below the version
the parameter server already holds, so versions never go backwards even if
it died between a publish and a checkpoint.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

import pyarrow as pa

from banditroute.config import from_dict
from banditroute.feedback.actor import LEARNER_ACTOR_NAME
from banditroute.learner.learner import LearnerConfig, OnlineLearner
from banditroute.learner.param_server import NAMESPACE, PARAMETER_SERVER_NAME
from banditroute.policy.barp import RoutingPolicy
from banditroute.storage import StorageConfig, open_storage

logger = logging.getLogger(__name__)


class LearnerActor:
    def __init__(
        self,
        config: LearnerConfig | dict | None,
        storage: StorageConfig | dict | str | None,
        initial_state: dict[str, Any] | None = None,
        parameter_server_name: str | None = PARAMETER_SERVER_NAME,
        namespace: str | None = NAMESPACE,
    ):
        import ray

        if not isinstance(config, LearnerConfig):
            config = from_dict(LearnerConfig, config or {}, prefix="learner")
        if isinstance(storage, dict):
            storage = from_dict(StorageConfig, storage, prefix="storage")
        self.config = config
        if config.torch_threads > 0:
            import torch

            torch.set_num_threads(config.torch_threads)
        self.ckpt_storage = open_storage(storage).child(config.checkpoint_prefix) if storage is not None else None
        self.param_server = None
        ps_snapshot = None
        if parameter_server_name is not None:
            from banditroute.learner.param_server import get_or_create_parameter_server

            self.param_server = get_or_create_parameter_server(parameter_server_name, namespace, storage, config.checkpoint_prefix)
            ps_snapshot = ray.get(self.param_server.latest.remote())
        initial = RoutingPolicy.from_state(initial_state) if initial_state is not None else None
        if ps_snapshot is not None and (initial is None or ps_snapshot.policy_version > initial.policy_version):
            # The freshest weights anyone serves: start from them unless a checkpoint is newer.
            initial = RoutingPolicy.from_state(ps_snapshot.state)
            initial.meta.policy_version = ps_snapshot.policy_version
        self.learner = OnlineLearner.resume_or_start(self.ckpt_storage, initial, config)
        if ps_snapshot is not None:
            self.learner.ensure_version_at_least(ps_snapshot.policy_version)
        self.start_version = self.learner.policy_version
        self.last_metrics: dict[str, Any] | None = None
        self.last_checkpoint: str | None = None
        self.publish_errors = 0
        self._lock = threading.Lock()
        if self.param_server is not None and (ps_snapshot is None or ps_snapshot.policy_version < self.learner.policy_version):
            self._publish()
        logger.info("learner starts at policy v%d", self.start_version)

    def _publish(self) -> None:
        import ray

        if self.param_server is None:
            return
        try:
            ray.get(self.param_server.publish.remote(self.learner.snapshot()))
        except Exception as exc:  # noqa: BLE001 - the next update publishes again
            self.publish_errors += 1
            logger.warning("publish of v%d failed: %s", self.learner.policy_version, exc)

    def update(self, events: pa.Table) -> dict[str, Any]:
        """Train on a batch of joined events, publish the new weights, checkpoint every N updates."""
        with self._lock:
            metrics = self.learner.update(events)
            if metrics.get("updated"):
                start = time.perf_counter()
                self._publish()
                metrics["publish_s"] = time.perf_counter() - start
                every = self.config.checkpoint_every
                if every and self.learner.updates % every == 0:
                    self._checkpoint()
            self.last_metrics = metrics
            return metrics

    def _checkpoint(self) -> str | None:
        if self.ckpt_storage is None:
            return None
        try:
            self.last_checkpoint = self.learner.save_checkpoint(self.ckpt_storage)
        except Exception as exc:  # noqa: BLE001 - training goes on; the next checkpoint retries
            logger.warning("checkpoint of v%d failed: %s", self.learner.policy_version, exc)
        return self.last_checkpoint

    def checkpoint(self) -> str | None:
        """Write a checkpoint now; returns its URI."""
        with self._lock:
            return self._checkpoint()

    def status(self) -> dict[str, Any]:
        return {
            "policy_version": self.learner.policy_version,
            "start_version": self.start_version,
            "updates": self.learner.updates,
            "events_trained": self.learner.events_trained,
            "trained_through": self.learner.trained_through,
            "skipped": dict(self.learner.skipped),
            "last_metrics": self.last_metrics,
            "last_checkpoint": self.last_checkpoint,
            "publish_errors": self.publish_errors,
        }

    def policy_state(self) -> dict[str, Any]:
        return self.learner.policy.state()

    def shutdown(self) -> str | None:
        """Final checkpoint (call before killing the actor)."""
        return self.checkpoint()

    def __ray_shutdown__(self) -> None:
        # Graceful actor exit (ray.kill(no_restart=True) does not run this; use shutdown()).
        try:
            self.checkpoint()
        except Exception:  # noqa: BLE001
            pass


def get_or_create_learner_actor(
    config: LearnerConfig | dict | None,
    storage: StorageConfig | dict | str | None,
    initial_state: dict[str, Any] | None = None,
    name: str = LEARNER_ACTOR_NAME,
    namespace: str | None = NAMESPACE,
    parameter_server_name: str | None = PARAMETER_SERVER_NAME,
    num_cpus: float = 0.0,
) -> Any:
    """The named, detached, restartable learner actor (created if missing).

    With storage, ``initial_state`` is written as a checkpoint first (unless a
    newer one exists) and the actor starts from storage: Ray keeps large
    constructor arguments only as long as their owner (this driver) lives, so
    a restart after the driver is gone must not depend on them.
    """
    from banditroute.actors import get_or_create_detached_actor

    if initial_state is not None and storage is not None:
        seed_checkpoint(initial_state, storage, _prefix(config))
        initial_state = None
    return get_or_create_detached_actor(
        LearnerActor, name, namespace, config, storage, initial_state, parameter_server_name, namespace,
        max_concurrency=4, num_cpus=num_cpus,
    )


def _prefix(config: LearnerConfig | dict | None) -> str:
    if isinstance(config, LearnerConfig):
        return config.checkpoint_prefix
    return (config or {}).get("checkpoint_prefix", LearnerConfig().checkpoint_prefix)


def seed_checkpoint(initial_state: dict[str, Any], storage: StorageConfig | dict | str, prefix: str) -> str | None:
    """Write ``initial_state`` as a checkpoint unless storage already holds one at least as new."""
    from banditroute.learner.checkpoint import list_checkpoints, save_checkpoint

    if isinstance(storage, dict):
        storage = from_dict(StorageConfig, storage, prefix="storage")
    ckpt = open_storage(storage).child(prefix)
    policy = RoutingPolicy.from_state(initial_state)
    versions = list_checkpoints(ckpt)
    if versions and versions[-1] >= policy.policy_version:
        return None
    return save_checkpoint(ckpt, policy, extra={"seeded": True})


def get_learner_actor(name: str = LEARNER_ACTOR_NAME, namespace: str | None = NAMESPACE) -> Any:
    import ray

    return ray.get_actor(name, namespace=namespace)
