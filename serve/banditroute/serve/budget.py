"""Budget pacing in serving: a spend target in USD per 1,000 requests, globally and per API key, moves the cost weight.

Where the state lives: ONE small Ray actor per application (``BudgetActor``,
named ``banditroute-budget-<app_name>``, created by the first ingress replica
that needs it) holds a PI controller per scope (``global``, ``key:<api key
id>``, ``tenant:<name>``; the maths are ``policy.pacer``'s: ``pacer_update`` on the log spend
error, ``cost_weight_adjustment``). Ingress replicas never wait for it: each
keeps the last adjustments it was told, routes with them, and every
``report_interval_s`` sends what it decided (decision id, model, key) and the
costs rewarded since, getting the new adjustments back. So every replica
sees the same shared view, at most one report interval old; a replica that
cannot reach the actor routes with its last view (zero at start).

The cost of a decision is its model's price (USD per call: the live registry
of an identity policy, else ``budget.prices``) when it is decided, replaced
by the upstream's reported cost when a reward with ``cost`` arrives for it
(the difference is booked into the current window).

A request's cost weight becomes sigmoid(logit(w_cost) + shift), shift = the
global adjustment plus its key's and its tenant's (``policy.pacer.paced_w_cost``);
each controller acts on it, on the spend it governs. A scope's controller output
beyond ``max_adjustment`` drives a second lever (``policy.pacer.spend_levers``): the
share of EXPLORE requests decided greedily (propensity 1, logged as such). Explore
decisions keep every candidate above the exploration floor, which on RouterBench
costs more than 0.3 USD per 1k whatever the cost weight (docs/any_model_set.md
section 10); ``at_limit`` in the view (and a warning) says a target is below what
the traffic can cost with every lever at its bound. Paced: ``/v1/route``,
``/v1/route/batch`` and the chat proxy's decisions (all go through the
ingress's ``_route_one`` / ``route_many``); the decision log records the
paced w_cost (what the policy decided with).
"""

from __future__ import annotations

import asyncio
import logging
import math
import random
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

from banditroute.policy.pacer import (PacerConfig, PacerState, combined_greedy_share, cost_weight_adjustment, pacer_update,
                                      paced_w_cost, spend_levers, window_rate)

logger = logging.getLogger(__name__)
GLOBAL = "global"
PENDING_DECISIONS = 200_000
"""Decisions remembered for a later reported cost (oldest forgotten first)."""


@dataclass
class BudgetConfig:
    """Budget pacing in serving (serve/budget.py): spend targets that move the cost weight."""

    target_usd_per_1k: float | None = None
    """Global spend target in USD per 1,000 requests; None = no global target."""
    per_key_usd_per_1k: dict[str, float] = field(default_factory=dict)
    """Spend targets per API key, by key id (``banditroute.core.security.api_key_id(key)``), USD per 1,000 of its requests."""
    per_tenant_usd_per_1k: dict[str, float] = field(default_factory=dict)
    """Spend targets per tenant name, USD per 1,000 of its requests (filled from ``tenants[].budget_usd_per_1k``, serve/tenants.py)."""
    window: int = 50
    """Requests per controller update (per scope)."""
    kp: float = 1.0
    """Proportional gain on the log spend error (logit units)."""
    ki: float = 0.8
    """Integral gain on the summed log spend error (logit units per update). Near the bound a logit unit moves the
    spend by only ~10 %, so round 2's 0.3 took ~1,500 decisions to settle; 0.8 settles in a few hundred (offline
    closed-loop replay, docs/any_model_set.md section 10)."""
    ema: float = 0.5
    """Weight of the newest window in the smoothed spend rate."""
    max_adjustment: float = 4.0
    """Bound on each scope's shift of logit(w_cost) (4 moves w = 0.5 to 0.02 .. 0.98)."""
    greedy_span: float = 2.0
    """Controller output beyond ``max_adjustment`` (logit units) over which the share of explore requests decided
    greedily grows from 0 to ``max_greedy_fraction`` (the second lever: the exploration floor's spend, policy.pacer.spend_levers)."""
    max_greedy_fraction: float = 1.0
    """Largest share of explore requests the pacer decides greedily (0 = the cost weight is the only lever)."""
    report_interval_s: float = 0.25
    """How often each ingress replica reports its decisions and reads the adjustments."""
    prices: dict[str, float] = field(default_factory=dict)
    """USD per call by model, for policies without a registry (BaRP, value); an identity policy's registry wins."""

    @property
    def enabled(self) -> bool:
        return self.target_usd_per_1k is not None or bool(self.per_key_usd_per_1k) or bool(self.per_tenant_usd_per_1k)

    def validate(self) -> None:
        targets = dict(self.per_key_usd_per_1k)
        if self.target_usd_per_1k is not None:
            targets["target_usd_per_1k"] = self.target_usd_per_1k
        targets.update({f"tenant:{name}": value for name, value in self.per_tenant_usd_per_1k.items()})
        for name, value in targets.items():
            where = "budget.target_usd_per_1k" if name == "target_usd_per_1k" else f"budget.per_key_usd_per_1k.{name}"
            if name.startswith("tenant:"):
                where = f"budget.per_tenant_usd_per_1k.{name[len('tenant:'):]}"
            if not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
                raise ValueError(f"{where}: must be a finite number > 0 (USD per 1,000 requests), got {value!r}")
        for name, value in self.prices.items():
            if not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise ValueError(f"budget.prices.{name}: must be a finite number >= 0 (USD per call), got {value!r}")
        if self.window < 1 or self.kp < 0 or self.ki < 0 or not 0 < self.ema <= 1:
            raise ValueError("budget: need window >= 1, kp >= 0, ki >= 0 and 0 < ema <= 1")
        if not (math.isfinite(self.max_adjustment) and self.max_adjustment > 0) or self.report_interval_s <= 0:
            raise ValueError("budget.max_adjustment and budget.report_interval_s must be > 0")
        if not (math.isfinite(self.greedy_span) and self.greedy_span > 0):
            raise ValueError(f"budget.greedy_span: must be a finite number > 0, got {self.greedy_span!r}")
        if not 0.0 <= self.max_greedy_fraction <= 1.0:
            raise ValueError(f"budget.max_greedy_fraction: must be in [0, 1], got {self.max_greedy_fraction!r}")

    def pacer(self, target: float) -> PacerConfig:
        """The controller of one scope: starts at no shift (w_init 0.5); its output (logit units) runs from
        -``max_adjustment`` to ``max_adjustment`` + ``greedy_span`` (the greedy lever above the shift's bound)."""
        lo = 1.0 / (1.0 + math.exp(self.max_adjustment))
        hi = 1.0 / (1.0 + math.exp(-(self.max_adjustment + (self.greedy_span if self.max_greedy_fraction > 0 else 0.0))))
        return PacerConfig(target=float(target), unit="per_1k_requests", window=self.window, kp=self.kp, ki=self.ki,
                           ema=self.ema, w_init=0.5, w_min=lo, w_max=hi)

    def levers(self, adjustment: float) -> tuple[float, float]:
        """A scope's controller output -> (logit shift of w_cost, share of explore requests decided greedily)."""
        return spend_levers(adjustment, self.max_adjustment, self.greedy_span, self.max_greedy_fraction)


@dataclass
class _Scope:
    config: PacerConfig
    state: PacerState
    spend: float = 0.0
    count: int = 0
    total_spend: float = 0.0
    total_requests: int = 0


class BudgetLedger:
    """The shared view (pure Python, no Ray): spend per scope, its controller, the adjustments. ``BudgetActor`` wraps it."""

    def __init__(self, config: BudgetConfig, price_of: Callable[[str], float | None]):
        config.validate()
        self.config = config
        self.price_of = price_of
        self.scopes: dict[str, _Scope] = {}
        if config.target_usd_per_1k is not None:
            self.scopes[GLOBAL] = self._scope(config.target_usd_per_1k)
        for key, target in config.per_key_usd_per_1k.items():
            self.scopes[f"key:{key}"] = self._scope(target)
        for tenant, target in config.per_tenant_usd_per_1k.items():
            self.scopes[f"tenant:{tenant}"] = self._scope(target)
        self.pending: OrderedDict[str, tuple[float, tuple[str, ...]]] = OrderedDict()
        self.early_costs: OrderedDict[str, float] = OrderedDict()
        self.unpriced = 0
        self.warned: set[str] = set()

    def _scope(self, target: float) -> _Scope:
        cfg = self.config.pacer(target)
        return _Scope(cfg, PacerState(w_cost=cfg.w_init))

    def _book(self, scope: _Scope, usd: float, requests: int) -> None:
        scope.spend += usd
        scope.total_spend += usd
        scope.count += requests
        scope.total_requests += requests
        if scope.count >= scope.config.window:
            rate = window_rate(max(scope.spend, 0.0), scope.count, None, scope.config.unit)
            scope.state = pacer_update(scope.state, rate, scope.config)
            scope.spend, scope.count = 0.0, 0

    def report(self, decisions: Sequence[tuple[str, ...]], costs: Sequence[tuple[str, float]]) -> dict[str, Any]:
        """Book ``decisions`` [(decision_id, model, key_id[, tenant])] at their price (or a cost already reported) and
        ``costs`` [(decision_id, reported USD)] as corrections; returns :meth:`view`."""
        for decision_id, cost in costs:
            booked = self.pending.pop(decision_id, None)
            if booked is None:  # the decision's report may come later, from another replica
                self.early_costs[decision_id] = float(cost)
                if len(self.early_costs) > PENDING_DECISIONS:
                    self.early_costs.popitem(last=False)
                continue
            price, scopes = booked
            for name in scopes:
                self._book(self.scopes[name], float(cost) - price, 0)
        for decision_id, model, key, *tenant in decisions:
            scopes = tuple(s for s in (GLOBAL, f"key:{key}" if key else None, f"tenant:{tenant[0]}" if tenant and tenant[0] else None)
                           if s in self.scopes)
            if decision_id in self.early_costs:
                usd = self.early_costs.pop(decision_id)
            else:
                price = self.price_of(model)
                if price is None:
                    self.unpriced += 1
                    price = 0.0
                usd = float(price)
                self.pending[decision_id] = (usd, scopes)
                if len(self.pending) > PENDING_DECISIONS:
                    self.pending.popitem(last=False)
            for name in scopes:
                self._book(self.scopes[name], usd, 1)
        return self.view()

    def view(self) -> dict[str, Any]:
        """Per scope: its two levers (``adjustment``: logit shift of w_cost; ``greedy_fraction``: share of explore
        requests decided greedily), the controller's output, target, smoothed spend rate and totals (USD per 1k
        requests), and ``at_limit``: every lever at its bound while the spend is still over the target (the target
        is below what this traffic can cost: a lower one is not reachable by pacing)."""
        out = {}
        for name, s in self.scopes.items():
            control = cost_weight_adjustment(s.state, s.config)
            shift, greedy = self.config.levers(control)
            at_limit = s.state.rate is not None and s.state.rate > s.config.target and s.state.w_cost >= s.config.w_max * (1 - 1e-9)
            if at_limit and name not in self.warned:
                self.warned.add(name)
                logger.warning("budget %s: spending %.4g USD per 1k with every lever at its bound (shift %+.1f, greedy "
                               "share %.2f); the target %.4g is below what this traffic can cost", name, s.state.rate,
                               shift, greedy, s.config.target)
            out[name] = {"adjustment": shift, "greedy_fraction": greedy, "control": control, "at_limit": at_limit,
                         "target_usd_per_1k": s.config.target, "rate_usd_per_1k": s.state.rate,
                         "requests": s.total_requests,
                         "spend_usd_per_1k": 1000.0 * s.total_spend / s.total_requests if s.total_requests else None,
                         "updates": s.state.updates}
        return out


def shift_for(view: dict[str, Any], key: str | None, tenant: str | None = None) -> float:
    """The logit shift of a request under key id ``key`` for ``tenant``: the global adjustment plus its key's
    and its tenant's (pure)."""
    total = view.get(GLOBAL, {}).get("adjustment", 0.0)
    if key:
        total += view.get(f"key:{key}", {}).get("adjustment", 0.0)
    if tenant:
        total += view.get(f"tenant:{tenant}", {}).get("adjustment", 0.0)
    return float(total)


def greedy_share_for(view: dict[str, Any], key: str | None, tenant: str | None = None) -> float:
    """Probability that an explore request under key id ``key`` for ``tenant`` is decided greedily (pure):
    any of its scopes (global, key, tenant) asking suffices."""
    scopes = [GLOBAL] + ([f"key:{key}"] if key else []) + ([f"tenant:{tenant}"] if tenant else [])
    return combined_greedy_share([view.get(name, {}).get("greedy_fraction", 0.0) for name in scopes])


def registry_prices(registry_path: str | None, fallback: dict[str, float]) -> Callable[[str], float | None]:
    """price_of(model): the live registry at ``registry_path`` (re-read every 0.5 s), else ``fallback``."""
    registry = None
    if registry_path:
        from banditroute.policy.model_registry import ModelRegistry

        try:
            registry = ModelRegistry.load(registry_path, auto_refresh_s=0.5)
        except Exception as exc:  # noqa: BLE001 - priced from the fallback then
            logger.warning("budget: registry %s unreadable (%s); prices from budget.prices", registry_path, exc)

    def price_of(model: str) -> float | None:
        if registry is not None:
            registry.maybe_refresh()
            prices = registry.prices()
            if model in prices:
                return prices[model]
        return fallback.get(model)

    return price_of


class BudgetActor:
    """The Ray actor holding the one :class:`BudgetLedger` of an application (thin shell)."""

    def __init__(self, config: dict[str, Any], registry_path: str | None):
        from banditroute.core.config import from_dict

        cfg = from_dict(BudgetConfig, config, prefix="budget")
        self.ledger = BudgetLedger(cfg, registry_prices(registry_path, cfg.prices))

    def report(self, decisions: list, costs: list) -> dict[str, Any]:
        return self.ledger.report(decisions, costs)

    def view(self) -> dict[str, Any]:
        return self.ledger.view()


def actor_name(app_name: str) -> str:
    return f"banditroute-budget-{app_name}"


class BudgetClient:
    """An ingress replica's side: paces requests with the last view; reports in the background (never blocks a route)."""

    def __init__(self, config: BudgetConfig, app_name: str, namespace: str | None, registry_path: str | None,
                 actor_factory: Callable[[], Any] | None = None, rng_seed: int | None = None):
        self.config = config
        self.view: dict[str, Any] = {}
        self.decisions: list[tuple[str, str, str | None]] = []
        self.costs: list[tuple[str, float]] = []
        self.report_errors = 0
        self._task: asyncio.Task | None = None
        self._actor = None
        self._factory = actor_factory or (lambda: _get_or_create_actor(config, app_name, namespace, registry_path))
        self._rng = random.Random(rng_seed)
        self.greedy_decisions = 0
        """Explore requests this replica decided greedily for the budget."""
        from banditroute.serve.metrics import metric

        self.m_rate = metric("gauge", "banditroute_budget_spend_rate_usd_per_1k", "Smoothed spend rate per budget scope.", ("scope",))
        self.m_target = metric("gauge", "banditroute_budget_target_usd_per_1k", "Spend target per budget scope.", ("scope",))
        self.m_adjust = metric("gauge", "banditroute_budget_adjustment", "Current logit shift of w_cost per budget scope.", ("scope",))
        self.m_greedy = metric("gauge", "banditroute_budget_greedy_fraction",
                               "Share of explore requests decided greedily per budget scope.", ("scope",))

    @property
    def enabled(self) -> bool:
        return self.config.enabled

    def pace(self, w_cost: float, key: str | None, tenant: str | None = None) -> float:
        self._ensure_reporter()
        return paced_w_cost(w_cost, shift_for(self.view, key, tenant))

    def pace_all(self, reqs: Sequence[Any], key: str | None, tenant: str | None = None) -> str | None:
        """Each request's ``w_cost`` paced for key id ``key`` and ``tenant``, and an explore request decided greedily
        with the view's greedy share (its logged propensity is then 1, as for any greedy decision); nothing when no
        target is set. Returns ``key``."""
        if self.enabled:
            greedy = greedy_share_for(self.view, key, tenant)
            for req in reqs:
                req.w_cost = self.pace(req.w_cost, key, tenant)
                if greedy > 0.0 and getattr(req, "mode", None) == "explore" and self._rng.random() < greedy:
                    req.mode = "greedy"
                    self.greedy_decisions += 1
        return key

    def spent(self, outs: Sequence[dict[str, Any]], key: str | None, tenant: str | None = None) -> None:
        """The decisions of routed outputs ({"response": {decision_id, model}} or {"error": ...}) into the next report."""
        if self.enabled:
            for out in outs:
                if "response" in out:
                    self.record_decision(out["response"]["decision_id"], out["response"]["model"], key, tenant)

    def record_decision(self, decision_id: str, model: str, key: str | None, tenant: str | None = None) -> None:
        self.decisions.append((decision_id, model, key, tenant or None))

    def record_cost(self, decision_id: str, cost: float) -> None:
        if math.isfinite(cost) and cost >= 0:
            self.costs.append((decision_id, float(cost)))

    def _ensure_reporter(self) -> None:
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._report_loop())

    async def report_once(self) -> None:
        decisions, costs = self.decisions, self.costs
        self.decisions, self.costs = [], []
        try:
            if self._actor is None:
                self._actor = await asyncio.to_thread(self._factory)
            self.view = await self._actor.report.remote(decisions, costs)
        except Exception as exc:  # noqa: BLE001 - routing goes on with the last view; the report is retried
            self.report_errors += 1
            self.decisions[:0], self.costs[:0] = decisions, costs
            logger.warning("budget report failed (%s); pacing with the last view", exc)
            return
        for scope, v in self.view.items():
            tags = {"scope": scope}
            self.m_adjust.set(v["adjustment"], tags=tags)
            self.m_greedy.set(v.get("greedy_fraction", 0.0), tags=tags)
            self.m_target.set(v["target_usd_per_1k"], tags=tags)
            if v["rate_usd_per_1k"] is not None:
                self.m_rate.set(v["rate_usd_per_1k"], tags=tags)

    async def _report_loop(self) -> None:
        while True:
            await asyncio.sleep(self.config.report_interval_s)
            await self.report_once()


def _get_or_create_actor(config: BudgetConfig, app_name: str, namespace: str | None, registry_path: str | None):
    import ray

    from banditroute.core.config import to_dict

    return ray.remote(BudgetActor).options(
        name=actor_name(app_name), namespace=namespace, get_if_exists=True, lifetime="detached", num_cpus=0,
    ).remote(to_dict(config), registry_path)


def pool_registry_path(policy_folder: str | None) -> str | None:
    """The live registry of the identity checkpoint ``policy_folder`` (its meta.registry_uri, else registry.json
    beside it); None for other kinds or without a folder."""
    if not policy_folder:
        return None
    import json
    from pathlib import Path

    try:
        meta = json.loads((Path(policy_folder) / "meta.json").read_text())
    except (OSError, ValueError):
        return None
    if meta.get("kind") != "identity":
        return None
    return meta.get("registry_uri") or str(Path(policy_folder) / "registry.json")
