"""`banditroute up --scenario FILE.yaml`: a scripted run (onboarding, price changes), its typed config and its figures.

Format::

    withhold: [gpt-3.5-turbo-1106]        # models absent from the pool at start
    budget_usd_per_1k: 0.3                # optional spend target (USD per 1,000 requests)
    window: 500                           # decisions before/after an event that its figures cover
    events:
      - {at: 1000, onboard: gpt-3.5-turbo-1106, quiz: 20}   # quiz answered from the data's outcomes
      - {at: 2500, price: top, factor: 10}   # `top` = the most-used model over the previous `window` decisions

Events are applied through the admin API (``/v1/admin/models``), so a run
exercises exactly what an operator would do. Everything below the config is
pure: :func:`most_used`, :func:`event_effect`, :func:`spend_per_1k`.
"""

from __future__ import annotations

import math
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import yaml

from banditroute.core.config import ConfigError, from_dict


@dataclass
class ScenarioEvent:
    """One scripted change, applied before decision ``at`` + 1 is sent."""

    at: int
    """Decisions routed before the event is applied (>= 1)."""
    onboard: str | None = None
    """Add this model (it must be in the data, and withheld or retired) from a quiz answered with the data's outcomes."""
    quiz: int = 20
    """Onboarding: quiz size, chosen adaptively among the model's scored prompts in the data."""
    price: str | None = None
    """Change this model's price: a model name, or 'top' (the most-used model over the previous window)."""
    factor: float | None = None
    """Price event: multiply the current price by this (> 0)."""
    usd: float | None = None
    """Price event: set this price (USD per call, >= 0) instead of a factor."""

    def check(self, where: str) -> None:
        if self.at < 1:
            raise ValueError(f"{where}.at: must be >= 1")
        if (self.onboard is None) == (self.price is None):
            raise ValueError(f"{where}: give exactly one of onboard or price")
        if self.onboard is not None and self.quiz < 5:
            raise ValueError(f"{where}.quiz: must be >= 5")
        if self.price is not None:
            if (self.factor is None) == (self.usd is None):
                raise ValueError(f"{where}: a price event needs exactly one of factor or usd")
            if self.factor is not None and not (math.isfinite(self.factor) and self.factor > 0):
                raise ValueError(f"{where}.factor: must be a finite number > 0")
            if self.usd is not None and not (math.isfinite(self.usd) and self.usd >= 0):
                raise ValueError(f"{where}.usd: must be a finite number >= 0")

    @property
    def kind(self) -> str:
        return "onboard" if self.onboard is not None else "price"


@dataclass
class ScenarioConfig:
    """A scripted `banditroute up` run over an identity policy."""

    withhold: list[str] = field(default_factory=list)
    """Models retired from the pool before the run starts (onboard them with an event)."""
    budget_usd_per_1k: float | None = None
    """Spend target in USD per 1,000 requests: the router's global budget target for the run (serve/budget.py paces it)."""
    window: int = 500
    """Decisions before / after each event that its share and reward figures cover."""
    events: list[ScenarioEvent] = field(default_factory=list)
    """The scripted changes, in order of ``at``."""

    def validate(self) -> None:
        if self.window < 1:
            raise ValueError("window: must be >= 1")
        if self.budget_usd_per_1k is not None and not (math.isfinite(self.budget_usd_per_1k) and self.budget_usd_per_1k > 0):
            raise ValueError("budget_usd_per_1k: must be a finite number > 0")
        if len(set(self.withhold)) != len(self.withhold):
            raise ValueError("withhold: a model is listed twice")
        for i, event in enumerate(self.events):
            event.check(f"events[{i}]")
        ats = [e.at for e in self.events]
        if ats != sorted(ats):
            raise ValueError("events: must be in order of `at`")

    def check_models(self, data_models: Sequence[str], pool: Sequence[str]) -> None:
        """Names against the data and the policy's pool (errors name the field)."""
        for i, name in enumerate(self.withhold):
            if name not in pool:
                raise ValueError(f"withhold[{i}]: {name!r} is not in the policy's pool {list(pool)}")
        for i, event in enumerate(self.events):
            if event.onboard is not None and event.onboard not in data_models:
                raise ValueError(f"events[{i}].onboard: {event.onboard!r} is not in the data (its quiz comes from the data)")
            if event.price not in (None, "top") and event.price not in data_models:
                raise ValueError(f"events[{i}].price: {event.price!r} is neither 'top' nor a model of the data")


def load_scenario(path: str | os.PathLike) -> ScenarioConfig:
    """The scenario file, validated (ConfigError naming the field)."""
    try:
        raw = yaml.safe_load(Path(path).expanduser().read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"up.scenario: cannot read {path}: {exc}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"up.scenario: {path} must hold a mapping (withhold, budget_usd_per_1k, events)")
    try:
        return from_dict(ScenarioConfig, raw)
    except ConfigError:
        raise
    except ValueError as exc:
        raise ConfigError(f"{path}: {exc}") from None


# --- the figures (pure) ---------------------------------------------------------------------------


def most_used(chosen: Sequence[str], end: int, window: int) -> str | None:
    """The model chosen most often among decisions [end - window, end) (ties: the first to reach the count)."""
    recent = list(chosen[max(0, end - window):end])
    return Counter(recent).most_common(1)[0][0] if recent else None


def event_effect(at: int, model: str, chosen: Sequence[str], rewards: Sequence[float], window: int) -> dict[str, Any]:
    """``model``'s traffic share and the mean reward over the ``window`` decisions before and after decision ``at``."""
    before, after = slice(max(0, at - window), at), slice(at, min(len(chosen), at + window))

    def share(s: slice) -> float | None:
        part = list(chosen[s])
        return sum(m == model for m in part) / len(part) if part else None

    def mean(s: slice) -> float | None:
        part = np.asarray(rewards[s], dtype=np.float64)
        return float(part.mean()) if len(part) else None

    return {"share_before": share(before), "share_after": share(after),
            "reward_before": mean(before), "reward_after": mean(after), "n_after": after.stop - after.start}


def spend_per_1k(costs: Sequence[float]) -> dict[str, float | None]:
    """USD per 1,000 requests over the whole run and over its second half."""
    arr = np.asarray(costs, dtype=np.float64)
    if not len(arr):
        return {"whole": None, "last_half": None}
    return {"whole": float(arr.mean() * 1000.0), "last_half": float(arr[len(arr) // 2:].mean() * 1000.0)}
