"""What the ingress decides through: one interface, two placements (``RouterConfig.placement``).

- ``inline``: the ingress replica hosts a ``RouterService`` itself
  (serve/service.py): one hop per route, batching concurrent requests of that
  replica. For cheap encoders (hashing, static), where a second hop would
  cost more than the decision.
- ``replica``: :class:`RouterHandle`, the ``Router`` deployment through a
  DeploymentHandle. For heavy encoders on GPUs: concurrent single requests of
  an ingress replica are gathered here (``@serve.batch``) and sent as ONE
  call, so a Router replica pays its per-call cost per group, not per
  request; when the Router's encoder has a tokenizer (MiniLM), the group is
  tokenized here (one tokenizer call) and sent as token ids, so the GPU
  replica only pads and runs forward passes.

Both answer in the Router's shape (``{"response": ...}`` or ``{"error": ...}``)
with raw decision ids; the ingress signs them either way.
"""

from __future__ import annotations

import asyncio
import dataclasses
import threading
from typing import Any, Protocol

from ray import serve
from ray.serve.handle import DeploymentHandle

from banditroute.serve.core import RouteResult, prompt_sha256
from banditroute.serve.protocol import RouteRequest
from banditroute.serve.service import PIPELINE_DEPTH
from banditroute.serve.tokens import PromptTokenizer


class Decider(Protocol):
    """Decides parsed requests and logs deferred decisions (RouterService and RouterHandle implement it)."""

    async def route(self, req: RouteRequest) -> dict[str, Any]:
        """One request, batched with concurrent ones."""

    async def route_many(self, reqs: list[RouteRequest]) -> list[dict[str, Any]]:
        """A bulk call, in chunks of max_batch_size."""

    async def log(self, results: list[RouteResult], upstream_costs: list[float | None],
                  served_models: list[str | None] | None = None) -> None:
        """Durably log decisions made with ``log=False``."""

    async def info(self) -> dict[str, Any]:
        """Pool, defaults, served version, batching counters of the deciding replica."""


class RouterHandle:
    """The ``Router`` deployment as an ingress replica sees it (``placement: replica``).

    ``route`` gathers concurrent requests (``max_batch_size``,
    ``batch_wait_timeout_s``) into one ``Router.route_group`` call. With
    ``tokenize`` (``RouterConfig.tokenize_in_ingress``) and a Router whose
    encoder has a tokenizer, texts become token ids here, with the Router
    replica's own tokenizer (fetched once, without the encoder's weights).
    ``@serve.batch`` keeps one queue per process: an ingress replica holds one.
    """

    def __init__(self, handle: DeploymentHandle, tokenize: bool = True, max_batch_size: int = 64,
                 batch_wait_timeout_s: float = 0.0):
        self.handle = handle
        self.tokenize = tokenize
        self.route.set_max_batch_size(int(max_batch_size))
        self.route.set_batch_wait_timeout_s(float(batch_wait_timeout_s))
        self._tokenizer: PromptTokenizer | None = None
        self._asked = not tokenize
        # One tokenizer call at a time: a fast tokenizer re-sets its truncation/padding on every call.
        self._lock = threading.Lock()

    async def _tokenized(self, reqs: list[RouteRequest]) -> list[RouteRequest]:
        if not self._asked:
            self._tokenizer = await self.handle.prompt_tokenizer.remote()
            self._asked = True
        if self._tokenizer is None:
            return reqs
        texts = [req.text for req in reqs]
        rows = await asyncio.to_thread(self._rows, texts)
        return [dataclasses.replace(req, text=None, tokens=row, prompt_sha256=prompt_sha256(req.text))
                for req, row in zip(reqs, rows)]

    def _rows(self, texts: list[str]) -> list[dict[str, Any]]:
        with self._lock:
            return self._tokenizer.rows(texts)

    @serve.batch(max_batch_size=64, batch_wait_timeout_s=0.0, max_concurrent_batches=PIPELINE_DEPTH)
    async def route(self, reqs: list[RouteRequest]) -> list[dict[str, Any]]:
        """One request per call; concurrent ones go to a Router replica together."""
        return await self.handle.route_group.remote(await self._tokenized(reqs))

    async def route_many(self, reqs: list[RouteRequest]) -> list[dict[str, Any]]:
        return await self.handle.route_many.remote(await self._tokenized(reqs))

    async def log(self, results: list[RouteResult], upstream_costs: list[float | None],
                  served_models: list[str | None] | None = None) -> None:
        await self.handle.log.remote(results, upstream_costs, served_models)

    async def info(self) -> dict[str, Any]:
        return await self.handle.info.remote()
