"""``POST /v1/feedback``: the handler logic (the Serve ingress calls :func:`handle_feedback`).

Body: ``{"decision_id": str, "score": float in [0, 1]}`` plus optional
``"cost": float >= 0`` (USD; default: the cost the upstream reported when the
router proxied the call, else 0).

Answers (status, JSON body):

=====  ============================================================================
200    ``{"status": "accepted", "trained": true, ...}``: the joined event is durable
200    ``{"status": "duplicate", "trained": false}``: a reward for this decision was
       already accepted (first reward wins); nothing changed, safe to retry
200    ``{"status": "late", "trained": false}``: the decision's reward window had
       closed; the reward is logged for audits but not trained on
400    the body is not a JSON object
404    ``decision_id``: no such decision (never routed, or forgotten)
422    a field is missing, of the wrong type or out of range (``field`` names it)
503    the event log or the feedback actor is unavailable; nothing was recorded,
       retry (``Retry-After`` header)
=====  ============================================================================
"""

from __future__ import annotations

import asyncio
import math
import time
from typing import Any

from banditroute.feedback.actor import FEEDBACK_ACTOR_NAME
from banditroute.learner.param_server import NAMESPACE
from banditroute.records import RewardRecord

ALLOWED_FIELDS = ("decision_id", "score", "cost")
RETRY_AFTER_S = 1


class FeedbackError(Exception):
    def __init__(self, status: int, message: str, field: str | None = None):
        super().__init__(message)
        self.status, self.message, self.field = status, message, field

    def body(self) -> dict[str, Any]:
        out: dict[str, Any] = {"error": {"message": self.message, "type": "invalid_request_error" if self.status < 500 else "unavailable"}}
        if self.field is not None:
            out["error"]["field"] = self.field
        return out


def _number(value: Any, field: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise FeedbackError(422, f"{field} must be a number, got {type(value).__name__}", field)
    if not math.isfinite(value):
        raise FeedbackError(422, f"{field} must be finite", field)
    return float(value)


def parse_feedback_body(body: Any, now: float | None = None) -> RewardRecord:
    """Validate a /v1/feedback body into a RewardRecord (FeedbackError naming the field otherwise)."""
    if not isinstance(body, dict):
        raise FeedbackError(400, "the body must be a JSON object with decision_id and score")
    unknown = sorted(set(body) - set(ALLOWED_FIELDS))
    if unknown:
        raise FeedbackError(422, f"unknown field(s) {unknown}; allowed: {list(ALLOWED_FIELDS)}", unknown[0])
    if "decision_id" not in body or body["decision_id"] is None:
        raise FeedbackError(422, "decision_id is required", "decision_id")
    decision_id = body["decision_id"]
    if not isinstance(decision_id, str) or not decision_id.strip():
        raise FeedbackError(422, "decision_id must be a non-empty string", "decision_id")
    if "score" not in body or body["score"] is None:
        raise FeedbackError(422, "score is required", "score")
    score = _number(body["score"], "score")
    if not 0.0 <= score <= 1.0:
        raise FeedbackError(422, f"score must be in [0, 1], got {score}", "score")
    cost = None
    if body.get("cost") is not None:
        cost = _number(body["cost"], "cost")
        if cost < 0:
            raise FeedbackError(422, f"cost must be >= 0, got {cost}", "cost")
    return RewardRecord(decision_id=decision_id, score=score, cost=cost, time=time.time() if now is None else now)


def feedback_target(router_config: Any) -> dict[str, Any]:
    """Which feedback actor the ingress sends rewards to: the one its replicas send decisions to.

    With ``decision_sink == "feedback-actor"`` its ``name``/``namespace``
    options are used (so decisions and rewards meet in one actor); otherwise
    the default ``banditroute-feedback`` in namespace ``banditroute``.
    """
    options = getattr(router_config, "decision_sink_options", None) or {}
    if getattr(router_config, "decision_sink", None) == "feedback-actor":
        return {"name": str(options.get("name", FEEDBACK_ACTOR_NAME)), "namespace": options.get("namespace", NAMESPACE)}
    return {"name": FEEDBACK_ACTOR_NAME, "namespace": NAMESPACE}


_ACTORS: dict[tuple[str, str | None], Any] = {}


async def _feedback_actor(name: str, namespace: str | None) -> Any:
    key = (name, namespace)
    if key not in _ACTORS:
        import ray

        _ACTORS[key] = await asyncio.to_thread(ray.get_actor, name, namespace)
    return _ACTORS[key]


async def submit(reward: RewardRecord, actor: Any = None, name: str = FEEDBACK_ACTOR_NAME,
                 namespace: str | None = NAMESPACE, timeout_s: float = 30.0) -> dict[str, Any]:
    """Send one reward to the feedback actor and wait for its answer."""
    try:
        handle = actor if actor is not None else await _feedback_actor(name, namespace)
        return await asyncio.wait_for(handle.submit_reward.remote(reward), timeout_s)
    except asyncio.TimeoutError:
        raise FeedbackError(503, f"the feedback actor did not answer within {timeout_s:.0f}s") from None
    except FeedbackError:
        raise
    except Exception as exc:  # actor missing or restarting
        _ACTORS.pop((name, namespace), None)
        raise FeedbackError(503, f"the feedback actor is unavailable: {type(exc).__name__}: {str(exc)[:200]}") from None


async def handle_feedback(body: Any, actor: Any = None, name: str = FEEDBACK_ACTOR_NAME,
                          namespace: str | None = NAMESPACE, timeout_s: float = 30.0) -> tuple[int, dict[str, Any], dict[str, str]]:
    """(HTTP status, JSON body, headers) for one POST /v1/feedback body."""
    try:
        reward = parse_feedback_body(body)
        ack = await submit(reward, actor, name, namespace, timeout_s)
    except FeedbackError as err:
        headers = {"Retry-After": str(RETRY_AFTER_S)} if err.status == 503 else {}
        return err.status, err.body(), headers
    return ack_to_http(ack)


def ack_to_http(ack: dict[str, Any]) -> tuple[int, dict[str, Any], dict[str, str]]:
    """Map the feedback actor's answer onto the HTTP contract."""
    status = ack.get("status")
    did = ack.get("decision_id")
    if status == "accepted":
        return 200, {"status": "accepted", "decision_id": did, "trained": True, "durable": True,
                     "model": ack.get("model"), "policy_version": ack.get("policy_version"), "cost": ack.get("cost"),
                     "reward_time": ack.get("reward_time")}, {}
    if status == "duplicate":
        return 200, {"status": "duplicate", "decision_id": did, "trained": False, "durable": True}, {}
    if status == "late":
        return 200, {"status": "late", "decision_id": did, "trained": False, "durable": True,
                     "finished_as": ack.get("finished_as")}, {}
    if status == "unknown":
        return 404, FeedbackError(404, ack.get("error") or f"unknown decision_id {did!r}", "decision_id").body(), {}
    if status == "invalid":
        return 422, FeedbackError(422, ack.get("error", "invalid reward"), ack.get("field")).body(), {}
    return 503, FeedbackError(503, ack.get("error") or "feedback unavailable").body(), {"Retry-After": str(RETRY_AFTER_S)}
