"""The replay upstream: an OpenAI-compatible HTTP server that answers as "model X".

For a prompt of the routing data (matched exactly, by the SHA-256 of its
text) it returns the logged ``<X>|model_response`` and reports the logged
USD cost in ``usage.cost_usd``, so demos, tests and benches can run the
whole route -> upstream -> feedback loop offline against real answers.

The text looked up is the one the router embeds: the chat messages'
contents joined by newlines (``protocol.messages_to_text``), so a chat whose
single user message is a benchmark prompt finds it; the last user message
alone is tried as well. Unknown prompt, unknown model, or no logged answer
for that pair: 404 with a JSON error naming the field.

``ReplayServer`` runs aiohttp on its own thread and event loop; the Serve app
starts one inside its ``ReplayUpstream`` deployment (serve/replay_upstream.py)
when replay is enabled, and tests or benches can start one directly. No Ray
here. Errors are the package's one envelope (``protocol.error_body``).
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
import uuid
from typing import Any

import numpy as np
from aiohttp import web

from banditroute.core.data import RoutingData, load_routing_data, resolve_data_path
from banditroute.serve.core import prompt_sha256
from banditroute.serve.protocol import RequestError, error_body, messages_to_text


class ReplayIndex:
    """Logged answers and costs of a routing data set, looked up by prompt text."""

    def __init__(self, data: RoutingData):
        if data.responses is None:
            raise ValueError(f"{data.source or 'routing data'}: no '<model>|model_response' columns to replay")
        self.data = data
        self.models = list(data.models)
        self._model_index = {m: k for k, m in enumerate(data.models)}
        self._rows: dict[str, int] = {}
        for row, prompt in enumerate(data.prompts):
            self._rows.setdefault(prompt_sha256(prompt), row)

    @classmethod
    def from_path(cls, path: str | None) -> "ReplayIndex":
        return cls(load_routing_data(resolve_data_path(path)))

    def find_row(self, texts: list[str]) -> int | None:
        for text in texts:
            row = self._rows.get(prompt_sha256(text))
            if row is not None:
                return row
        return None

    def answer(self, model: str, row: int) -> tuple[str | None, float, float]:
        """(logged response or None, logged cost, logged score) of ``model`` on prompt ``row``."""
        k = self._model_index[model]
        score = float(self.data.scores[row, k])
        return self.data.responses[row, k], float(self.data.costs[row, k]), score if np.isfinite(score) else float("nan")


def _error(status: int, message: str, field: str | None, type_: str | None = None):
    return web.json_response(error_body(status, message, field, type_), status=status)


def _lookup_texts(body: dict[str, Any]) -> list[str]:
    if body.get("messages") is not None:
        texts = [messages_to_text(body["messages"])]
        users = [m for m in body["messages"] if isinstance(m, dict) and m.get("role", "user") == "user"]
        if users and isinstance(users[-1].get("content"), str):
            texts.append(users[-1]["content"])
        return texts
    if isinstance(body.get("prompt"), str):
        return [body["prompt"]]
    raise RequestError(422, "messages", "messages is required (a list of chat messages)")


def _approx_tokens(text: str) -> int:
    return max(1, len(text) // 4)


def build_replay_app(index: ReplayIndex, stream_chunk_chars: int = 48):
    """The aiohttp application: POST /v1/chat/completions, GET /v1/models, GET /healthz."""

    async def chat(request: web.Request) -> web.StreamResponse:
        try:
            body = await request.json()
        except (json.JSONDecodeError, UnicodeDecodeError):
            return _error(400, "the body must be JSON", "body")
        if not isinstance(body, dict):
            return _error(400, "the body must be a JSON object", "body")
        model = body.get("model")
        if not isinstance(model, str):
            return _error(422, "model must be a string", "model")
        if model not in index.models:
            return _error(404, f"replay: unknown model {model!r}; known: {index.models}", "model", "not_found")
        try:
            texts = _lookup_texts(body)
        except RequestError as exc:
            return _error(exc.status, exc.message, exc.field, exc.type)
        row = index.find_row(texts)
        if row is None:
            return _error(404, "replay: this prompt is not in the routing data (exact text match required)", "messages", "not_found")
        content, cost, score = index.answer(model, row)
        if content is None:
            return _error(404, f"replay: no logged response of {model!r} for this prompt", "model", "not_found")
        prompt_tokens = _approx_tokens(texts[0])
        usage = {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": _approx_tokens(content),
            "total_tokens": prompt_tokens + _approx_tokens(content),
            "cost_usd": cost,
        }
        replay_info = {
            "sample_id": str(index.data.sample_ids[row]),
            "eval_name": str(index.data.eval_names[row]),
            "score": None if np.isnan(score) else score,
        }
        completion_id = f"chatcmpl-replay-{uuid.uuid4().hex[:16]}"
        created = int(time.time())
        stream = body.get("stream", False)
        if not isinstance(stream, bool):
            return _error(422, "stream must be true or false", "stream")
        if not stream:
            return web.json_response(
                {
                    "id": completion_id,
                    "object": "chat.completion",
                    "created": created,
                    "model": model,
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}],
                    "usage": usage,
                    "replay": replay_info,
                }
            )
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await resp.prepare(request)

        def chunk(delta: dict[str, Any], finish: str | None, extra: dict[str, Any] | None = None) -> bytes:
            payload = {
                "id": completion_id,
                "object": "chat.completion.chunk",
                "created": created,
                "model": model,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
            }
            payload.update(extra or {})
            return f"data: {json.dumps(payload)}\n\n".encode()

        await resp.write(chunk({"role": "assistant", "content": ""}, None))
        for start in range(0, len(content), stream_chunk_chars):
            await resp.write(chunk({"content": content[start : start + stream_chunk_chars]}, None))
        await resp.write(chunk({}, "stop", {"usage": usage, "replay": replay_info}))
        await resp.write(b"data: [DONE]\n\n")
        await resp.write_eof()
        return resp

    async def models(_: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": m, "object": "model", "owned_by": "replay"} for m in index.models]})

    async def healthz(_: web.Request) -> web.Response:
        return web.json_response({"status": "ok", "prompts": len(index.data), "models": index.models})

    app = web.Application(client_max_size=64 * 1024 * 1024)
    for base in ("/v1", ""):
        app.router.add_post(f"{base}/chat/completions", chat)
        app.router.add_get(f"{base}/models", models)
    app.router.add_get("/healthz", healthz)
    return app


class ReplayServer:
    """Runs the replay app on ``host:port`` (0 = free port) in a background thread."""

    def __init__(self, index: ReplayIndex, host: str = "127.0.0.1", port: int = 0, stream_chunk_chars: int = 48):
        self.index, self.host, self.port = index, host, port
        self.stream_chunk_chars = stream_chunk_chars
        self._loop: asyncio.AbstractEventLoop | None = None
        self._runner = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None

    @property
    def base_url(self) -> str:
        """OpenAI-style base URL (POST base_url + '/chat/completions')."""
        host = self.host
        if host in ("0.0.0.0", "::", ""):
            host = _node_ip()
        return f"http://{host}:{self.port}/v1"

    def start(self, timeout_s: float = 30.0) -> str:
        self._thread = threading.Thread(target=self._run, name="replay-upstream", daemon=True)
        self._thread.start()
        if not self._ready.wait(timeout_s):
            raise TimeoutError("replay server did not start")
        if self._error is not None:
            raise RuntimeError(f"replay server failed to start: {self._error}") from self._error
        return self.base_url

    def _run(self) -> None:
        loop = asyncio.new_event_loop()
        asyncio.set_event_loop(loop)
        self._loop = loop
        try:
            runner = web.AppRunner(build_replay_app(self.index, self.stream_chunk_chars), access_log=None)
            loop.run_until_complete(runner.setup())
            site = web.TCPSite(runner, self.host, self.port)
            loop.run_until_complete(site.start())
            self._runner = runner
            self.port = runner.addresses[0][1]
        except BaseException as exc:  # noqa: BLE001 - reported to start()
            self._error = exc
            self._ready.set()
            return
        self._ready.set()
        try:
            loop.run_forever()
        finally:
            loop.run_until_complete(runner.cleanup())
            loop.close()

    def stop(self) -> None:
        if self._loop is not None and self._loop.is_running():
            self._loop.call_soon_threadsafe(self._loop.stop)
        if self._thread is not None:
            self._thread.join(timeout=10)


def _node_ip() -> str:
    try:
        import ray.util  # lazily: importing Ray is slow, and only a wildcard bind needs the node's address

        return ray.util.get_node_ip_address()
    except Exception:  # noqa: BLE001 - no Ray: this host
        return "127.0.0.1"
