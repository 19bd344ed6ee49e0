"""Tenants: an API key maps to a tenant, and the tenant's defaults apply to its requests.

A tenant (``tenants:`` in the application config, ``RouterConfig.tenants``)
has:

- its keys: ``api_keys_env`` names the environment variable holding its
  comma-separated keys (secrets never go in the YAML; these keys are admitted
  to the route and feedback groups, like route keys), and/or
  ``api_key_ids`` lists the ids (``core.security.api_key_id``, the 16-hex
  SHA-256 prefix tokens and logs show) of keys the route group admits;
- a default ``preference`` for requests that send none;
- ``models``: a candidate allow-list. A request may narrow it (``candidates``
  within it); naming a model outside it (``candidates``, or a shadow
  ``model``) is refused with 403 naming the field: a request never widens
  its tenant's allow-list. Without ``candidates`` a request routes over the
  allow-list (the part of it in the pool);
- its own rate limit (``rate_limit_per_s`` / ``rate_limit_burst``): one
  token bucket shared by all of the tenant's keys, per ingress replica, in
  place of the per-key ``limits.rate_limit_per_s``.
- its budget (``budget_usd_per_1k``): one more scope, ``tenant:<name>``, of
  the live budget pacing (serve/budget.py; :func:`with_tenant_budgets`), so
  the tenant's spend per 1,000 requests is held by moving its requests'
  w_cost, on top of the global and per-key targets.

The tenant comes from the key only: ``RouteRequest.tenant`` is overwritten
from the key for HTTP callers, and a body cannot set it. In-cluster Python
callers (RouterClient, no HTTP key) may name a configured tenant in
``RouteRequest.tenant``: its allow-list then applies too. The decision log
(``tenant`` column) and the metrics (``banditroute_requests_total`` and
``banditroute_decisions_total`` by ``tenant``) carry it.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any, Mapping, Sequence

from banditroute.core.security import api_key_id, presented_key, split_keys
from banditroute.serve.budget import BudgetConfig
from banditroute.serve.caller import current_caller
from banditroute.serve.protocol import RequestError, RouteRequest, short_repr
from banditroute.serve.rate_limit import KeyedRateLimiter, retry_after_header
from banditroute.serve.tenant_config import TenantConfig, check_tenants  # noqa: F401 - re-exported

KEY_GROUPS = ("route", "feedback")
"""Endpoint groups a tenant's own keys (``api_keys_env``) are admitted to."""


@dataclass
class Tenant:
    """A configured tenant as an ingress replica applies it."""

    name: str
    w_cost: float | None
    models: tuple[str, ...] | None
    limiter: KeyedRateLimiter | None
    own_keys: bool
    """The key was one of the tenant's own (``api_keys_env``): admitted to the route and feedback groups."""


class TenantTable:
    """Key id -> tenant, read once per ingress replica (env vars at start); empty = no tenants configured."""

    def __init__(self, tenants: Sequence[TenantConfig], default_burst: int = 100,
                 environ: Mapping[str, str] | None = None, clock: Callable[[], float] = time.monotonic):
        env = os.environ if environ is None else environ
        self._by_name: dict[str, Tenant] = {}
        self._by_key: dict[str, tuple[Tenant, bool]] = {}
        for i, t in enumerate(tenants):
            limiter = None
            if t.rate_limit_per_s is not None:
                limiter = KeyedRateLimiter(t.rate_limit_per_s, t.rate_limit_burst or default_burst, 1, clock)
            tenant = Tenant(t.name, t.w_cost(), tuple(t.models) if t.models is not None else None, limiter, False)
            self._by_name[t.name] = tenant
            for kid in t.api_key_ids:
                self._by_key[kid] = (tenant, False)
            if t.api_keys_env:
                keys = split_keys(env.get(t.api_keys_env))
                if not keys:
                    raise ValueError(f"tenants[{i}].api_keys_env: the environment variable {t.api_keys_env!r} is unset or holds no keys")
                for key in keys:
                    kid = api_key_id(key)
                    if kid in self._by_key and self._by_key[kid][0] is not tenant:
                        raise ValueError(f"tenants[{i}].api_keys_env: a key in {t.api_keys_env!r} already belongs to tenant "
                                         f"{self._by_key[kid][0].name!r}")
                    self._by_key[kid] = (tenant, True)

    def __bool__(self) -> bool:
        return bool(self._by_name)

    @property
    def names(self) -> list[str]:
        return list(self._by_name)

    def for_key(self, authorization: str | None, x_api_key: str | None) -> Tenant | None:
        """The tenant of the key a request carries (None: no key, or a key of no tenant)."""
        if not self._by_key:
            return None
        presented = presented_key(authorization, x_api_key)
        if presented is None:
            return None
        hit = self._by_key.get(api_key_id(presented))
        if hit is None:
            return None
        tenant, own = hit
        return Tenant(tenant.name, tenant.w_cost, tenant.models, tenant.limiter, own)

    def admits(self, group: str, authorization: str | None, x_api_key: str | None) -> bool:
        """Whether the key is one of a tenant's own keys (``api_keys_env``) and ``group`` admits tenants' keys."""
        tenant = self.for_key(authorization, x_api_key) if group in KEY_GROUPS else None
        return tenant is not None and tenant.own_keys

    def resolve(self, caller_tenant: Tenant | None, claimed: str) -> Tenant | None:
        """The tenant a request is routed for: its key's; else (no key tenant: in-cluster callers) the one it names."""
        if caller_tenant is not None:
            return caller_tenant
        if claimed and claimed not in self._by_name:
            raise RequestError(422, "tenant", f"unknown tenant {short_repr(claimed)}; configured: {self.names}")
        return self._by_name.get(claimed) if claimed else None

    def check_rate(self, tenant: Tenant | None) -> bool:
        """True when the tenant has its own rate limit and this request is within it; False: the per-key limit
        applies; RequestError 429 (``Retry-After``) when the tenant is over its rate."""
        if tenant is None or tenant.limiter is None:
            return False
        wait = tenant.limiter.check(tenant.name)
        if wait > 0:
            raise RequestError(429, "authorization", f"rate limit of tenant {tenant.name!r} exceeded "
                                                     f"(tenants.rate_limit_per_s={tenant.limiter.rate_per_s:g}, burst "
                                                     f"{tenant.limiter.burst:g}); retry in {wait:.2f}s",
                               type_="rate_limit_error", headers=retry_after_header(wait))
        return True


def apply_tenant(req: RouteRequest, tenant: Tenant | None, pool: Sequence[str], preference_given: bool,
                 prefix: str = "") -> RouteRequest:
    """``req`` for ``tenant`` (None: unchanged, its ``tenant`` cleared unless trusted): the tenant's name, its
    default preference when the request gave none, and its allow-list (403 naming the field when the request
    asks for a model outside it). ``prefix``: the item's field prefix in a batch (``requests[3].``)."""
    if tenant is None:
        return req
    req.tenant = tenant.name
    if not preference_given and tenant.w_cost is not None:
        req.w_cost = tenant.w_cost
    if tenant.models is None:
        return req
    allowed = [m for m in tenant.models if m in pool]
    if req.shadow_model is not None and req.shadow_model not in allowed:
        raise RequestError(403, prefix + "model", f"model {short_repr(req.shadow_model)} is not allowed for tenant "
                                                  f"{tenant.name!r} (allowed: {allowed})", type_="permission_error")
    if req.candidates is None:
        if not allowed:
            raise RequestError(403, prefix + "candidates", f"tenant {tenant.name!r} allows no model of the pool {list(pool)}",
                               type_="permission_error")
        req.candidates = allowed
        return req
    outside = [c for c in req.candidates if c not in allowed]
    if outside:
        raise RequestError(403, prefix + "candidates", f"candidates: {short_repr(outside[0])} is not allowed for tenant "
                                                       f"{tenant.name!r}; a request may only narrow its allow-list {allowed}",
                           type_="permission_error")
    return req


def preference_given(body: Any, shared: Mapping[str, Any] | None = None) -> bool:
    """Whether a route/chat body (or its batch's shared fields) sets a preference."""
    own = isinstance(body, dict) and body.get("preference") is not None
    return own or bool(shared and shared.get("preference") is not None)


def caller_tenant(table: TenantTable) -> Tenant | None:
    """The tenant of the HTTP request being answered (serve/caller.py; None for Python API callers)."""
    caller = current_caller()
    return table.for_key(caller.authorization, caller.x_api_key)


def apply_tenant_batch(reqs: list[RouteRequest], body: Any, tenant: Tenant | None, pool: Sequence[str]) -> list[RouteRequest]:
    """A parsed /v1/route/batch for ``tenant``: each item as :func:`apply_tenant`, errors naming ``requests[i].<field>``."""
    if tenant is None:
        return reqs
    items = body.get("requests") if isinstance(body, dict) and "requests" in body else None
    shared = body if isinstance(body, dict) else None
    for i, req in enumerate(reqs):
        item = items[i] if isinstance(items, list) else None
        own = isinstance(item, dict) and "candidates" in item  # else the batch's shared candidates are at fault
        apply_tenant(req, tenant, pool, preference_given(item, shared), f"requests[{i}]." if own else "")
    return reqs


def with_tenant_budgets(budget: BudgetConfig, tenants: Sequence[TenantConfig]) -> BudgetConfig:
    """``budget`` with each tenant's ``budget_usd_per_1k`` as its ``per_tenant_usd_per_1k`` target (a target
    given there directly for a tenant without one in ``tenants:`` stays)."""
    targets = {t.name: float(t.budget_usd_per_1k) for t in tenants if t.budget_usd_per_1k is not None}
    if not targets:
        return budget
    return replace(budget, per_tenant_usd_per_1k={**budget.per_tenant_usd_per_1k, **targets})
