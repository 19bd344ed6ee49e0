"""Experiments and shadow mode on the serving path, and the experiments report of the admin API.

:func:`apply_overrides` runs on every decided batch (``RouterCore.route_batch``):

- a request with ``shadow_model`` (a chat naming a pool model, or /v1/route
  with ``"shadow": true`` and ``"model"``) is served by that model;
- otherwise each experiment (in config order) may enrol the request: its arm
  is drawn by a sticky hash of the request key (``user``, else the decision
  id, ``policy.experiments.assign_arm``); a fixed-model arm serves its model.
  A fixed arm whose model is not among the request's candidates does not
  enrol it (the next experiment may); nor does a pinned arm whose policy
  cannot score the batch's pool (serve/pinned_arms.py, which decided the
  pinned arm's rows before this step).

When an override serves a model, the decision logs it as ``chosen_model``
with probability 1 (the logging policy of that request was the override),
the policy's own choice and its probability as ``router_model`` /
``router_probability``, and ``override`` says which ('shadow' or
'experiment'). So the learner trains only on what was served, and OPE of the
router over such a log uses the right propensities (``banditroute ope``).

:func:`read_experiment_rows` reads the decision and event logs (core/event_log.py)
for ``GET /v1/admin/experiments``; the report itself is the pure
``policy.experiments.experiment_report``.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

from banditroute.core.records import DECISION_SCHEMA, EVENT_SCHEMA, DecisionRecord
from banditroute.core.storage import StorageConfig
from banditroute.policy.experiments import OVERRIDE_EXPERIMENT, OVERRIDE_SHADOW, ExperimentConfig, enrolled_arm
from banditroute.serve.protocol import RequestError, RouteRequest

REPORT_COLUMNS = ("decision_id", "chosen_model", "served_model", "experiment", "arm")
"""Decision-log columns the experiments report reads (events add score, cost, w_cost)."""


def overridden(decision: DecisionRecord, model: str, kind: str) -> DecisionRecord:
    """``decision`` served by ``model`` instead of the policy's choice, which is kept as router_model/probability."""
    return dataclasses.replace(decision, chosen_model=model, probability=1.0, override=kind,
                               router_model=decision.chosen_model, router_probability=decision.probability)


def apply_overrides(decisions: Sequence[DecisionRecord | None], reqs: Sequence[RouteRequest],
                    experiments: Sequence[ExperimentConfig],
                    pinnable: Callable[[str, str], bool] = lambda experiment, arm: False) -> list[DecisionRecord | None]:
    """The decisions with shadow models, experiment arms and tenants applied (None rows: not decided).

    ``pinnable(experiment, arm)``: whether a pinned arm may enrol (serve/pinned_arms.py ``PinnedArms.pinnable``,
    the same rule its rows were decided by); a pinned arm's rows already carry its policy's decision."""
    out: list[DecisionRecord | None] = []
    for d, req in zip(decisions, reqs):
        if d is None:
            out.append(None)
            continue
        if req.tenant:
            d = dataclasses.replace(d, tenant=req.tenant)
        if req.shadow_model:
            out.append(overridden(d, req.shadow_model, OVERRIDE_SHADOW))
            continue
        hit = enrolled_arm(experiments, req.user or d.decision_id, d.candidates, pinnable)
        if hit is not None:
            exp, arm = hit
            d = dataclasses.replace(d, experiment=exp.name, arm=arm.name)
            if arm.model is not None and arm.model != d.chosen_model:
                d = overridden(d, arm.model, OVERRIDE_EXPERIMENT)
            elif arm.model is not None:  # the policy chose the arm's model itself: still served by the arm, p = 1
                d = dataclasses.replace(d, probability=1.0, override=OVERRIDE_EXPERIMENT, router_model=d.chosen_model,
                                        router_probability=d.probability)
        out.append(d)
    return out


def read_experiment_rows(storage_config: StorageConfig | str, since: float | None = None) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(decision rows, event rows) of the log at ``storage_config`` (its endpoint and key env vars; a bare URI: the
    default settings) with the report's columns (rows outside experiments dropped)."""
    from banditroute.core.event_log import DECISIONS_PREFIX, EVENTS_PREFIX, list_parts, read_parts
    from banditroute.core.storage import open_storage

    storage = open_storage(storage_config)
    event_cols = list(REPORT_COLUMNS) + ["score", "cost", "w_cost"]
    decisions = read_parts(storage, list_parts(storage, DECISIONS_PREFIX, since), DECISION_SCHEMA, list(REPORT_COLUMNS))
    events = read_parts(storage, list_parts(storage, EVENTS_PREFIX, since), EVENT_SCHEMA, event_cols)
    return ([r for r in decisions.to_pylist() if r.get("experiment")],
            [r for r in events.to_pylist() if r.get("experiment")])


USER_HEADER = "x-banditroute-user"
"""Header naming the experiment assignment key when the body has no ``user`` field."""
MAX_USER_CHARS = 256


def parse_user(body: dict[str, Any], headers: Any = None) -> str | None:
    """The sticky-assignment key: the body's ``user`` (the OpenAI field), else the ``x-banditroute-user`` header."""
    user = body.get("user")
    if user is None and headers is not None:
        user = headers.get(USER_HEADER)
    if user is None:
        return None
    if not isinstance(user, str) or not user or len(user) > MAX_USER_CHARS:
        raise RequestError(422, "user", f"user must be a non-empty string of at most {MAX_USER_CHARS} characters")
    return user


def parse_shadow(body: dict[str, Any], models: Sequence[str]) -> str | None:
    """/v1/route's shadow mode: ``"shadow": true`` with ``"model"`` (a pool model) -> that model; else None."""
    shadow = body.get("shadow", False)
    if not isinstance(shadow, bool):
        raise RequestError(422, "shadow", "shadow must be true or false")
    model = body.get("model")
    if not shadow:
        if model is not None:
            raise RequestError(422, "model", 'model is only read in shadow mode: send "shadow": true to serve it')
        return None
    if not isinstance(model, str) or model not in models:
        raise RequestError(422, "model", f"shadow mode needs model: one of the pool {list(models)}")
    return model
