"""Reading a request body within its group's size limit, and parsing it as JSON off the event loop when large.

``read_body`` refuses a declared Content-Length over the limit unread, and
counts a chunked body while reading (413 naming ``body`` and the config key
of the limit). ``parse_json_off_loop`` parses bodies of at least
``limits.json_thread_min_bytes`` in a worker thread with
``parse_json_body(yielding=True)``: the scanner then calls back into Python
per number and per object, so the GIL is released and other requests on the
same ingress keep being answered while a multi-MiB body is parsed (measured
in tests/test_request_limits.py). Arrays of literals, strings or empty
containers give the scanner no such point: those still hold the loop for
their parse (docs/reliability.md, "Not covered"). Strictness is the same:
one parser, ``protocol.parse_json_body``.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any

from banditroute.serve.protocol import RequestError, parse_json_body


async def read_body(headers: Mapping[str, str], chunks: AsyncIterator[bytes], limit: int, limit_name: str,
                    on_too_large: Callable[[], None] = lambda: None) -> bytes:
    """The whole body, or RequestError 413 (``body``) past ``limit`` bytes (``on_too_large`` is called first)."""
    declared = headers.get("content-length")
    if declared is not None:
        if not declared.strip().isdigit():
            raise RequestError(400, "body", "the Content-Length header must be a number of bytes")
        if int(declared) > limit:
            on_too_large()
            raise RequestError(413, "body", f"the body is {int(declared)} bytes; the limit of this endpoint is {limit} ({limit_name})")
    parts, size = [], 0
    async for chunk in chunks:  # chunked bodies have no Content-Length: count while reading
        size += len(chunk)
        if size > limit:
            on_too_large()
            raise RequestError(413, "body", f"the body is over {limit} bytes, the limit of this endpoint ({limit_name})")
        parts.append(chunk)
    return b"".join(parts)


async def parse_json_off_loop(raw: bytes, thread_min_bytes: int) -> Any:
    """``parse_json_body(raw)``; in a worker thread (yielding hooks) when ``raw`` has ``thread_min_bytes`` or more."""
    if len(raw) < thread_min_bytes:
        return parse_json_body(raw)
    return await asyncio.to_thread(parse_json_body, raw, True)
