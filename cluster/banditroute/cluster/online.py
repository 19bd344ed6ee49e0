"""The one place the online loop is wired: three actors, and the router config that points at them.

``start_online_loop(app)`` creates -- or finds, since they are named and
detached -- the parameter server, learner and feedback actors over
``app.storage``, and returns ``app.router`` wired to them: replicas pull
weights from the parameter server, send decisions to the feedback actor
(sink ``feedback-actor``) and reach the learner behind the admin API. The
application builder (``build_app``, run by ``serve run``, ``serve deploy``
or KubeRay's RayService, with ``online.enabled``), `banditroute up` and the
tests all call it, so a restarted head, learner or replica recovers from
``storage`` the same way everywhere.

Starting point of the learner, in order:

1. the newest checkpoint already in ``storage`` (a restart, an upgrade);
2. the ``initial_state`` the caller passes (`banditroute up`'s cold or warm start);
3. ``online.initial_policy`` (a BaRP checkpoint folder: a local path in the
   image, or a storage URI such as ``s3://bucket/policies/v1``);
4. ``router.policy``.

With none of them the build fails with a message naming
``online.initial_policy`` (a random policy routes badly for a long time; a
warm start from `banditroute train` is what production wants).
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass
from typing import Any

from banditroute.cluster.config import AppConfig
from banditroute.core.names import NAMESPACE, ActorNames
from banditroute.core.storage import StorageConfig, open_storage
from banditroute.feedback.actor import get_or_create_feedback_actor
from banditroute.learner.actor_handles import get_or_create_learner_actor
from banditroute.learner.checkpoint import list_checkpoints
from banditroute.learner.config import LearnerConfig
from banditroute.learner.param_server import get_or_create_parameter_server
from banditroute.serve.config import RouterConfig

logger = logging.getLogger(__name__)

FEEDBACK_SINK = "feedback-actor"
"""The decision sink (serve.decision_sinks) that sends each decision to the loop's feedback actor."""


@dataclass
class OnlineLoop:
    """The loop's actors, and the router config wired to them."""

    router: RouterConfig
    """``app.router`` pointed at the actors: no static policy, weights from the parameter server, decisions to feedback."""
    parameter_server: Any
    """Handle of the parameter-server actor."""
    learner: Any
    """Handle of the learner actor."""
    feedback: Any
    """Handle of the feedback actor."""
    names: ActorNames
    """The three actor names (namespace core.names.NAMESPACE)."""
    learner_status: dict[str, Any]
    """The learner's status once it answered (``start_version``, ``policy_version``, ...)."""
    started_from: str = "storage"
    """Where the learner's weights came from: 'storage' (its newest checkpoint), 'initial_state', or the seed checkpoint."""

    @property
    def handles(self) -> dict[str, Any]:
        return {"parameter_server": self.parameter_server, "learner": self.learner, "feedback": self.feedback}


def initial_policy_state(location: str, storage: StorageConfig | None) -> dict[str, Any]:
    """``RoutingPolicy.state()`` of the checkpoint at ``location``, of any kind the online learner trains (ONLINE_KINDS)."""
    from banditroute.learner.config import ONLINE_KINDS
    from banditroute.policy.checkpoint import load_policy_at

    return load_policy_at(location, storage, field="online.initial_policy", kinds=ONLINE_KINDS).state()


def has_checkpoint(storage: StorageConfig, learner: LearnerConfig) -> bool:
    return bool(list_checkpoints(open_storage(storage).child(learner.checkpoint_prefix)))


def wire_router(router: RouterConfig, names: ActorNames, pool_policy: str | None = None) -> RouterConfig:
    """A copy of ``router`` that takes weights from, sends decisions to, and administers the loop ``names``.

    ``pool_policy`` (default ``router.policy``): the checkpoint whose registry the pool admin API changes
    (an identity seed; a fixed-pool kind answers 409 there as before)."""
    wired = copy.deepcopy(router)
    wired.pool_policy = wired.pool_policy or pool_policy or router.policy
    wired.policy = None  # replicas take the newest weights from the parameter server (at least the seed)
    wired.parameter_server_name = names.parameter_server
    wired.parameter_server_namespace = NAMESPACE
    wired.learner_actor_name = names.learner  # behind the admin API's /v1/admin/policy/*
    wired.decision_sink = FEEDBACK_SINK
    wired.decision_sink_options = {"name": names.feedback, "namespace": NAMESPACE}
    return wired


def start_online_loop(app: AppConfig, initial_state: dict[str, Any] | None = None) -> OnlineLoop:
    """Create/find the loop's actors for ``app``; return them with ``app.router`` wired to them.

    Idempotent (named actors, ``get_if_exists``). ``initial_state`` (a
    ``RoutingPolicy.state()``) seeds the learner when ``app.storage`` holds
    no checkpoint; without it the seed is ``online.initial_policy`` or
    ``router.policy`` (see the module docstring).
    """
    import ray

    online, router, storage = app.online, app.router, app.storage
    online.validate()
    # The promotion gate must score what the replicas serve: one source for the exploration bounds.
    learner_cfg = copy.deepcopy(app.learner)
    learner_cfg.promotion.exploration_floor = router.exploration_floor
    learner_cfg.promotion.exploration_ceiling = router.exploration_ceiling
    resumed = has_checkpoint(storage, learner_cfg)
    started_from = "storage" if resumed else "initial_state"
    if initial_state is None and not resumed:
        seed = online.initial_policy or router.policy
        if seed is None:
            raise ValueError(
                f"online.initial_policy: storage {storage.uri} holds no checkpoint yet; give the BaRP checkpoint "
                f"to start from (a folder in the image or a storage URI; `banditroute train` makes one; "
                f"`banditroute serve --policy CKPT` sets it)"
            )
        initial_state = initial_policy_state(seed, storage)
        started_from = seed

    names = online.names
    ps = get_or_create_parameter_server(names.parameter_server, NAMESPACE, storage, learner_cfg.checkpoint_prefix)
    learner = get_or_create_learner_actor(learner_cfg, storage, initial_state, name=names.learner,
                                          parameter_server_name=names.parameter_server, num_cpus=online.learner_num_cpus)
    status = ray.get(learner.status.remote())
    feedback = get_or_create_feedback_actor(app.feedback, storage, names.feedback, learner_name=names.learner,
                                            num_cpus=online.feedback_num_cpus)
    ray.get(feedback.ping.remote())
    logger.info("online loop ready (learner at v%s); routers use %s", status["policy_version"], names.as_dict())
    pool_policy = online.initial_policy or router.policy
    return OnlineLoop(wire_router(router, names, pool_policy), ps, learner, feedback, names, status, started_from)
