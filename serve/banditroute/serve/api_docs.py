"""/openapi.json, /docs and /redoc: FastAPI's schema and UIs, served only with ``security.api_docs``.

They map every route and field of the API, so they are off by default: the
paths then answer 404 like any unknown path (the ingress builds its FastAPI
app with ``docs_url``/``redoc_url``/``openapi_url`` None and routes these
paths here instead).
"""

from __future__ import annotations

from typing import Any

from banditroute.serve.protocol import RequestError
from fastapi import FastAPI
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html

DOC_PATHS = ("/openapi.json", "/docs", "/redoc")


async def api_docs_page(api: FastAPI, path: str, enabled: bool) -> Any:
    """The page at ``path`` (one of DOC_PATHS, matched by its end so a route prefix works), or RequestError 404 when off."""
    if not enabled:
        raise RequestError(404, "path", f"GET {path}: Not Found (the API docs are off: security.api_docs)")
    if path.endswith("/openapi.json"):
        return api.openapi()
    page = get_redoc_html if path.endswith("/redoc") else get_swagger_ui_html
    return page(openapi_url="openapi.json", title=api.title)
