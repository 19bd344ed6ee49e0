"""A/B experiments over routing: configuration, sticky arm assignment, and the per-arm report (pure, no Ray).

An experiment splits traffic between arms by weight. An arm either lets the
served policy decide (``model`` and ``checkpoint`` unset), serves one fixed
pool model (``model``), which is logged with propensity 1: the logging policy
of that arm IS the fixed model, so off-policy estimates over the log stay
correct; or pins a policy (``checkpoint``), which decides the arm's requests
and logs its own version and propensities (serve/pinned_arms.py).
Assignment is sticky: the same request key (a ``user`` field or header; else
the decision id) lands in the same arm for as long as the experiment's name
and arms are unchanged, because it is a hash of (experiment name, key), not
a random draw.

:func:`experiment_report` turns decision and event rows (the decision log's
and the event log's columns, ``core/records.py``) into the shape that
``GET /v1/admin/experiments`` and `banditroute up`'s ``summary.json`` report.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np

from banditroute.policy.reward import reward

OVERRIDE_EXPERIMENT = "experiment"
"""``DecisionRecord.override`` of a decision whose served model a fixed-model arm set."""
OVERRIDE_SHADOW = "shadow"
"""``DecisionRecord.override`` of a decision whose served model the request named (shadow mode)."""


@dataclass
class ArmConfig:
    """One arm of an experiment."""

    name: str
    """Arm name, logged with every decision it takes (``DecisionRecord.arm``)."""
    weight: float = 1.0
    """Share of the experiment's traffic (weights are normalised over the arms)."""
    model: str | None = None
    """Fixed pool model this arm serves (logged with propensity 1); None = the served policy decides."""
    checkpoint: str | None = None
    """Pinned policy: a checkpoint folder or storage URI (as ``POST /v1/admin/policy/pin`` takes) whose policy decides
    this arm's requests, logging its own version and propensities; None = the served policy decides."""
    policy_version: int | None = None
    """Pinned policy by version: the learner's checkpoint of that version under the application's storage (the cluster
    layer turns it into ``checkpoint``); exclusive with ``checkpoint`` and ``model``."""

    def check(self, where: str) -> None:
        if not self.name or not isinstance(self.name, str):
            raise ValueError(f"{where}.name: must be a non-empty string")
        if not (self.weight > 0 and math.isfinite(self.weight)):
            raise ValueError(f"{where}.weight: must be > 0, got {self.weight!r}")
        if self.model is not None and not self.model:
            raise ValueError(f"{where}.model: must be a pool model name (or left out)")
        if self.checkpoint is not None:
            if not isinstance(self.checkpoint, str) or not self.checkpoint.strip():
                raise ValueError(f"{where}.checkpoint: must be a checkpoint folder or storage URI (or left out)")
            if self.model is not None:
                raise ValueError(f"{where}.checkpoint: an arm either serves a fixed model or pins a policy, not both")
        if self.policy_version is not None:
            if isinstance(self.policy_version, bool) or not isinstance(self.policy_version, int) or self.policy_version < 0:
                raise ValueError(f"{where}.policy_version: must be a policy version (an integer >= 0)")
            if self.model is not None:
                raise ValueError(f"{where}.policy_version: an arm either serves a fixed model or pins a policy, not both")
            if self.checkpoint is None:
                raise ValueError(f"{where}.policy_version: needs the application's storage to find the checkpoint "
                                 f"(set storage.uri in the application config, or give the arm a checkpoint)")


@dataclass
class ExperimentConfig:
    """One experiment: a name and its arms."""

    name: str
    """Experiment name (logged with every decision: ``DecisionRecord.experiment``)."""
    arms: list[ArmConfig] = field(default_factory=list)
    """At least two arms; traffic is split by their weights."""

    def validate(self) -> None:
        if not self.name:
            raise ValueError("experiments[].name: must be a non-empty string")
        if len(self.arms) < 2:
            raise ValueError(f"experiments.{self.name}.arms: an experiment needs at least two arms")
        seen: set[str] = set()
        for i, arm in enumerate(self.arms):
            arm.check(f"experiments.{self.name}.arms[{i}]")
            if arm.name in seen:
                raise ValueError(f"experiments.{self.name}.arms[{i}].name: duplicate arm {arm.name!r}")
            seen.add(arm.name)


def arm_field(experiment: ExperimentConfig, arm: ArmConfig) -> str:
    """The dotted config field of ``arm`` (what errors about it name)."""
    return f"experiments.{experiment.name}.arms[{experiment.arms.index(arm)}]"


def check_experiments(experiments: Sequence[ExperimentConfig]) -> None:
    """Names unique (several experiments run side by side, each on all traffic: the first that enrols a request wins)."""
    names = [e.name for e in experiments]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ValueError(f"experiments: duplicate experiment name(s) {dupes}")
    for e in experiments:
        e.validate()


def bucket(experiment: str, key: str) -> float:
    """A uniform number in [0, 1) fixed by (experiment, key): sticky, and independent across experiments."""
    digest = hashlib.sha256(f"{experiment}\x00{key}".encode("utf-8", "surrogatepass")).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def assign_arm(experiment: ExperimentConfig, key: str) -> ArmConfig:
    """The arm ``key`` belongs to (weights normalised; the same key always gets the same arm)."""
    u = bucket(experiment.name, key) * sum(a.weight for a in experiment.arms)
    acc = 0.0
    for arm in experiment.arms:
        acc += arm.weight
        if u < acc:
            return arm
    return experiment.arms[-1]


def enrolled_arm(experiments: Sequence[ExperimentConfig], key: str, candidates: Sequence[str],
                 pinnable: Callable[[str, str], bool]) -> tuple[ExperimentConfig, ArmConfig] | None:
    """The (experiment, arm) that enrols the request keyed ``key``: the first experiment in config order whose sticky
    arm can take it. A fixed arm cannot when its model is not a candidate; a pinned arm cannot unless
    ``pinnable(experiment, arm)`` (its policy is loaded and scores the batch's pool). None: no experiment enrols it."""
    for exp in experiments:
        arm = assign_arm(exp, key)
        if arm.model is not None and arm.model not in candidates:
            continue
        if arm.checkpoint is not None and not pinnable(exp.name, arm.name):
            continue
        return exp, arm
    return None


def ci95(values: np.ndarray) -> list[float] | None:
    """Normal-approximation 95% interval of the mean of ``values`` (None for fewer than two)."""
    n = len(values)
    if n < 2:
        return None
    mean, se = float(values.mean()), float(values.std(ddof=1) / math.sqrt(n))
    return [mean - 1.96 * se, mean + 1.96 * se]


def _served(row: Mapping[str, Any]) -> str:
    return row.get("served_model") or row["chosen_model"]


def experiment_report(experiments: Sequence[ExperimentConfig], decisions: Iterable[Mapping[str, Any]],
                      events: Iterable[Mapping[str, Any]], tau: float) -> dict[str, Any]:
    """``{"experiments": [{"name", "arms": [{"name", "decisions", "rewards", "mean_reward", "ci95", "models"}]}]}``.

    ``decisions``: decision rows (``experiment``, ``arm``, ``chosen_model``,
    ``served_model``, ``decision_id``); ``events``: event rows (the same
    columns plus ``score``, ``cost``, ``w_cost``). A decision whose row is in
    neither stream is not counted; an event counts as a decision too when its
    decision row is missing (the decision log is read from a different
    stream). ``models`` is each served model's share of the arm's decisions;
    ``mean_reward`` uses the policy's ``tau``. Arms of the config come first
    in config order; arms seen only in the rows (a since-removed arm) follow.
    """
    per_arm: dict[tuple[str, str], dict[str, Any]] = {}

    def slot(row: Mapping[str, Any]) -> dict[str, Any] | None:
        exp, arm = row.get("experiment"), row.get("arm")
        if not exp or not arm:
            return None
        return per_arm.setdefault((exp, arm), {"decided": {}, "rewards": []})

    for row in decisions:
        s = slot(row)
        if s is not None:
            s["decided"][row["decision_id"]] = _served(row)
    rewarded: set[str] = set()
    for row in events:
        s = slot(row)
        if s is None or row["decision_id"] in rewarded:
            continue  # first event per decision (the log may hold a replayed duplicate)
        rewarded.add(row["decision_id"])
        s["decided"].setdefault(row["decision_id"], _served(row))
        s["rewards"].append(float(reward(row["score"], row["cost"], row["w_cost"], tau)))

    out = []
    names = [e.name for e in experiments] + sorted({e for e, _ in per_arm} - {e.name for e in experiments})
    config = {e.name: e for e in experiments}
    for name in names:
        arm_names = [a.name for a in config[name].arms] if name in config else []
        arm_names += sorted({a for e, a in per_arm if e == name} - set(arm_names))
        arms = []
        for arm in arm_names:
            s = per_arm.get((name, arm), {"decided": {}, "rewards": []})
            served = list(s["decided"].values())
            r = np.asarray(s["rewards"], dtype=np.float64)
            shares = {m: served.count(m) / len(served) for m in sorted(set(served), key=lambda m: -served.count(m))}
            arms.append({
                "name": arm,
                "decisions": len(served),
                "rewards": int(len(r)),
                "mean_reward": float(r.mean()) if len(r) else None,
                "ci95": ci95(r),
                "models": shares,
            })
        out.append({"name": name, "arms": arms})
    return {"experiments": out}
