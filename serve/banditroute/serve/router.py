"""The ``Router`` deployment (``placement: replica``): a RouterService per replica, behind the ingress.

Everything a deciding replica does (batched inference, decisions logged
before they are answered, weights long-polled from the parameter server,
metrics, info) is serve/service.py's ``RouterService``, the same object an
inline ingress hosts; this class only exposes it to DeploymentHandle callers
(serve/decider.py's ``RouterHandle``, which sends the single requests an
ingress replica gathered as one ``route_group`` call) and takes the live
batching knobs from ``user_config``. ``prompt_tokenizer`` hands ingress replicas this replica's
tokenizer, so they send token ids and a GPU replica only runs forward passes.
"""

# NOTE: @serve.deployment pickles the class when it is defined, together with the module
# globals its methods use AT THAT MOMENT: every helper it calls must be defined (or imported) above it.

from __future__ import annotations

from typing import Any

from ray import serve

from banditroute.serve.config import as_router_config
from banditroute.serve.core import RouteResult
from banditroute.serve.metrics import replica_id
from banditroute.serve.protocol import RouteRequest
from banditroute.serve.service import RouterService
from banditroute.serve.tokens import PromptTokenizer


@serve.deployment(name="Router")
class Router:
    """Batched encoder + policy inference; logs every decision durably before answering."""

    def __init__(self, config: dict[str, Any]):
        self.service = RouterService(as_router_config(config), replica_id())

    def reconfigure(self, user_config: dict[str, Any]) -> None:
        """Live batching knobs (``user_config``: max_batch_size, batch_wait_timeout_s)."""
        self.service.set_batching(user_config.get("max_batch_size"), user_config.get("batch_wait_timeout_s"))

    async def route(self, req: RouteRequest) -> dict[str, Any]:
        """One request (gathered with concurrent ones into one batch by the service)."""
        return await self.service.route(req)

    async def route_group(self, reqs: list[RouteRequest]) -> list[dict[str, Any]]:
        """Requests an ingress replica gathered (gathered again with concurrent groups by the service)."""
        return await self.service.route_group(reqs)

    async def route_many(self, reqs: list[RouteRequest]) -> list[dict[str, Any]]:
        return await self.service.route_many(reqs)

    async def log(self, results: list[RouteResult], upstream_costs: list[float | None],
                  served_models: list[str | None] | None = None) -> None:
        await self.service.log(results, upstream_costs, served_models)

    async def info(self) -> dict[str, Any]:
        return await self.service.info()

    async def prompt_tokenizer(self) -> PromptTokenizer | None:
        return self.service.host_tokenizer()

    def __del__(self):
        try:
            self.service.close()
        except Exception:  # noqa: BLE001
            pass
