"""Admission at the ingress: who may call which endpoint group, how often, and which decision ids it may reward.

``Admission`` holds one ingress replica's gatekeeping state (split out of
serve/ingress.py, which keeps the routes):

- API keys per endpoint group (``core.security.Security``), a tenant's own
  keys admitted to the route and feedback groups (serve/tenants.py);
- rate limits: the tenant's one bucket when it has its own rate, else a
  bucket per API key (open groups: per client address);
- signed decision tokens: minted from a decider's raw id, bound to the
  caller's route key; verified before a reward reaches the feedback actor;
- every refusal counted by reason (``rejections`` for
  ``GET /v1/admin/security``, ``banditroute_security_rejections_total``).

Refusals are RequestErrors (401/403/410/429 naming ``authorization`` or
``decision_id``); the ingress's endpoint wrapper turns them into answers.
"""

from __future__ import annotations

import time
from typing import Any

from banditroute.core.security import Security, TokenError, api_key_id, presented_key
from banditroute.serve.caller import current_caller
from banditroute.serve.config import RouterConfig
from banditroute.serve.metrics import metric
from banditroute.serve.protocol import WWW_AUTHENTICATE, RequestError
from banditroute.serve.rate_limit import KeyedRateLimiter, retry_after_header
from banditroute.serve.tenants import Tenant, TenantTable, caller_tenant

# HTTP status of each decision-token rejection on /v1/feedback.
TOKEN_STATUS = {"unsigned": 401, "malformed": 401, "tampered": 401, "expired": 410}


class Admission:
    """Key checks, rate limits and decision tokens of one ingress replica; refusals counted by reason."""

    def __init__(self, cfg: RouterConfig):
        self.tenants = TenantTable(cfg.tenants, cfg.limits.rate_limit_burst)  # fails the replica on a missing key env var
        # Fails the replica (clear message naming security.token_secret_env / *_api_keys_env) when a secret is missing.
        self.security = Security(cfg.security)
        self.rejections: dict[str, int] = {}
        self.m_rejections = metric("counter", "banditroute_security_rejections_total",
                                   "Requests refused by the ingress's security checks, by reason.", ("reason",))
        limits = cfg.limits
        self.rate_limiter = KeyedRateLimiter(limits.rate_limit_per_s, limits.rate_limit_burst, limits.rate_limit_max_keys)

    def reject(self, reason: str) -> None:
        self.rejections[reason] = self.rejections.get(reason, 0) + 1
        self.m_rejections.inc(tags={"reason": reason})

    def tenant(self) -> Tenant | None:
        """The tenant of the HTTP request being answered (None: no tenant key, or a Python API caller)."""
        return caller_tenant(self.tenants)

    def authorize(self, headers: Any, group: str) -> None:
        """Pass when the request's API key admits it to ``group``; else RequestError 401/403 (counted)."""
        authorization, x_api_key = headers.get("authorization"), headers.get("x-api-key")
        if self.tenants.admits(group, authorization, x_api_key):
            return  # a tenant's own key (tenants[].api_keys_env)
        problem = self.security.check_key(group, authorization, x_api_key)
        if problem is None:
            return
        self.reject(f"{group}_{problem}")
        if problem == "disabled":
            raise RequestError(403, "authorization", f"the {group} API is disabled: set security.{group}_api_keys_env to enable it",
                               type_="permission_error")
        what = "is missing" if problem == "missing_key" else "is not valid"
        raise RequestError(401, "authorization", f"the {group} API key {what}: send 'Authorization: Bearer <key>' or 'x-api-key: <key>'",
                           type_="authentication_error", headers=WWW_AUTHENTICATE)

    def rate_limit(self, headers: Any, client_host: str | None, group: str) -> None:
        """RequestError 429 (``Retry-After``) when the caller's API key (open group: its address) is over its rate;
        a tenant with its own rate limit has one bucket for all its keys instead."""
        try:
            if self.tenants.check_rate(self.tenant()):
                return
        except RequestError:
            self.reject("rate_limited")
            raise
        if not self.rate_limiter.enabled:
            return
        presented = presented_key(headers.get("authorization"), headers.get("x-api-key"))
        key = f"key:{api_key_id(presented)}" if presented and self.security.keys.get(group) else f"addr:{client_host or '?'}"
        wait = self.rate_limiter.check(key)
        if wait > 0:
            self.reject("rate_limited")
            raise RequestError(429, "authorization", f"rate limit of this API key exceeded (limits.rate_limit_per_s="
                                                     f"{self.rate_limiter.rate_per_s:g}, burst {self.rate_limiter.burst:g}); "
                                                     f"retry in {wait:.2f}s", type_="rate_limit_error", headers=retry_after_header(wait))

    def routing_key_id(self) -> str | None:
        """The id of the route key the request being answered came with (None: no key; Python API callers)."""
        caller = current_caller()
        return self.security.routing_key_id(caller.authorization, caller.x_api_key)

    def signed(self, response: dict[str, Any], now: float | None = None) -> dict[str, Any]:
        """A decider's answer with its raw decision id replaced by the client-facing (signed) token, bound
        to the route key of the HTTP request being answered (none for Python API callers)."""
        token = self.security.token(response["decision_id"], response["model"], response["policy_version"],
                                    time.time() if now is None else now, self.routing_key_id())
        return dict(response, decision_id=token)

    def decision_id_from_token(self, token: str) -> str:
        """/v1/feedback: the raw decision id a valid token binds (RequestError 401/410 otherwise, counted)."""
        if not self.security.signing:
            return token
        try:
            claims = self.security.verify(token, time.time())
        except TokenError as exc:
            self.reject(f"token_{exc.kind}")
            status = TOKEN_STATUS[exc.kind]
            raise RequestError(status, "decision_id", exc.message, headers=WWW_AUTHENTICATE if status == 401 else None) from None
        caller = current_caller()
        if self.security.check_token_key(claims, caller.authorization, caller.x_api_key) is not None:
            self.reject("token_wrong_key")
            raise RequestError(403, "decision_id", "decision_id was routed under another API key: reward it with the key "
                                                   "that routed it (or a dedicated feedback key)", type_="permission_error")
        return claims.decision_id
