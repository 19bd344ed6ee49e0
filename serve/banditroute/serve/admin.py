"""The admin API of the ingress (``/v1/admin/*``, API-key group ``admin``, disabled unless keys are set).

- ``GET /v1/admin/security``: the security rejections counted by the
  answering ingress replica (the ``banditroute_security_rejections_total``
  metric sums all replicas), the key groups and limits in force.
- ``GET /v1/admin/policy``: the learner's promotion gate (serving vs
  candidate version, pin, last decisions) and its checkpointed versions.
- ``POST /v1/admin/policy/pin``: ``{"version": N}`` (a learner checkpoint:
  rollback) or ``{"checkpoint": "<URI>"}`` (e.g. an offline train-from-log
  candidate): serve those weights under a new version; promotions are held
  until ``POST /v1/admin/policy/unpin``.

- ``/v1/admin/models`` (GET, POST) and ``/v1/admin/models/{name}`` (PATCH
  price, DELETE): the pool of an identity policy, serve/pool_admin.py
  (``PoolAdmin``, mounted here; 409 for fixed-pool policy kinds).

The policy routes call the learner actor (``learner_actor_name``) by name:
404 when the router has none, 503 with ``Retry-After`` while it is
unreachable, 422 when it refuses the request (its ValueError, ``field`` from
the message's ``field: ...`` prefix).
"""

from __future__ import annotations

import asyncio
from typing import Any

import ray

from banditroute.core.security import Security, SecurityConfig
from banditroute.serve.pool_admin import PoolAdmin  # noqa: F401  (the ingress mounts it with the other admin routes)
from banditroute.serve.protocol import RETRY_AFTER, RequestError

LEARNER_TIMEOUT_S = 60.0


def security_report(ingress_replica_id: str, security: Security, config: SecurityConfig,
                    rejections: dict[str, int]) -> dict[str, Any]:
    """The body of GET /v1/admin/security (no secret or key is ever in it, only counts)."""
    return {
        "ingress_replica_id": ingress_replica_id,
        "rejections": dict(sorted(rejections.items())),
        "signed_tokens": security.signing,
        "token_ttl_s": config.token_ttl_s,
        "secrets_accepted": len(security.secrets),
        "api_keys": {group: ("disabled" if group == "admin" else "open") if keys is None else f"{len(keys)} key(s)"
                     for group, keys in security.keys.items()},
        "max_body_bytes": {group: config.body_limit(group)[0] for group in ("route", "feedback", "admin")},
        "max_reward_cost_usd": config.max_reward_cost_usd,
        "api_docs": config.api_docs,
    }


def parse_pin_body(body: Any) -> tuple[int | None, str | None]:
    """A pin body -> (checkpointed version, None) or (None, checkpoint location); RequestError 422 otherwise."""
    if not isinstance(body, dict) or len(body) != 1 or not set(body) <= {"version", "checkpoint"}:
        raise RequestError(422, "version", 'the body must be {"version": <checkpointed version>} or {"checkpoint": "<URI>"}')
    if "checkpoint" in body:
        location = body["checkpoint"]
        if not isinstance(location, str) or not location.strip() or len(location) > 2048:
            raise RequestError(422, "checkpoint", "checkpoint must be a storage URI or folder of a BaRP checkpoint")
        return None, location
    version = body["version"]
    if isinstance(version, bool) or not isinstance(version, int) or version < 0:
        raise RequestError(422, "version", f"version must be a non-negative integer, got {version!r}")
    return version, None


class LearnerAdmin:
    """The learner actor's admin methods, called by name (looked up per call: the actor may restart)."""

    def __init__(self, actor_name: str | None, namespace: str | None):
        self.actor_name, self.namespace = actor_name, namespace

    async def _call(self, method: str, *args: Any) -> Any:
        name = self.actor_name
        if name is None:
            raise RequestError(404, None, "no learner behind this router: set learner_actor_name (online.enabled does)")
        try:
            handle = await asyncio.to_thread(ray.get_actor, name, self.namespace)
        except ValueError:
            raise RequestError(503, None, f"the learner actor {name!r} is not running (restarting?); retry", headers=RETRY_AFTER) from None
        try:
            return await asyncio.wait_for(getattr(handle, method).remote(*args), timeout=LEARNER_TIMEOUT_S)
        except ray.exceptions.RayTaskError as exc:
            cause = getattr(exc, "cause", None)
            if isinstance(cause, ValueError):  # the learner's own validation, e.g. "version: no checkpoint v7"
                message = str(cause) or "rejected"
                field = message.split(":", 1)[0] if ":" in message else None
                raise RequestError(422, field if field and " " not in field else None, message[:500]) from None
            raise RequestError(503, None, f"the learner failed: {type(cause).__name__}", headers=RETRY_AFTER) from None
        except (asyncio.TimeoutError, ray.exceptions.RayActorError) as exc:
            raise RequestError(503, None, f"the learner actor is unavailable: {type(exc).__name__}; retry", headers=RETRY_AFTER) from None

    async def status(self) -> dict[str, Any]:
        """Promotion gate state plus ``checkpoints`` (the checkpointed versions)."""
        status = await self._call("promotion_status")
        return dict(status, checkpoints=await self._call("list_checkpoints"))

    async def pin(self, body: Any) -> Any:
        version, location = parse_pin_body(body)
        if location is not None:
            return await self._call("pin", None, location)
        return await self._call("pin", version)

    async def unpin(self) -> Any:
        return await self._call("unpin")
