"""The promotion gate: a new policy version is served only if it is not worse than the serving one.

Pure logic (no Ray, no storage); the learner actor applies it.

Held-out events. A fixed fraction of the joined events, chosen by a hash of
the decision id (so the choice is deterministic and the same after any
restart or replay), is never trained on; the most recent of them are kept in
a bounded buffer (:class:`HoldoutBuffer`). Events the candidate was trained
on would flatter it, events it never saw do not.

Target distribution. Both policies are evaluated as a Router replica would
SERVE them on each held-out request: the bounded softmax
(``policy.exploration``, the configured floor/ceiling, which must match the
router's) for requests logged in explore mode, the argmax for requests
logged in greedy mode. That is the value the traffic would actually get,
exploration cost included; evaluating the unbounded softmax or the argmax
alone would judge a router nobody runs.

Decision (a non-inferiority test on the paired difference). With
D = V(candidate) - V(serving), estimated on the SAME held-out events (paired
influence terms, ``ope.paired_estimates``, so the shared noise cancels),
the candidate is promoted iff the one-sided lower confidence bound
D - z * SE(D) >= -margin. So the evidence must show "not worse by more than
the margin"; a candidate whose difference is too uncertain to tell is held.

Too little evidence. Below ``min_holdout_events`` held-out events (a fresh
deployment, or a learner just restarted: the buffer lives in memory) the
candidate is HELD, never promoted on noise; replicas keep serving the last
promoted version and the learner keeps training. With the defaults (10%
held out, at least 30 events) the first promotion can come after ~300
decisions; that is the price of the gate, and ``banditroute up``'s 3000
decisions still show the climb. A small candidate step is cheap to pass
(the paired SE is small when the two policies are close), so once the
buffer has enough events, promotions follow the learner closely.
"""

from __future__ import annotations

import hashlib
import math
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa

from banditroute.learner.ope import DEFAULT_SWITCH_MAX_WEIGHT, ESTIMATORS, Estimate, paired_estimates, prepare_logged_data, served_probabilities
from banditroute.policy.exploration import DEFAULT_EXPLORATION_CEILING, DEFAULT_EXPLORATION_FLOOR, check_bounds
from banditroute.core.records import EventBatch

_HOLDOUT_SALT = b"banditroute-holdout-v1"


@dataclass
class PromotionConfig:
    """The promotion gate (off-policy evaluation of each candidate against the serving policy)."""

    enabled: bool = True
    """Gate new versions; False = publish after every update (no events held out)."""
    every_updates: int = 10
    """Evaluate the candidate every N learner updates (a promotion can only happen then)."""
    holdout_fraction: float = 0.1
    """Fraction of events (by decision-id hash) held out from training for the gate."""
    holdout_capacity: int = 2000
    """Most recent held-out events kept for evaluation."""
    min_holdout_events: int = 30
    """Fewer held-out events than this: the candidate is held (not promoted on noise)."""
    margin: float = 0.02
    """Promote iff the lower confidence bound of V(candidate) - V(serving) >= -margin (reward units)."""
    confidence_z: float = 1.645
    """z of that one-sided lower bound (1.645 = 95%)."""
    estimator: str = "switch_dr"
    """OPE estimator of the gate: 'switch_dr', 'dr', 'snips', 'ips' or 'dm' (learner.ope; module docstring: why switch_dr)."""
    switch_max_weight: float = DEFAULT_SWITCH_MAX_WEIGHT
    """switch_dr only: held-out events whose importance weight exceeds this count by the reward model alone."""
    reward_model_events: int = 5000
    """Most recent TRAINING events the gate's reward model (DR's q) is also fitted on; 0 = held-out events only."""
    reward_model_l2: float = 1.0
    """Ridge penalty of the gate's reward model (per-model score and cost regressions on the prompt embedding)."""
    exploration_floor: float = DEFAULT_EXPLORATION_FLOOR
    """Explore-mode floor the replicas apply (serve.exploration_floor); OPE evaluates the bounded distribution."""
    exploration_ceiling: float = DEFAULT_EXPLORATION_CEILING
    """Explore-mode ceiling the replicas apply (serve.exploration_ceiling)."""
    history: int = 100
    """Gate decisions (and pin/unpin actions) kept in the status."""

    def validate(self, prefix: str = "learner.promotion.") -> None:
        if self.every_updates < 1:
            raise ValueError(f"{prefix}every_updates must be >= 1")
        if not 0.0 < self.holdout_fraction < 1.0:
            raise ValueError(f"{prefix}holdout_fraction must be in (0, 1)")
        if self.holdout_capacity < 2:
            raise ValueError(f"{prefix}holdout_capacity must be >= 2")
        if self.min_holdout_events < 2:
            raise ValueError(f"{prefix}min_holdout_events must be >= 2 (a standard error needs two events)")
        if self.min_holdout_events > self.holdout_capacity:
            raise ValueError(f"{prefix}min_holdout_events must be <= {prefix}holdout_capacity")
        if not (self.margin >= 0 and math.isfinite(self.margin)):
            raise ValueError(f"{prefix}margin must be a finite number >= 0")
        if not self.confidence_z >= 0:
            raise ValueError(f"{prefix}confidence_z must be >= 0")
        if self.estimator not in ESTIMATORS:
            raise ValueError(f"{prefix}estimator must be one of {list(ESTIMATORS)}, got {self.estimator!r}")
        if not (self.switch_max_weight >= 1 and math.isfinite(self.switch_max_weight)):
            raise ValueError(f"{prefix}switch_max_weight must be a finite number >= 1")
        check_bounds(self.exploration_floor, self.exploration_ceiling, prefix)
        if not (self.reward_model_l2 > 0 and math.isfinite(self.reward_model_l2)):
            raise ValueError(f"{prefix}reward_model_l2 must be a finite number > 0")
        if self.reward_model_events < 0:
            raise ValueError(f"{prefix}reward_model_events must be >= 0")
        if self.history < 1:
            raise ValueError(f"{prefix}history must be >= 1")


# --- the held-out split -------------------------------------------------------------


def holdout_score(decision_id: str) -> float:
    """A uniform number in [0, 1) fixed by the decision id (stable across processes and restarts)."""
    digest = hashlib.blake2b(decision_id.encode("utf-8", "surrogatepass"), digest_size=8, key=_HOLDOUT_SALT).digest()
    return int.from_bytes(digest, "big") / 2.0**64


def is_held_out(decision_ids: list[str], fraction: float) -> np.ndarray:
    """Boolean per decision id: held out from training (hash below ``fraction``)."""
    return np.array([holdout_score(d) < fraction for d in decision_ids], dtype=bool)


def split_holdout(events: pa.Table, fraction: float) -> tuple[pa.Table, pa.Table]:
    """(events to train on, held-out events) of a joined-events table."""
    held = is_held_out(events.column("decision_id").to_pylist(), fraction)
    if not held.any():
        return events, events.slice(0, 0)
    return events.filter(pa.array(~held)), events.filter(pa.array(held))


class HoldoutBuffer:
    """The most recent ``capacity`` held-out events (an Arrow table, oldest dropped first)."""

    def __init__(self, capacity: int):
        self.capacity = int(capacity)
        self._parts: list[pa.Table] = []
        self._rows = 0
        self.seen = 0
        """Held-out events ever added (including those dropped since)."""

    def __len__(self) -> int:
        return self._rows

    def add(self, events: pa.Table) -> None:
        if len(events) == 0:
            return
        self.seen += len(events)
        self._parts.append(events)
        self._rows += len(events)
        if self._rows > self.capacity:
            table = pa.concat_tables(self._parts, promote_options="default")
            table = table.slice(len(table) - self.capacity)
            self._parts, self._rows = [table], len(table)

    def table(self) -> pa.Table | None:
        if not self._parts:
            return None
        if len(self._parts) > 1:
            self._parts = [pa.concat_tables(self._parts, promote_options="default")]
        return self._parts[0]


# --- evaluation and the decision ---------------------------------------------------


@dataclass
class Comparison:
    """Candidate vs serving on the same held-out events."""

    candidate: Estimate
    serving: Estimate
    difference: Estimate
    """V(candidate) - V(serving), with the paired standard error."""
    n_events: int
    """Held-out events used (those whose logged model is in the candidate's pool)."""


def compare_on_holdout(events: pa.Table | EventBatch, candidate: Any, serving: Any, cfg: PromotionConfig,
                       modes: list[str] | None = None, reward_model_events: pa.Table | None = None) -> Comparison:
    """OPE of both policies as the replicas would serve them (see the module docstring).

    ``modes`` is the logged mode per event (default: the table's ``mode``
    column; events without one count as explore). Both policies must share
    the pool and the tau (the learner's candidate and serving always do).
    ``reward_model_events`` (training events, disjoint from ``events``) are
    added to the fit of the reward model q.
    """
    if isinstance(events, pa.Table):
        if modes is None and "mode" in events.column_names:
            modes = events.column("mode").to_pylist()
        batch = EventBatch.from_table(events)
    else:
        batch = events
    extra = None
    if reward_model_events is not None and len(reward_model_events):
        extra = EventBatch.from_table(reward_model_events) if isinstance(reward_model_events, pa.Table) else reward_model_events
    data = prepare_logged_data(batch, candidate, l2=cfg.reward_model_l2, reward_model_events=extra)
    explore = np.ones(len(data.rows), dtype=bool)
    if modes is not None:
        explore = np.array([modes[i] != "greedy" for i in data.rows], dtype=bool)
    w = data.w.astype(np.float32)
    idx = np.arange(len(data.rows))
    rhos, q_targets = [], []
    for policy in (candidate, serving):
        pi = served_probabilities(policy, data.x, w, data.mask, explore, cfg.exploration_floor, cfg.exploration_ceiling)
        rhos.append(pi[idx, data.actions] / data.mu)
        q_targets.append((pi * data.q).sum(axis=1))
    cand, serv, diff = paired_estimates(cfg.estimator, data.rewards, rhos[0], rhos[1], data.q_logged, q_targets[0], q_targets[1],
                                        cfg.switch_max_weight)
    return Comparison(cand, serv, diff, int(len(data.rows)))


@dataclass
class PromotionDecision:
    """One gate decision: promote or hold, why, and the numbers behind it."""

    promote: bool
    reason: str
    n_events: int
    estimator: str
    margin: float
    candidate: dict[str, float] | None = None
    """{'value', 'se', 'ci95_low', 'ci95_high'} of V(candidate)."""
    serving: dict[str, float] | None = None
    """The same for V(serving)."""
    difference: dict[str, float] | None = None
    """V(candidate) - V(serving): value, paired se, 95% CI and the gate's lower bound."""
    candidate_version: int | None = None
    serving_version: int | None = None
    time: float = field(default_factory=time.time)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _numbers(e: Estimate) -> dict[str, float]:
    lo, hi = e.ci95
    return {"value": e.value, "se": e.se, "ci95_low": lo, "ci95_high": hi}


def promotion_decision(
    candidate_estimate: Estimate | None,
    serving_estimate: Estimate | None,
    n_events: int,
    cfg: PromotionConfig,
    difference: Estimate | None = None,
) -> PromotionDecision:
    """Promote iff the evidence shows the candidate is not worse than serving by more than ``cfg.margin``.

    ``difference`` is the paired estimate of V(candidate) - V(serving) on the
    same events; without it the two estimates are treated as independent
    (SE = sqrt(se_c^2 + se_s^2), conservative). Below ``min_holdout_events``
    the candidate is held. A disabled gate promotes everything.
    """
    base = {"n_events": int(n_events), "estimator": cfg.estimator, "margin": float(cfg.margin)}
    if not cfg.enabled:
        return PromotionDecision(True, "gate disabled: every version is published", **base)
    if n_events < cfg.min_holdout_events or candidate_estimate is None or serving_estimate is None:
        return PromotionDecision(
            False, f"insufficient evidence: {n_events} held-out events < min_holdout_events {cfg.min_holdout_events}", **base
        )
    if difference is None:
        difference = Estimate(
            candidate_estimate.estimator,
            candidate_estimate.value - serving_estimate.value,
            math.sqrt(candidate_estimate.se**2 + serving_estimate.se**2),
        )
    numbers = {"candidate": _numbers(candidate_estimate), "serving": _numbers(serving_estimate)}
    lower = difference.value - cfg.confidence_z * difference.se
    diff = {**_numbers(difference), "lower_bound": lower, "confidence_z": cfg.confidence_z}
    if not (math.isfinite(lower) and math.isfinite(candidate_estimate.value) and math.isfinite(serving_estimate.value)):
        return PromotionDecision(False, f"estimate not finite (difference {difference.value}, se {difference.se})",
                                 **base, **numbers, difference=diff)
    if lower >= -cfg.margin:
        reason = (f"not worse: candidate - serving = {difference.value:+.4f} (se {difference.se:.4f}), "
                  f"lower bound {lower:+.4f} >= -margin {-cfg.margin:+.4f}")
        return PromotionDecision(True, reason, **base, **numbers, difference=diff)
    reason = (f"possibly worse: candidate - serving = {difference.value:+.4f} (se {difference.se:.4f}), "
              f"lower bound {lower:+.4f} < -margin {-cfg.margin:+.4f}")
    return PromotionDecision(False, reason, **base, **numbers, difference=diff)


def evaluate_candidate(holdout: pa.Table | None, candidate: Any, serving: Any, cfg: PromotionConfig,
                       reward_model_events: pa.Table | None = None) -> PromotionDecision:
    """The whole gate on a held-out table: too little evidence -> hold; else compare and decide.

    ``reward_model_events``: recent training events for the reward model (``compare_on_holdout``).
    """
    n = 0 if holdout is None else len(holdout)
    if holdout is None or n < cfg.min_holdout_events:
        decision = promotion_decision(None, None, n, cfg)
    else:
        try:
            cmp = compare_on_holdout(holdout, candidate, serving, cfg, reward_model_events=reward_model_events)
        except ValueError as exc:  # e.g. no held-out event chose a model of the pool
            decision = promotion_decision(None, None, 0, cfg)
            decision.reason = f"cannot evaluate: {exc}"
        else:
            decision = promotion_decision(cmp.candidate, cmp.serving, cmp.n_events, cfg, cmp.difference)
    decision.candidate_version = int(candidate.policy_version)
    decision.serving_version = int(serving.policy_version)
    return decision
