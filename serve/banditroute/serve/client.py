"""Python API for in-cluster callers: route through DeploymentHandles, no HTTP.

    from banditroute.serve.client import RouterClient
    client = RouterClient("banditroute")               # app name
    answer = await client.route(prompt="...", preference={"quality": 1, "cost": 0})
    answer = client.route_sync(messages=[{"role": "user", "content": "..."}], mode="greedy")

Answers are the /v1/route contract dicts. Bad input raises
``protocol.RequestError`` (with ``.status`` and ``.field``) before anything is
sent. Alternatively, ``serve.get_app_handle(app_name).handle_route.remote(body)``
calls the ingress with a raw /v1/route body.

Requests are validated here, then decided through the INGRESS
(``RouterIngress.route_requests``), which decides them (itself, or through
the batched Router: ``placement``) and replaces each raw decision id with the
signed decision token, exactly as over HTTP: the ids this client returns are the ones /v1/feedback accepts, and
the signing secret never has to be in the caller's process.
"""

from __future__ import annotations

import time
from typing import Any

from ray import serve

from banditroute.serve.protocol import parse_batch_body, parse_route_body, router_error


class RouterClient:
    """Routes through the ingress of a running banditroute application (either placement)."""

    def __init__(self, app_name: str = "banditroute", info_ttl_s: float = 10.0):
        self.app_name = app_name
        self.ingress = serve.get_app_handle(app_name)  # pool and defaults; decisions, signed like HTTP answers
        self._info: dict[str, Any] | None = None
        self._info_at = 0.0
        self._ttl = info_ttl_s

    async def info(self) -> dict[str, Any]:
        """Pool, defaults and served version, from one deciding replica (cached ``info_ttl_s``)."""
        if self._info is None or time.monotonic() - self._info_at > self._ttl:
            self._info, self._info_at = await self.ingress.router_info.remote(), time.monotonic()
        return self._info

    def _body(self, prompt, messages, preference, candidates, mode) -> dict[str, Any]:
        body: dict[str, Any] = {}
        for key, value in (("prompt", prompt), ("messages", messages), ("preference", preference),
                           ("candidates", candidates), ("mode", mode)):
            if value is not None:
                body[key] = value
        return body

    def _request(self, info: dict[str, Any], body: dict[str, Any]):
        return parse_route_body(
            body, models=info["models"], default_w_cost=info["default_w_cost"],
            default_mode=info["default_mode"], max_prompt_chars=info["max_prompt_chars"],
        )

    @staticmethod
    def _answer(out: dict[str, Any]) -> dict[str, Any]:
        if "error" in out:
            raise router_error(out["error"])
        return out["response"]

    async def route(self, prompt: str | None = None, *, messages: list | None = None, preference: dict | None = None,
                    candidates: list[str] | None = None, mode: str | None = None) -> dict[str, Any]:
        req = self._request(await self.info(), self._body(prompt, messages, preference, candidates, mode))
        return self._answer((await self.ingress.route_requests.remote([req]))[0])

    async def route_batch(self, prompts: list[str] | None = None, *, requests: list[dict] | None = None,
                          preference: dict | None = None, candidates: list[str] | None = None,
                          mode: str | None = None, max_batch_requests: int = 100_000) -> list[dict[str, Any]]:
        """Bulk routing in one call (decided in chunks of max_batch_size)."""
        info = await self.info()
        body: dict[str, Any] = {"prompts": prompts} if prompts is not None else {"requests": requests}
        body.update({k: v for k, v in (("preference", preference), ("candidates", candidates), ("mode", mode)) if v is not None})
        reqs = parse_batch_body(
            body, models=info["models"], default_w_cost=info["default_w_cost"], default_mode=info["default_mode"],
            max_prompt_chars=info["max_prompt_chars"], max_batch_requests=max_batch_requests,
        )
        outs = await self.ingress.route_requests.remote(reqs)
        return [o["response"] if "error" not in o else {"error": o["error"]} for o in outs]

    def route_sync(self, prompt: str | None = None, *, messages: list | None = None, preference: dict | None = None,
                   candidates: list[str] | None = None, mode: str | None = None) -> dict[str, Any]:
        """Blocking variant, for code outside an event loop (a Ray task, a script)."""
        if self._info is None or time.monotonic() - self._info_at > self._ttl:
            self._info, self._info_at = self.ingress.router_info.remote().result(), time.monotonic()
        req = self._request(self._info, self._body(prompt, messages, preference, candidates, mode))
        return self._answer(self.ingress.route_requests.remote([req]).result()[0])
