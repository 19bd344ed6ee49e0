"""``POST /v1/feedback``: the handler logic (the Serve ingress, serve/ingress.py, calls :func:`handle_feedback`).

Body: ``{"decision_id": str, "score": float in [0, 1]}`` plus optional
``"cost": float in [0, security.max_reward_cost_usd]`` (USD; default: the cost
the upstream reported when the router proxied the call, else 0). Values are
validated, never clipped: an out-of-range value is refused (422), not bent.

``decision_id`` is the signed decision token the router answered
(core/security.py): the ingress verifies it BEFORE anything reaches the
feedback actor and hands the actor the raw id it binds (with
``security.require_signed_tokens: false`` raw ids are sent and accepted).

Answers (status, JSON body); ``decision_id`` in answers is the id the client sent. Every
error is a ``protocol.RequestError`` / ``protocol.error_body`` envelope
``{"error": {"message", "field", "type"}}``:

=====  ============================================================================
200    ``{"status": "accepted", "trained": true, ...}``: the joined event is durable
200    ``{"status": "late", "trained": false}``: the decision's reward window had
       closed; the reward is logged for audits but not trained on
400    the body is not (valid) JSON / not a JSON object (``field``: body)
401    API key missing or wrong (``field``: authorization; ``WWW-Authenticate``)
401    ``decision_id`` is not a signed token (unsigned), not token-shaped
       (malformed), or its signature does not match (tampered / another secret)
403    ``decision_id`` was routed under another route API key: only that key,
       or a dedicated feedback key (not a route key), may reward it
404    ``decision_id``: authentic token, but the feedback actor does not know the
       decision (never logged, or forgotten after the window + remember_s)
405    the router is frozen: its decisions go to a sink other than the feedback
       actor (``decision_sink`` is not ``feedback-actor``), so no reward can be
       joined; ``field`` null, ``Allow`` empty. Nothing is recorded
409    ``{"status": "duplicate", "trained": false, "durable": true}`` in an error
       envelope: a reward for this decision was already accepted (first reward
       wins; a replayed token). Nothing changed; clients treat 409 as done
410    ``decision_id``: the token expired (``security.token_ttl_s`` after the
       decision); nothing recorded
413    the body is larger than ``security.feedback_max_body_bytes`` (16 KiB; ``field``: body)
422    a field is missing, of the wrong type or out of range (``field`` names it)
429    this API key is over ``limits.rate_limit_per_s`` (``Retry-After``)
503    the event log or the feedback actor is unavailable; nothing was recorded,
       retry (``Retry-After`` header). The message is generic (details in the
       ingress log under the incident id it names), except "event buffer full"
=====  ============================================================================

The ingress counts rejections by reason (``GET /v1/admin/security`` and the
``banditroute_security_rejections_total`` metric).
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
import uuid
from typing import Any, Callable

from banditroute.core.names import FEEDBACK_ACTOR_NAME, NAMESPACE
from banditroute.core.records import RewardRecord
from banditroute.serve.protocol import PUBLIC_5XX_MESSAGES, RETRY_AFTER, RequestError, error_body, short_repr

logger = logging.getLogger("banditroute.serve")

ALLOWED_FIELDS = ("decision_id", "score", "cost")
PUBLIC_UNAVAILABLE_PREFIX = "event buffer full"
"""The feedback actor's one 'unavailable' text that reaches clients as it is (spool back-pressure: counts only)."""


def _number(value: Any, field: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise RequestError(422, field, f"{field} must be a number, got {type(value).__name__}")
    try:
        number = float(value)
    except OverflowError:  # an int beyond float range
        raise RequestError(422, field, f"{field} is out of range") from None
    if not math.isfinite(number):
        raise RequestError(422, field, f"{field} must be finite")
    return number


def parse_feedback_body(body: Any, now: float | None = None, max_cost_usd: float | None = None) -> RewardRecord:
    """Validate a /v1/feedback body into a RewardRecord (RequestError naming the field otherwise).

    ``max_cost_usd``: the largest cost accepted (security.max_reward_cost_usd); None = no upper bound.
    """
    if not isinstance(body, dict):
        raise RequestError(400, "body", "the body must be a JSON object with decision_id and score")
    unknown = sorted(set(body) - set(ALLOWED_FIELDS))
    if unknown:
        raise RequestError(422, unknown[0][:200] or "<empty key>", f"unknown field(s) {short_repr(unknown, 200)}; allowed: {list(ALLOWED_FIELDS)}")
    if "decision_id" not in body or body["decision_id"] is None:
        raise RequestError(422, "decision_id", "decision_id is required")
    decision_id = body["decision_id"]
    if not isinstance(decision_id, str) or not decision_id.strip():
        raise RequestError(422, "decision_id", "decision_id must be a non-empty string")
    if "score" not in body or body["score"] is None:
        raise RequestError(422, "score", "score is required")
    score = _number(body["score"], "score")
    if not 0.0 <= score <= 1.0:
        raise RequestError(422, "score", f"score must be in [0, 1], got {score}")
    cost = None
    if body.get("cost") is not None:
        cost = _number(body["cost"], "cost")
        if cost < 0:
            raise RequestError(422, "cost", f"cost must be >= 0, got {cost}")
        if max_cost_usd is not None and cost > max_cost_usd:
            raise RequestError(422, "cost", f"cost must be <= {max_cost_usd:g} USD (security.max_reward_cost_usd), got {cost}")
    return RewardRecord(decision_id=decision_id, score=score, cost=cost, time=time.time() if now is None else now)


FROZEN_MESSAGE = ("this router is frozen (banditroute serve --frozen): it does not take feedback; its decisions "
                  "go to a decision sink other than the feedback actor, so no reward could be joined")
"""The 405 of /v1/feedback on a router with no online loop behind it."""


def feedback_target(router_config: Any) -> dict[str, Any]:
    """Which feedback actor the ingress sends rewards to: the one its replicas send decisions to.

    With ``decision_sink == "feedback-actor"`` its ``name``/``namespace``
    options are used (so decisions and rewards meet in one actor). Any other
    sink means a frozen router (no feedback actor would know its decisions):
    ``name`` None, and :func:`handle_feedback` answers 405.
    """
    options = getattr(router_config, "decision_sink_options", None) or {}
    if getattr(router_config, "decision_sink", None) == "feedback-actor":
        return {"name": str(options.get("name", FEEDBACK_ACTOR_NAME)), "namespace": options.get("namespace", NAMESPACE)}
    return {"name": None, "namespace": None}


_ACTORS: dict[tuple[str, str | None], Any] = {}


async def _feedback_actor(name: str, namespace: str | None) -> Any:
    """The named feedback actor's handle, cached per (name, namespace) until a call through it fails."""
    key = (name, namespace)
    if key not in _ACTORS:
        import ray  # lazily: this module's parsing and HTTP mapping are used (and tested) without Ray

        _ACTORS[key] = await asyncio.to_thread(ray.get_actor, name, namespace)
    return _ACTORS[key]


async def submit(reward: RewardRecord, actor: Any = None, name: str = FEEDBACK_ACTOR_NAME,
                 namespace: str | None = NAMESPACE, timeout_s: float = 30.0) -> dict[str, Any]:
    """Send one reward to the feedback actor and wait for its answer (RequestError 503 when it is unreachable).

    Any failure (timeout included) drops the cached handle, so the next
    request looks the name up again: a handle to an actor that was killed
    and re-created under the same name would otherwise fail (or wait) forever.
    """
    try:
        handle = actor if actor is not None else await _feedback_actor(name, namespace)
        return await asyncio.wait_for(handle.submit_reward.remote(reward), timeout_s)
    except asyncio.TimeoutError:
        _ACTORS.pop((name, namespace), None)
        raise RequestError(503, None, f"the feedback actor did not answer within {timeout_s:.0f}s", headers=RETRY_AFTER) from None
    except Exception as exc:  # actor missing or restarting
        _ACTORS.pop((name, namespace), None)
        raise RequestError(503, None, f"the feedback actor is unavailable: {type(exc).__name__}: {str(exc)[:200]}",
                           headers=RETRY_AFTER) from None


async def handle_feedback(body: Any, actor: Any = None, name: str | None = FEEDBACK_ACTOR_NAME,
                          namespace: str | None = NAMESPACE, timeout_s: float = 30.0,
                          resolve_decision_id: Callable[[str], str] | None = None,
                          max_cost_usd: float | None = None) -> tuple[int, dict[str, Any], dict[str, str]]:
    """(HTTP status, JSON body, headers) of the feedback actor's answer to one POST /v1/feedback body.

    A body refused before the actor is asked (invalid, bad token) or an
    unreachable actor raises RequestError; so does a frozen router (no
    ``actor`` and ``name`` None: 405 before the body is validated). ``resolve_decision_id`` maps the id
    the client sent (a signed token) to the raw decision id, or raises
    RequestError (401/410); it runs after the body is validated and before
    anything is sent to the actor.
    """
    if actor is None and name is None:
        raise RequestError(405, None, FROZEN_MESSAGE, headers={"Allow": ""})
    reward = parse_feedback_body(body, max_cost_usd=max_cost_usd)
    sent_id = reward.decision_id
    if resolve_decision_id is not None:
        reward.decision_id = resolve_decision_id(sent_id)
    ack = await submit(reward, actor, name, namespace, timeout_s)
    if resolve_decision_id is not None:
        ack = dict(ack, decision_id=sent_id)  # answer with the id the client knows
    return ack_to_http(ack)


def ack_to_http(ack: dict[str, Any]) -> tuple[int, dict[str, Any], dict[str, str]]:
    """Map the feedback actor's answer onto the HTTP contract."""
    status = ack.get("status")
    did = ack.get("decision_id")
    if status == "accepted":
        return 200, {"status": "accepted", "decision_id": did, "trained": True, "durable": True,
                     "model": ack.get("model"), "policy_version": ack.get("policy_version"), "cost": ack.get("cost"),
                     "reward_time": ack.get("reward_time")}, {}
    if status == "duplicate":  # replayed: idempotent, nothing changed; 409 so a replay is visible, clients treat it as done
        body = error_body(409, "a reward for this decision_id was already accepted (first reward wins); nothing changed", "decision_id")
        return 409, dict(body, status="duplicate", decision_id=did, trained=False, durable=True), {}
    if status == "late":
        return 200, {"status": "late", "decision_id": did, "trained": False, "durable": True,
                     "finished_as": ack.get("finished_as")}, {}
    if status == "unknown":
        return 404, error_body(404, ack.get("error") or f"unknown decision_id {short_repr(did)}", "decision_id"), {}
    if status == "invalid":
        return 422, error_body(422, ack.get("error", "invalid reward"), ack.get("field")), {}
    error = str(ack.get("error") or "")
    if error.startswith(PUBLIC_UNAVAILABLE_PREFIX):  # counts only: the client's cue to back off
        return 503, error_body(503, error[:300]), dict(RETRY_AFTER)
    incident = uuid.uuid4().hex[:12]
    logger.error("feedback unavailable (incident %s): %s", incident, error or ack)
    return 503, error_body(503, f"{PUBLIC_5XX_MESSAGES[503]} (incident {incident})"), dict(RETRY_AFTER)
