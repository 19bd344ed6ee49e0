"""Offline (re)training from the durable event log (`banditroute train-from-log`, the k8s RayJob).

The online learner sees each event about once, in arrival order. Offline, the
same off-policy loss (learner/learner.py: clipped importance weights, value
baseline, entropy bonus) runs several passes over everything the log holds:

1. events are ordered by reward time; the most recent ``holdout_fraction`` of
   them is held out (never trained on) -- the freshest traffic is the best
   stand-in for what the policy will see next;
2. the starting policy (the newest online checkpoint, or ``--policy``) is
   trained for ``epochs`` passes over the rest, in shuffled batches;
3. the candidate is compared with the SERVING policy (the newest promoted
   checkpoint; the start when none is marked) on the held-out events by the
   online promotion gate's own rule (learner/promotion.py: paired OPE of
   the distributions replicas serve, promote iff the lower confidence bound
   of V(candidate) - V(serving) >= -margin, with ``learner.promotion``'s
   estimator, margin and confidence) -- one rule, online and offline.

The candidate is written as a checkpoint under its own storage prefix
(``offline/`` by default, never the online learner's ``checkpoints/``, so two
writers never share a version number) with the report beside it. Serving it
is a separate, explicit step (docs/deploy.md: pin it through the admin API).
"""

from __future__ import annotations

import copy
import dataclasses
import math
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from banditroute.learner.config import LearnerConfig
from banditroute.learner.learner import OnlineLearner
from banditroute.learner.promotion import evaluate_candidate
from banditroute.policy.barp import BarpPolicy


@dataclass
class OfflineRetrainConfig:
    """`banditroute train-from-log`: which events, how many passes, and the check the result must pass."""

    since_hours: float = 168.0
    """Train on events whose reward arrived in the last this-many hours (0 = the whole log)."""
    holdout_fraction: float = 0.2
    """The most recent share of events, held out from training and used to compare candidate and start."""
    epochs: int = 3
    """Passes over the training events."""
    batch_size: int = 512
    """Events per learner update."""
    min_events: int = 100
    """Fewer usable events than this in the log is an error (nothing worth retraining on)."""
    out_prefix: str = "offline"
    """Storage prefix (under storage.uri) of the retrained checkpoints and reports."""
    seed: int = 0
    """Seeds the batch shuffling (and the DR reward model's folds)."""

    def validate(self) -> None:
        if not (self.since_hours >= 0 and math.isfinite(self.since_hours)):
            raise ValueError("since_hours must be >= 0")
        if not 0.0 < self.holdout_fraction < 1.0:
            raise ValueError("holdout_fraction must be in (0, 1)")
        if self.epochs < 1 or self.batch_size < 1 or self.min_events < 1:
            raise ValueError("epochs, batch_size and min_events must be >= 1")
        if not self.out_prefix or self.out_prefix.strip("/") in ("checkpoints", "events", "decisions"):
            raise ValueError("out_prefix must be a prefix of its own (not checkpoints/, events/ or decisions/)")


def split_recent(events: pa.Table, fraction: float) -> tuple[pa.Table, pa.Table]:
    """(train, holdout): the holdout is the most recent ``fraction`` of events by reward time."""
    order = np.argsort(np.asarray(events.column("reward_time").to_numpy(zero_copy_only=False), dtype=np.float64), kind="stable")
    n_holdout = max(1, int(round(len(order) * fraction)))
    return events.take(pa.array(order[:-n_holdout])), events.take(pa.array(order[-n_holdout:]))


def offline_learner_config(online: LearnerConfig) -> LearnerConfig:
    """The online loss settings, without the replay buffer (every event is revisited each epoch anyway)."""
    cfg = copy.deepcopy(online)
    cfg.replay_capacity = 0
    cfg.replay_sample = 0
    return cfg


def train_offline(
    events: pa.Table,
    start: BarpPolicy,
    learner: LearnerConfig,
    cfg: OfflineRetrainConfig,
    serving: BarpPolicy | None = None,
) -> tuple[BarpPolicy, dict[str, Any]]:
    """Train a copy of ``start`` on the log; returns (candidate, report with the gate's verdict vs ``serving``)."""
    cfg.validate()
    if len(events) < cfg.min_events:
        raise ValueError(f"the event log holds {len(events)} events in the window; min_events is {cfg.min_events}")
    train, holdout = split_recent(events, cfg.holdout_fraction)
    candidate = BarpPolicy.from_snapshot(start.snapshot())
    trainer = OnlineLearner(candidate, offline_learner_config(learner))
    rng = np.random.default_rng(cfg.seed)
    began = time.perf_counter()
    losses = []
    for _ in range(cfg.epochs):
        order = rng.permutation(len(train))
        for lo in range(0, len(order), cfg.batch_size):
            metrics = trainer.update(train.take(pa.array(order[lo : lo + cfg.batch_size])))
            if metrics.get("total_loss") is not None:
                losses.append(metrics["total_loss"])
    candidate = trainer.policy
    candidate.network.eval()
    serving = start if serving is None else serving
    gate = dataclasses.replace(learner.promotion, enabled=True)  # offline, the check always runs
    reward_model = train.slice(max(0, len(train) - gate.reward_model_events)) if gate.reward_model_events else None
    decision = evaluate_candidate(holdout, candidate, serving, gate, reward_model)
    report = {
        "events": len(events),
        "train_events": len(train),
        "holdout_events": len(holdout),
        "events_trained": trainer.events_trained,
        "updates": trainer.updates,
        "skipped": dict(trainer.skipped),
        "epochs": cfg.epochs,
        "train_s": time.perf_counter() - began,
        "final_loss": losses[-1] if losses else None,
        "start_version": start.policy_version,
        "serving_version": serving.policy_version,
        "candidate_version": candidate.policy_version,
        "gate": decision.as_dict(),
        "passed": bool(decision.promote),
        "reason": decision.reason,
    }
    return candidate, report
