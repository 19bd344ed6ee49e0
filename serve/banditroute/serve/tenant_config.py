"""The ``tenants:`` configuration section (``RouterConfig.tenants``); how it applies: serve/tenants.py.

Kept apart from serve/tenants.py so that serve/config.py can nest it without
importing the request types (serve/protocol.py imports serve/config.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence

from banditroute.core.security import KEY_ID_HEX_CHARS
from banditroute.policy.reward import PreferenceError, preference_to_w_cost


@dataclass
class TenantConfig:
    """One tenant: its API keys and the defaults its requests get."""

    name: str
    """Tenant name (logged with every decision: ``DecisionRecord.tenant``; a metric tag)."""
    api_keys_env: str | None = None
    """NAME of the env var holding the tenant's comma-separated API keys (admitted to the route and feedback APIs)."""
    api_key_ids: list[str] = field(default_factory=list)
    """Ids of route keys that belong to the tenant (``core.security.api_key_id``: 16 hex characters, not secret)."""
    preference: dict[str, float] | None = None
    """Default ``{quality, cost}`` for the tenant's requests that send no preference; None = router.default_preference."""
    models: list[str] | None = None
    """Candidate allow-list; requests may narrow it, never widen it (403); None = the whole pool."""
    rate_limit_per_s: float | None = None
    """Requests per second for all of the tenant's keys together, per ingress replica; None = limits.rate_limit_per_s per key."""
    rate_limit_burst: int | None = None
    """Token-bucket size of the tenant's rate limit; None = limits.rate_limit_burst."""
    budget_usd_per_1k: float | None = None
    """Spend target of all the tenant's requests, USD per 1,000 requests: one more budget-pacing scope
    (``tenant:<name>``, serve/budget.py) moving their w_cost; None = no tenant budget."""

    def check(self, where: str) -> None:
        if not self.name or not isinstance(self.name, str):
            raise ValueError(f"{where}.name: must be a non-empty string")
        if not self.api_keys_env and not self.api_key_ids:
            raise ValueError(f"{where}: give api_keys_env (an env var with the tenant's keys) and/or api_key_ids")
        for i, kid in enumerate(self.api_key_ids):
            if not (isinstance(kid, str) and len(kid) == KEY_ID_HEX_CHARS and all(c in "0123456789abcdef" for c in kid)):
                raise ValueError(f"{where}.api_key_ids[{i}]: must be a key id of {KEY_ID_HEX_CHARS} lower-case hex characters "
                                 f"(python -c \"from banditroute.core.security import api_key_id; print(api_key_id('<key>'))\")")
        if self.preference is not None:
            unknown = sorted(set(self.preference) - {"quality", "cost"})
            if unknown or not self.preference:
                raise ValueError(f"{where}.preference: give 'quality' and/or 'cost'")
            try:
                preference_to_w_cost(self.preference.get("quality", 0.0), self.preference.get("cost", 0.0))
            except PreferenceError as exc:
                raise ValueError(f"{where}.{exc}") from None
        if self.models is not None and (not self.models or not all(isinstance(m, str) and m for m in self.models)):
            raise ValueError(f"{where}.models: a non-empty list of pool model names (or left out for the whole pool)")
        if self.rate_limit_per_s is not None and not (math.isfinite(self.rate_limit_per_s) and self.rate_limit_per_s > 0):
            raise ValueError(f"{where}.rate_limit_per_s: must be a finite number > 0 (leave it out for the per-key limit)")
        if self.rate_limit_burst is not None and self.rate_limit_burst < 1:
            raise ValueError(f"{where}.rate_limit_burst: must be >= 1")
        budget = self.budget_usd_per_1k
        if budget is not None and (isinstance(budget, bool) or not isinstance(budget, (int, float))
                                   or not math.isfinite(budget) or budget <= 0):
            raise ValueError(f"{where}.budget_usd_per_1k: must be a finite number > 0 (USD per 1,000 requests), got {budget!r}")

    def w_cost(self) -> float | None:
        """w_cost of the tenant's default preference (None: the router's default)."""
        if self.preference is None:
            return None
        return preference_to_w_cost(self.preference.get("quality", 0.0), self.preference.get("cost", 0.0))


def check_tenants(tenants: Sequence[TenantConfig]) -> None:
    """Each tenant valid; names unique; no key id claimed by two tenants."""
    seen: dict[str, str] = {}
    names: set[str] = set()
    for i, t in enumerate(tenants):
        t.check(f"tenants[{i}]")
        if t.name in names:
            raise ValueError(f"tenants[{i}].name: duplicate tenant {t.name!r}")
        names.add(t.name)
        for kid in t.api_key_ids:
            if kid in seen:
                raise ValueError(f"tenants[{i}].api_key_ids: key id {kid} already belongs to tenant {seen[kid]!r}")
            seen[kid] = t.name
