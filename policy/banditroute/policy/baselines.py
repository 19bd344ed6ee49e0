"""The baseline routers by name: what `banditroute eval` compares the policy with.

The routers themselves live in routers.py (interface, configs, the ones that
learn nothing, the trained policy) and learned_routers.py (the ones that fit
the training outcomes: best-single, knn, full-info, LinUCB).
"""

from __future__ import annotations

from typing import Sequence
from banditroute.policy.routers import OracleRouter, PolicyRouter, RandomRouter, RoutersConfig, SingleModelRouter, single_model_routers
from banditroute.policy.learned_routers import BestSingleRouter, FullInfoRouter, KnnRouter, LinUCBRouter


# --- registry -----------------------------------------------------------------------

ROUTERS: dict[str, type] = {
    "random": RandomRouter,
    "single": SingleModelRouter,  # expands to one 'single:<model>' per model of the pool
    "best-single": BestSingleRouter,
    "oracle": OracleRouter,
    "full-info": FullInfoRouter,
    "knn": KnnRouter,
    "linucb": LinUCBRouter,
    "policy": PolicyRouter,
}
"""Router classes by name. 'single' is a factory family: 'single:<model>' builds one."""

DEFAULT_ROUTERS = ("random", "single", "best-single", "knn", "full-info", "linucb", "policy", "oracle")
"""What ``banditroute eval`` compares when ``--routers`` is not given."""

UPPER_BOUNDS = frozenset({"oracle"})
"""Names of entries that read the test outcomes: upper bounds, not routers."""


def make_router(name: str, config: RoutersConfig | None = None, policy=None):
    """One router by name ('single:<model>' for a fixed model)."""
    config = config or RoutersConfig()
    if name.startswith("single:"):
        model = name[len("single:") :]
        if not model:
            raise ValueError("router 'single:<model>' needs a model name")
        return SingleModelRouter(model)
    if name == "single":
        raise ValueError("'single' is a family: use make_routers(['single'], models) or 'single:<model>'")
    if name not in ROUTERS:
        raise ValueError(f"unknown router {name!r}; known: {sorted(ROUTERS)} and 'single:<model>'")
    if name == "full-info":
        return FullInfoRouter(config.full_info)
    if name == "knn":
        return KnnRouter(config.knn)
    if name == "linucb":
        return LinUCBRouter(config.linucb)
    if name == "policy":
        return PolicyRouter(policy, config.policy)
    return ROUTERS[name]()


def make_routers(
    names: Sequence[str], models: Sequence[str], config: RoutersConfig | None = None, policy=None
) -> list:
    """Routers for ``names``; 'single' expands to 'single:<model>' for every model of ``models``."""
    routers = []
    for name in names:
        if name == "single":
            routers.extend(single_model_routers(models))
        else:
            routers.append(make_router(name, config, policy))
    seen: set[str] = set()
    for r in routers:
        if r.name in seen:
            raise ValueError(f"router {r.name!r} listed twice")
        seen.add(r.name)
    return routers
