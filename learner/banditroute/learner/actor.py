"""The learner actor: OnlineLearner + promotion gate + checkpoints + publishing to the parameter server.

Named ``banditroute-learner`` in namespace ``banditroute``, detached,
``max_restarts=-1``. The feedback actor calls ``update(table)`` with
batches of joined events (one call in flight at a time).

Two policies. The CANDIDATE is what the learner trains (its version goes up
by one per update); the SERVING policy is what replicas are told to serve
(the last promoted or pinned weights; the parameter server's newest
snapshot). With the promotion gate on (``learner.promotion``,
:mod:`banditroute.learner.promotion`), a fraction of the events (by
decision-id hash) is held out from training, and every ``every_updates``
updates the candidate is evaluated against the serving policy on the recent
held-out events; it is published only when the gate passes, otherwise it is
kept (training goes on) and the reason is logged and kept in
``promotion_status()``. With the gate off every update is published, as
before.

Admin (the HTTP /v1/admin/policy/* routes call these): ``pin(version)``
serves the weights of checkpoint ``version`` under a NEW version number
(replicas only move forward), records the source version and holds
promotions until ``unpin()``; ``list_checkpoints()``; ``promotion_status()``.

Versions never go backwards: the parameter server refuses older snapshots;
the learner counts above every version it published or used (it reserves
candidate numbers at the parameter server) and above every checkpoint.

Start-up / restart: the candidate resumes from the newest of (a) the newest
checkpoint in storage, (b) the parameter server's newest snapshot, (c) the
initial policy it was created with; the serving policy is the parameter
server's snapshot (or, if the server has none or an older one, the newest
checkpoint marked promoted); the pin state is read back from storage. The
held-out buffer lives in memory: after a restart the gate holds until it
has ``min_holdout_events`` again.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from typing import Any

import pyarrow as pa

from banditroute.core.config import from_dict
from banditroute.core.names import NAMESPACE, PARAMETER_SERVER_NAME
from banditroute.learner.checkpoint import (
    list_checkpoints,
    load_checkpoint,
    newest_promoted_checkpoint,
    read_promotion_state,
    save_checkpoint,
    write_promotion_state,
)
from banditroute.learner.config import LearnerConfig
from banditroute.learner.drift import DriftGuard
from banditroute.learner.gate_metrics import observe_update
from banditroute.learner.learner import mint_version
from banditroute.learner.log_follower import LogFollower
from banditroute.learner.registry import resume_or_start_learner
from banditroute.learner.promotion import HoldoutBuffer, evaluate_candidate, split_holdout
from banditroute.policy.base import RoutingPolicy
from banditroute.policy.checkpoint import policy_from_snapshot, policy_from_state
from banditroute.core.records import WeightsSnapshot
from banditroute.core.storage import StorageConfig, open_storage

logger = logging.getLogger(__name__)


def _clone(policy: RoutingPolicy) -> RoutingPolicy:
    """An independent copy of any kind (the candidate keeps training; the copy must not move with it)."""
    return policy_from_snapshot(policy.snapshot())


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
        self.gate = config.promotion
        if config.torch_threads > 0:
            import torch

            torch.set_num_threads(config.torch_threads)
        self.ckpt_storage = open_storage(storage).child(config.checkpoint_prefix) if storage is not None else None
        self.param_server = None
        ps_snapshot = None
        reserved = -1
        if parameter_server_name is not None:
            from banditroute.learner.param_server import get_or_create_parameter_server

            self.param_server = get_or_create_parameter_server(parameter_server_name, namespace, storage, config.checkpoint_prefix)
            ps_snapshot = ray.get(self.param_server.latest.remote())
            reserved = int(ray.get(self.param_server.reserved_version.remote()))
        initial = policy_from_state(initial_state) if initial_state is not None else None
        if ps_snapshot is not None and (initial is None or ps_snapshot.policy_version > initial.policy_version):
            # The freshest weights anyone serves: start from them unless a checkpoint is newer.
            initial = policy_from_snapshot(ps_snapshot)
        # The learner of the starting policy's kind (learner.registry: barp or value).
        self.learner = resume_or_start_learner(self.ckpt_storage, initial, config)
        self.follower = LogFollower.resume(config.log_cursor, storage, self.ckpt_storage, self.learner)  # their log cursor

        # The serving policy: what the parameter server holds, unless a promoted checkpoint is newer.
        self.serving: RoutingPolicy | None = None
        """The weights replicas serve when the gate is on (None: the gate is off, the candidate is served)."""
        self.serving_source: int | str | None = None
        """For pinned weights: the checkpoint version they came from."""
        self.serving_trained_through = 0.0
        self.pinned = False
        self._resume_serving(ps_snapshot)
        # Count above everything published, reserved, served or checkpointed.
        self.learner.ensure_version_at_least(max(reserved, self.serving_version, self._newest_checkpoint()))
        self.start_version = self.serving_version
        self.holdout = HoldoutBuffer(self.gate.holdout_capacity)
        # Recent TRAINING events: the gate's reward model is fitted on them too (learner.promotion: why).
        self.reward_model_events = HoldoutBuffer(max(self.gate.reward_model_events, 2))
        self.gate_history: deque[dict[str, Any]] = deque(maxlen=self.gate.history)
        self.last_metrics: dict[str, Any] | None = None
        self.last_checkpoint: str | None = None
        self.publish_errors = 0
        self.events_held_out = 0
        self.drift = DriftGuard(config.rebase_after_held_checks)  # re-bases a candidate the gate keeps holding
        self._serving_checkpointed = -1
        self._lock = threading.Lock()
        self.started_at = time.time()
        if self.param_server is not None and (ps_snapshot is None or ps_snapshot.policy_version < self.serving_version):
            self._publish()
        logger.info("learner starts: candidate v%d, serving v%d%s", self.learner.policy_version, self.serving_version,
                    " (pinned)" if self.pinned else "")
        self.follower.start(self.update)  # trains on committed log parts the pushes missed (learner/log_follower.py)

    # --- state ------------------------------------------------------------------

    @property
    def serving_version(self) -> int:
        return self.learner.policy_version if self.serving is None else self.serving.policy_version

    def _newest_checkpoint(self) -> int:
        if self.ckpt_storage is None:
            return -1
        try:
            versions = list_checkpoints(self.ckpt_storage)
        except Exception as exc:  # noqa: BLE001 - storage outage: the other sources still bound the count
            logger.warning("could not list checkpoints: %s", exc)
            return -1
        return versions[-1] if versions else -1

    def _resume_serving(self, ps_snapshot: WeightsSnapshot | None) -> None:
        promoted, pin = None, {}
        if self.ckpt_storage is not None:
            try:
                promoted = newest_promoted_checkpoint(self.ckpt_storage)
                pin = read_promotion_state(self.ckpt_storage)
            except Exception as exc:  # noqa: BLE001
                logger.warning("could not read the promotion state: %s", exc)
                pin = {}
            self.pinned = bool(pin.get("pinned", False))
        if not (self.gate.enabled or self.pinned):
            return  # no gate, no pin: the candidate is what is served
        if ps_snapshot is not None and (promoted is None or ps_snapshot.policy_version >= promoted):
            self.serving = policy_from_snapshot(ps_snapshot)
            self.serving_trained_through = ps_snapshot.trained_through
        elif promoted is not None and promoted >= 0:
            policy, _, manifest = load_checkpoint(self.ckpt_storage, promoted)
            self.serving = policy
            self.serving_trained_through = float(manifest.get("trained_through", 0.0))
        else:  # nothing served yet: the candidate's starting weights are the first served version
            self.serving = _clone(self.learner.policy)
            self.serving_trained_through = self.learner.trained_through
        if self.pinned:
            self.serving_source = pin.get("source_version")

    def _serving_snapshot(self) -> WeightsSnapshot:
        if self.serving is None:
            return self.learner.snapshot()
        return self.serving.snapshot(trained_through=self.serving_trained_through)

    def _publish(self) -> bool:
        import ray

        if self.param_server is None:
            return False
        try:
            ray.get(self.param_server.publish.remote(self._serving_snapshot()))
            return True
        except Exception as exc:  # noqa: BLE001 - the next update publishes again
            self.publish_errors += 1
            logger.warning("publish of v%d failed: %s", self.serving_version, exc)
            return False

    def _republish_if_behind(self) -> None:
        """A restarted parameter server recovers only the last served CHECKPOINT: give it the serving version again."""
        import ray

        if self.param_server is None:
            return
        try:
            # Reserve the candidate's number too, so a restarted learner never reuses it (one round trip).
            latest = ray.get(self.param_server.reserve_version.remote(self.learner.policy_version))
        except Exception as exc:  # noqa: BLE001
            logger.warning("parameter server unreachable: %s", exc)
            return
        if latest < self.serving_version:
            self._publish()

    # --- training ---------------------------------------------------------------

    def update(self, events: pa.Table) -> dict[str, Any]:
        """Train on joined events (minus held-out ones and ids already trained); publish what the gate lets through."""
        with self._lock:
            events, duplicates = self.follower.take(events)  # pushes and log catch-up both come in here
            held = 0
            if self.gate.enabled and isinstance(events, pa.Table) and len(events):
                events, held_out = split_holdout(events, self.gate.holdout_fraction)
                held = len(held_out)
                self.holdout.add(held_out)
                self.events_held_out += held
                if self.gate.reward_model_events:
                    self.reward_model_events.add(events)
            metrics = self.learner.update(events)
            metrics["held_out"], metrics["duplicates_dropped"] = held, duplicates
            if metrics.get("updated"):
                start = time.perf_counter()
                if self.pinned:
                    self._republish_if_behind()  # promotions are held while pinned
                elif not self.gate.enabled:
                    self._publish()
                elif self.learner.updates % self.gate.every_updates == 0:
                    metrics["promotion"] = self._run_gate()
                else:
                    self._republish_if_behind()
                metrics["publish_s"] = time.perf_counter() - start
                every = self.config.checkpoint_every
                if every and self.learner.updates % every == 0:
                    self._checkpoint()
            metrics["serving_version"] = self.serving_version
            self.last_metrics = observe_update(self, metrics)  # gate/update metrics (learner/gate_metrics.py)
            return metrics

    def _run_gate(self) -> dict[str, Any]:
        decision = evaluate_candidate(self.holdout.table(), self.learner.policy, self.serving, self.gate,
                                      self.reward_model_events.table() if self.gate.reward_model_events else None)
        # The evidence the check had, so a run can place it on its decision axis (`banditroute up`'s plot).
        record = {"action": "gate", **decision.as_dict(), "updates": self.learner.updates,
                  "events_received": self._events_received()}
        if decision.promote:
            self.drift.promoted()
            self.serving = _clone(self.learner.policy)
            self.serving_source = None
            self.serving_trained_through = self.learner.trained_through
            record["published"] = self._publish()
            logger.info("promoted v%d: %s", self.serving_version, decision.reason)
        else:
            if self.drift.held(decision.difference is not None) and self.serving.kind == self.learner.kind:
                self.learner.rebase(self.serving)  # learner/drift.py: why
                record["rebased_to_version"] = self.learner.policy_version
            self._republish_if_behind()
            logger.info("candidate v%d held (serving v%d): %s", self.learner.policy_version, self.serving_version, decision.reason)
        self.gate_history.append(record)
        return {"promote": decision.promote, "reason": decision.reason}

    # --- checkpoints ------------------------------------------------------------

    def _checkpoint(self) -> str | None:
        if self.ckpt_storage is None:
            return None
        try:
            protect: list[int] = []
            if self.serving is not None and self.serving_version != self.learner.policy_version:
                # The served weights must stay recoverable (a restarted parameter server serves them).
                if self._serving_checkpointed != self.serving_version and self.serving_version not in list_checkpoints(self.ckpt_storage):
                    save_checkpoint(self.ckpt_storage, self.serving, extra=self._serving_manifest())
                self._serving_checkpointed = self.serving_version
                protect.append(self.serving_version)
            self.last_checkpoint = self.learner.save_checkpoint(
                self.ckpt_storage,
                extra={"promoted": self.serving_version == self.learner.policy_version, "serving_version": self.serving_version,
                       **self.follower.save(self.ckpt_storage, self.learner.policy_version)},
                protect=protect,
            )
        except Exception as exc:  # noqa: BLE001 - training goes on; the next checkpoint retries
            logger.warning("checkpoint of v%d failed: %s", self.learner.policy_version, exc)
        return self.last_checkpoint

    def _serving_manifest(self) -> dict[str, Any]:
        extra: dict[str, Any] = {"promoted": True, "role": "serving", "serving_version": self.serving_version,
                                 "trained_through": self.serving_trained_through}
        if self.serving_source is not None:
            extra["pinned_from"] = self.serving_source
        return extra

    def checkpoint(self) -> str | None:
        """Write a checkpoint now; returns its URI."""
        with self._lock:
            return self._checkpoint()

    # --- admin: pin / rollback ----------------------------------------------------

    def list_checkpoints(self) -> list[int]:
        """Versions of the complete checkpoints in storage (ascending); [] without storage."""
        return [] if self.ckpt_storage is None else list_checkpoints(self.ckpt_storage)

    def pin(self, version: int | None = None, checkpoint: str | None = None) -> dict[str, Any]:
        """Serve checkpointed weights under a NEW version number (rollback, or an offline candidate); hold promotions.

        ``version``: a checkpoint of this learner's storage. ``checkpoint``: a
        checkpoint folder (of the learner's policy kind) or storage URI elsewhere (e.g. a
        `banditroute train-from-log` candidate under ``offline/``), read with
        this learner's storage credentials. ValueError (naming the field) when
        it does not exist, there is no storage, or its pool/encoder differ.
        """
        import ray

        with self._lock:
            if (version is None) == (checkpoint is None):
                raise ValueError("version: give exactly one of version or checkpoint")
            if self.ckpt_storage is None:
                raise ValueError("version: this learner has no checkpoint storage to pin from")
            available = list_checkpoints(self.ckpt_storage)
            field = "version" if checkpoint is None else "checkpoint"
            if checkpoint is None:
                if int(version) not in available:
                    raise ValueError(f"version: no checkpoint v{int(version)}; available: {available}")
                policy, _, manifest = load_checkpoint(self.ckpt_storage, int(version))
                source: int | str = int(version)
            else:
                from banditroute.policy.checkpoint import load_policy_at

                try:
                    policy = load_policy_at(checkpoint, self.ckpt_storage.config, field="checkpoint",
                                            kinds=(self.learner.kind,))
                except (OSError, KeyError) as exc:
                    raise ValueError(f"checkpoint: cannot read {checkpoint}: {exc}") from None
                manifest, source = {}, str(checkpoint)
            mine = self.learner.policy
            if (policy.kind, policy.models, policy.embed_dim, policy.encoder_id) != (mine.kind, mine.models, mine.embed_dim, mine.encoder_id):
                raise ValueError(f"{field}: {source} has another kind, model pool, encoder or embedding size than the learner")
            ps_latest = -1
            if self.param_server is not None:
                ps_latest = int(ray.get(self.param_server.reserved_version.remote()))
            new_version = max(self.learner.policy_version, self.serving_version, ps_latest, available[-1]) + 1
            mint_version(policy, new_version)
            # The candidate keeps its weights but counts above the pinned number (one number, one set of weights).
            self.learner.ensure_version_at_least(new_version + 1)
            self.serving = policy
            self.serving_source = source
            self.serving_trained_through = float(manifest.get("trained_through", 0.0))
            self.pinned = True
            published = self._publish()
            # A checkpoint of the pinned weights (so a restarted parameter server or learner serves them) and the pin state.
            save_checkpoint(self.ckpt_storage, policy, extra=self._serving_manifest(), keep=self.config.keep_checkpoints,
                            protect=[new_version])
            self._serving_checkpointed = new_version
            write_promotion_state(self.ckpt_storage, {"pinned": True, "source_version": source,
                                                      "serving_version": new_version, "at": time.time()})
            record = {"action": "pin", "source_version": source, "serving_version": new_version,
                      "candidate_version": self.learner.policy_version, "published": published, "time": time.time()}
            self.gate_history.append(record)
            logger.warning("pinned: serving checkpoint %s as v%d; promotions held", source, new_version)
            return {"pinned": True, "serving_version": new_version, "source_version": source,
                    "candidate_version": self.learner.policy_version, "published": published}

    def unpin(self) -> dict[str, Any]:
        """Release a pin: the gate decides again at its next evaluation (against the pinned weights)."""
        with self._lock:
            was = self.pinned
            self.pinned = False
            if not self.gate.enabled:
                self.serving = None  # no gate: the next update publishes the candidate (numbered above the pin)
            if self.ckpt_storage is not None:
                write_promotion_state(self.ckpt_storage, {"pinned": False, "serving_version": self.serving_version,
                                                          "at": time.time()})
            if was:
                self.gate_history.append({"action": "unpin", "serving_version": self.serving_version,
                                          "candidate_version": self.learner.policy_version, "time": time.time()})
            return {"pinned": False, "was_pinned": was, "serving_version": self.serving_version,
                    "source_version": self.serving_source, "candidate_version": self.learner.policy_version}

    def promotion_status(self) -> dict[str, Any]:
        """Gate settings, serving vs candidate, pin state, held-out buffer and the recent gate history."""
        last_gate = next((r for r in reversed(self.gate_history) if r.get("action") == "gate"), None)
        return {
            "enabled": self.gate.enabled,
            "pinned": self.pinned,
            "serving_version": self.serving_version,
            "serving_source_version": self.serving_source,
            "candidate_version": self.learner.policy_version,
            "holdout_events": len(self.holdout),
            "holdout_seen": self.holdout.seen,
            "min_holdout_events": self.gate.min_holdout_events,
            "margin": self.gate.margin,
            "estimator": self.gate.estimator,
            "every_updates": self.gate.every_updates,
            "last_decision": last_gate,
            "history": list(self.gate_history),
        }

    # --- status -------------------------------------------------------------------

    def _events_received(self) -> int:
        return self.learner.events_trained + self.events_held_out + sum(self.learner.skipped.values())

    def status(self) -> dict[str, Any]:
        last_gate = next((r for r in reversed(self.gate_history) if r.get("action") == "gate"), None)
        return {
            # What replicas are told to serve (= the newest published); the loop waits for replicas on it.
            "policy_version": self.serving_version,
            "serving_version": self.serving_version,
            "candidate_version": self.learner.policy_version,
            "pinned": self.pinned,
            "start_version": self.start_version,
            "started_at": self.started_at,
            "updates": self.learner.updates,
            "events_trained": self.learner.events_trained, "events_held_out": self.events_held_out,
            "events_received": self._events_received(),
            "trained_through": self.learner.trained_through, "skipped": dict(self.learner.skipped),
            "last_metrics": self.last_metrics,
            "last_checkpoint": self.last_checkpoint,
            "publish_errors": self.publish_errors, "log_cursor": self.follower.stats(),
            "rebases": self.drift.rebases,
            "learner_kind": self.learner.kind,
            "promotion": {"enabled": self.gate.enabled, "last_decision": last_gate,
                          "history": list(self.gate_history)[-10:], "holdout_events": len(self.holdout)},
        }

    def policy_state(self) -> dict[str, Any]:
        """The candidate's weights (what the learner trains)."""
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

