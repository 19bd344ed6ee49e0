"""The online-learning loop that a Serve application brings up with itself.

With ``online.enabled`` the application builder (``build_app``, run by
``serve run``, ``serve deploy`` or KubeRay's RayService) creates -- or finds,
since they are named and detached -- the parameter server, learner and
feedback actors over the application's ``storage``, and points the Router
replicas at them (weights from the parameter server, decisions to the
feedback actor). So one RayService manifest brings up the whole loop, and a
restarted head, learner or replica recovers from ``storage``.

Starting point of the learner, in order:

1. the newest checkpoint already in ``storage`` (a restart, an upgrade);
2. ``online.initial_policy`` (a BaRP checkpoint folder: a local path in the
   image, or a storage URI such as ``s3://bucket/policies/v1``);
3. ``router.policy``.

With none of them the build fails with a message naming
``online.initial_policy`` (a random policy routes badly for a long time; a
warm start from `banditroute train` is what production wants).
"""

from __future__ import annotations

import copy
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from banditroute.feedback.service import FeedbackConfig
from banditroute.learner.config import LearnerConfig
from banditroute.serve.config import RouterConfig
from banditroute.core.storage import StorageConfig, open_storage

logger = logging.getLogger(__name__)

@dataclass
class OnlineConfig:
    """The loop's actors, started by the application builder (cluster mode)."""

    enabled: bool = False
    """Start (or find) the feedback, learner and parameter-server actors when the app is built, and wire the routers to them."""
    initial_policy: str | None = None
    """BaRP checkpoint that seeds the learner when storage holds no checkpoint yet (folder or storage URI); None = router.policy."""
    actor_prefix: str = "banditroute"
    """Actor names: <prefix>-feedback, <prefix>-learner, <prefix>-parameter-server (Ray namespace 'banditroute')."""
    learner_num_cpus: float = 1.0
    """Logical CPUs reserved for the learner actor (it trains with torch)."""
    feedback_num_cpus: float = 0.5
    """Logical CPUs reserved for the feedback actor (join, Parquet writes)."""

    def validate(self) -> None:
        if not self.actor_prefix:
            raise ValueError("online.actor_prefix must not be empty")
        if self.learner_num_cpus < 0 or self.feedback_num_cpus < 0:
            raise ValueError("online.learner_num_cpus and online.feedback_num_cpus must be >= 0")


def initial_policy_state(location: str, storage: StorageConfig | None) -> dict[str, Any]:
    """``RoutingPolicy.state()`` of the BaRP checkpoint at ``location``."""
    from banditroute.policy.checkpoint import load_barp_policy

    return load_barp_policy(location, storage, field="online.initial_policy").state()


def has_checkpoint(storage: StorageConfig, learner: LearnerConfig) -> bool:
    from banditroute.learner.checkpoint import list_checkpoints

    return bool(list_checkpoints(open_storage(storage).child(learner.checkpoint_prefix)))


def start_online_loop(
    router: RouterConfig,
    online: OnlineConfig,
    storage: StorageConfig,
    feedback: FeedbackConfig,
    learner: LearnerConfig,
) -> RouterConfig:
    """Create/find the loop's actors; return ``router`` wired to them (weights pulled, decisions sent)."""
    from banditroute.learner.loop import ensure_online_loop
    from banditroute.core.names import NAMESPACE

    online.validate()
    # The promotion gate must score what the replicas serve: one source for the exploration bounds.
    learner = copy.deepcopy(learner)
    learner.promotion.exploration_floor = router.exploration_floor
    learner.promotion.exploration_ceiling = router.exploration_ceiling
    initial_state = None
    if not has_checkpoint(storage, learner):
        seed = online.initial_policy or router.policy
        if seed is None:
            raise ValueError(
                f"online.initial_policy: storage {storage.uri} holds no checkpoint yet; give the BaRP checkpoint "
                f"to start from (a folder in the image or a storage URI; `banditroute train` makes one)"
            )
        initial_state = initial_policy_state(seed, storage)
    loop = ensure_online_loop(
        storage, initial_state, feedback, learner, online.actor_prefix,
        learner_num_cpus=online.learner_num_cpus, feedback_num_cpus=online.feedback_num_cpus,
    )
    names = loop["names"]
    wired = copy.deepcopy(router)
    wired.policy = None  # replicas take the newest weights from the parameter server (at least the seed)
    wired.parameter_server_name = names["parameter_server"]
    wired.parameter_server_namespace = NAMESPACE
    wired.learner_actor_name = names["learner"]  # behind the admin API's /v1/admin/policy/*
    wired.decision_sink = "feedback-actor"
    wired.decision_sink_options = {"name": names["feedback"], "namespace": NAMESPACE}
    logger.info("online loop ready (learner at v%s); routers use %s", loop["learner_status"]["policy_version"], names)
    return wired


def apply_prices(router: RouterConfig, prices: Mapping[str, float], feedback: FeedbackConfig) -> None:
    """Put ``prices`` (USD per call) where they act.

    - The feedback join uses them as a model's cost when neither the reward nor
      the upstream reported one (``feedback.join.prices``; explicit entries there win).
    - An identity policy's model registry (its live pool and prices) gets them
      before any replica loads it; an unknown model is an error naming ``prices.<model>``.
    A BaRP policy learns costs from rewards; prices for models outside its pool are ignored with a warning.
    """
    if not prices:
        return
    feedback.join.prices = {**dict(prices), **feedback.join.prices}
    if router.policy is None:
        return
    from banditroute.policy.checkpoint import checkpoint_kind

    if checkpoint_kind(router.policy) != "identity":
        from banditroute.policy.barp import RoutingPolicy

        pool = set(RoutingPolicy.load(router.policy).models)
        unknown = sorted(set(prices) - pool)
        if unknown:
            logger.warning("prices: %s are not in the policy's pool %s; ignored by routing", unknown, sorted(pool))
        return
    from banditroute.policy.model_registry import REGISTRY_FILE, ModelRegistry, UnknownModelError

    meta = json.loads((Path(router.policy) / "meta.json").read_text())
    registry = ModelRegistry.load(meta.get("registry_uri") or Path(router.policy) / REGISTRY_FILE)
    try:
        registry.set_prices(dict(prices))
    except UnknownModelError as exc:
        bad = next((m for m in prices if m not in registry.models), None)
        raise ValueError(f"prices.{bad}: {exc}") from None
    registry.save()
