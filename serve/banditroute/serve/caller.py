"""Who is calling: the endpoint group and API-key headers of the HTTP request being answered.

The ingress's endpoint wrapper sets it once per request (a ContextVar: each
request runs in its own task, so concurrent requests never see each other's);
what runs beneath it reads it without every signature carrying headers:
the body limit of the group, the key a routed token binds, the key a reward
comes with. Python API callers (DeploymentHandle) have no HTTP request: they
see ``NO_CALLER`` (route group, no key). Kept in its own module: the ingress
class is pickled by Serve, a ContextVar is not picklable, a module is
imported by reference.
"""

from __future__ import annotations

from contextvars import ContextVar
from dataclasses import dataclass


@dataclass(frozen=True)
class Caller:
    """The endpoint group (route / feedback / admin, None for open endpoints) and the API-key headers sent."""

    group: str | None = "route"
    authorization: str | None = None
    x_api_key: str | None = None


NO_CALLER = Caller()
_CALLER: ContextVar[Caller] = ContextVar("banditroute_caller", default=NO_CALLER)


def set_caller(group: str | None, headers) -> None:
    """Record the request being answered (``headers``: any mapping with ``get``)."""
    _CALLER.set(Caller(group, headers.get("authorization"), headers.get("x-api-key")))


def current_caller() -> Caller:
    return _CALLER.get()
