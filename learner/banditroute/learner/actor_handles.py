"""Handles on the learner actor: create or look up the named detached actor, and seed its storage.

Kept apart from ``learner.actor`` (the actor class itself) so callers that
only need a handle do not read the actor's code, and the class module stays
within the size limit.
"""

from __future__ import annotations

from typing import Any

from banditroute.core.config import from_dict
from banditroute.core.names import LEARNER_ACTOR_NAME, NAMESPACE, PARAMETER_SERVER_NAME
from banditroute.core.storage import StorageConfig, open_storage
from banditroute.learner.config import LearnerConfig
from banditroute.policy.checkpoint import policy_from_state


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
    from banditroute.core.actors import get_or_create_detached_actor

    if initial_state is not None and storage is not None:
        seed_checkpoint(initial_state, storage, _prefix(config))
        initial_state = None
    from banditroute.learner.actor import LearnerActor

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
    policy = policy_from_state(initial_state)
    versions = list_checkpoints(ckpt)
    if versions and versions[-1] >= policy.policy_version:
        return None
    return save_checkpoint(ckpt, policy, extra={"seeded": True})


def get_learner_actor(name: str = LEARNER_ACTOR_NAME, namespace: str | None = NAMESPACE) -> Any:
    import ray

    return ray.get_actor(name, namespace=namespace)
