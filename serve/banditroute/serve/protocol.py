"""Request parsing and validation, shared by the HTTP ingress and the Python client.

Everything a client can get wrong is caught here and raised as a
``RequestError`` carrying the HTTP status (400/413/422) and the name of the
offending field. ``RequestError`` and ``error_body`` are also the one error
type and the one error envelope of every other HTTP error path (API keys,
decision tokens, feedback, upstreams, the replay server):
``{"error": {"message": ..., "field": ..., "type": ...}}``; a row the router
could not decide carries the same error as ``RequestError.to_router()``
(turned back by ``router_error``). ``RouteRequest`` is a parsed routing
question, as it travels from the ingress to whatever decides it. Nothing
here imports Ray.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from banditroute.policy.reward import PreferenceError, preference_to_w_cost
from banditroute.serve.config import ROUTE_MODES


# Headers some errors carry: a 401 names the auth scheme; a 503 of a restarting actor says when to retry.
WWW_AUTHENTICATE = {"WWW-Authenticate": 'Bearer realm="banditroute"'}
RETRY_AFTER_S = 1
RETRY_AFTER = {"Retry-After": str(RETRY_AFTER_S)}


@dataclass
class RouteRequest:
    """One routing question: what to embed, the preference, the allowed models, the mode."""

    text: str | None
    """Text to embed (the prompt, or the chat messages' contents joined); None when ``tokens`` carries it."""
    w_cost: float
    """Preference on the simplex (weight of cost)."""
    candidates: list[str] | None = None
    """Allowed models (None = the whole pool)."""
    mode: str = "explore"
    """'explore' (sample, propensity logged) or 'greedy' (argmax, propensity 1)."""
    log: bool = True
    """Serving only: log the decision when it is made (False: the caller logs it later, e.g. with the upstream cost)."""
    tokens: dict[str, np.ndarray] | None = None
    """The text already tokenized by the encoder's own tokenizer (serve/tokens.py: one unpadded row per
    tokenizer output, attention mask left out), so a GPU replica only runs forward passes; None = tokenize ``text``."""
    prompt_sha256: str | None = None
    """SHA-256 of the text, given with ``tokens`` (the decision log keeps it); None = computed from ``text``."""
    user: str | None = None
    """Experiment assignment key (a ``user`` body field or ``x-banditroute-user`` header); None = the decision id."""
    shadow_model: str | None = None
    """Shadow mode: the pool model that serves this request; the policy still decides and its choice is logged beside it."""
    tenant: str = ""
    """Tenant of the API key that sent the request (logged with the decision; '' = none)."""


def error_body(status: int, message: str, field: str | None = None, type_: str | None = None) -> dict[str, Any]:
    """The error envelope of every HTTP error this package answers (ingress, feedback, replay upstream).

    ``type_`` defaults by status: 'unavailable' for 5xx, else 'invalid_request_error'; callers name
    'authentication_error' (401 API key), 'permission_error' (403), 'upstream_error', 'not_found'.
    """
    if type_ is None:
        type_ = "unavailable" if status >= 500 else "invalid_request_error"
    return {"error": {"message": message, "field": field, "type": type_}}


class RequestError(ValueError):
    """A refused request: HTTP ``status``, the ``field`` it is about (None: no single field), a message.

    The one exception every HTTP error path raises; ``to_json`` is its body
    (:func:`error_body`), ``headers`` go on the answer (``WWW-Authenticate``
    on a 401, ``Retry-After`` on a retryable 503). A 5xx reaches the client
    with a generic message (:func:`public_error`) unless ``public``: its text
    was written for clients (no actor names, URIs or exception text).
    """

    def __init__(self, status: int, field: str | None, message: str, *, type_: str | None = None,
                 headers: dict[str, str] | None = None, public: bool = False):
        super().__init__(message)
        self.status, self.field, self.message = int(status), field, message
        self.type = type_
        self.headers = dict(headers or {})
        self.public = bool(public)

    def to_json(self) -> dict[str, Any]:
        return error_body(self.status, self.message, self.field, self.type)

    def to_router(self) -> dict[str, Any]:
        """The per-request error a router answers (``{"status", "field", "message"}``; ``router_error`` inverts it)."""
        return {"status": self.status, "field": self.field, "message": self.message}

    def __reduce__(self):  # picklable with its keyword state (raised through DeploymentHandles)
        return RequestError, (self.status, self.field, self.message), {"type": self.type, "headers": self.headers, "public": self.public}


PUBLIC_5XX_MESSAGES = {
    500: "internal error",
    502: "the upstream model failed",
    503: "temporarily unavailable; retry",
    504: "the upstream model did not answer in time",
}
"""What a client reads of a 5xx; the detailed message goes to the log under the same incident id."""


def public_error(err: RequestError, incident: str) -> RequestError:
    """``err`` as a client may see it: a 4xx (or a ``public`` 5xx) unchanged; else a generic message naming ``incident``
    (its details -- actor names, storage URIs, exception text -- stay in the logs), same status, type and headers."""
    if err.status < 500 or err.public:
        return err
    generic = PUBLIC_5XX_MESSAGES.get(err.status, PUBLIC_5XX_MESSAGES[500 if err.status < 502 else 503])
    return RequestError(err.status, err.field, f"{generic} (incident {incident})", type_=err.type, headers=err.headers)


def router_error(error: dict[str, Any]) -> RequestError:
    """A Router replica's per-request error (``{"status", "field", "message"}``) as a RequestError."""
    return RequestError(int(error.get("status", 500)), error.get("field"), error["message"])


def short_repr(value: Any, limit: int = 80) -> str:
    """repr for error messages: bounded length, and never raises (deeply nested client JSON)."""
    try:
        text = repr(value)
    except (RecursionError, ValueError):
        text = f"<{type(value).__name__}>"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _finite_float(text: str) -> float:
    value = float(text)
    if value in (float("inf"), float("-inf")):
        raise ValueError(f"number {text[:40]} is out of range")
    return value


_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")


# Python-level hooks: the C scanner holds the GIL for a whole parse unless it calls back into Python
# bytecode, so a body parsed in a worker thread with these lets the event loop run between values.
def _yield_int(text: str) -> int:
    return int(text)


def _yield_pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    return dict(pairs)


def parse_json_body(raw: bytes, yielding: bool = False) -> Any:
    """A request body -> JSON value, or RequestError(400, "body").

    Stricter than ``json.loads``: the body must be UTF-8 (RFC 8259; json.loads
    would also take UTF-16/32 and let encoded surrogates through), and
    NaN/Infinity, numbers that overflow a float and lone UTF-16 surrogate
    escapes are refused: they are not JSON / not Unicode, and nothing
    downstream (encoders, logs, upstream calls) can use them. ``yielding``:
    same result, with Python-level hooks for numbers and objects so a worker
    thread running it lets the event loop in (serve/body.py; slower).
    """
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise RequestError(400, "body", f"the body must be UTF-8 (invalid byte at offset {exc.start})") from None
    try:
        hooks = {"parse_int": _yield_int, "object_pairs_hook": _yield_pairs} if yielding else {}
        value = json.loads(text, parse_constant=_reject_constant, parse_float=_finite_float, **hooks)
    except RecursionError:
        raise RequestError(400, "body", "the body is nested too deeply") from None
    except (ValueError, TypeError) as exc:  # JSONDecodeError, huge ints, NaN
        raise RequestError(400, "body", f"the body must be valid JSON ({str(exc)[:120]})") from None
    if _SURROGATE_ESCAPE.search(text):
        try:
            json.dumps(value, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError:
            raise RequestError(400, "body", "the body contains a lone UTF-16 surrogate escape (not valid Unicode)") from None
        except (ValueError, RecursionError):
            raise RequestError(400, "body", "the body is nested too deeply") from None
    return value


def _content_text(content: Any, where: str) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for i, part in enumerate(content):
            if isinstance(part, str):
                parts.append(part)
            elif isinstance(part, dict):
                if part.get("type", "text") == "text":
                    text = part.get("text")
                    if not isinstance(text, str):
                        raise RequestError(422, f"{where}[{i}].text", f"{where}[{i}].text must be a string")
                    parts.append(text)
                # non-text parts (images, audio) carry nothing the text encoder can use
            else:
                raise RequestError(422, f"{where}[{i}]", f"{where}[{i}] must be a string or a content part object")
        return "\n".join(parts)
    raise RequestError(422, where, f"{where} must be a string or a list of content parts")


def messages_to_text(messages: Any, field: str = "messages") -> str:
    """The text to embed for a chat: every message's content, in order, joined by newlines.

    The encoder keeps the END of long inputs, so the last (user) message is
    what survives truncation. A single message gives exactly its content, so
    a chat holding one benchmark prompt embeds like that prompt.
    """
    if not isinstance(messages, list):
        raise RequestError(422, field, f"{field} must be a list of message objects")
    if not messages:
        raise RequestError(422, field, f"{field} must not be empty")
    texts = []
    for i, msg in enumerate(messages):
        if not isinstance(msg, dict):
            raise RequestError(422, f"{field}[{i}]", f"{field}[{i}] must be an object with 'role' and 'content'")
        role = msg.get("role", "user")
        if not isinstance(role, str):
            raise RequestError(422, f"{field}[{i}].role", f"{field}[{i}].role must be a string")
        text = _content_text(msg.get("content"), f"{field}[{i}].content")
        if text:
            texts.append(text)
    joined = "\n".join(texts)
    if not joined.strip():
        raise RequestError(422, field, f"{field} contain no text content")
    return joined


def parse_preference(value: Any, default_w_cost: float, field: str = "preference") -> float:
    """w_cost from ``{"quality": q, "cost": c}`` (a missing weight counts as 0); None -> the default."""
    if value is None:
        return default_w_cost
    if not isinstance(value, dict):
        raise RequestError(422, field, f"{field} must be an object like {{\"quality\": 0.7, \"cost\": 0.3}}")
    unknown = sorted(set(value) - {"quality", "cost"})
    if unknown:
        raise RequestError(422, f"{field}.{unknown[0]}", f"{field}: unknown key {short_repr(unknown[0])}; use 'quality' and 'cost'")
    if not value:
        raise RequestError(422, field, f"{field} must give 'quality' and/or 'cost'")
    weights = {}
    for key in ("quality", "cost"):
        weight = value.get(key, 0.0)
        if isinstance(weight, int) and not isinstance(weight, bool):
            try:  # numpy cannot check ints beyond int64; a float can (or overflows: out of range)
                weight = float(weight)
            except OverflowError:
                raise RequestError(422, f"{field}.{key}", f"{field}.{key} is out of range") from None
        weights[key] = weight
    try:
        return preference_to_w_cost(weights["quality"], weights["cost"])
    except PreferenceError as exc:
        message = str(exc)
        sub = field
        for key in ("quality", "cost"):
            if message.startswith(f"preference.{key} ") and "+" not in message:
                sub = f"{field}.{key}"
        raise RequestError(422, sub, message.replace("preference", field)) from None


def parse_candidates(value: Any, models: Sequence[str] | None, field: str = "candidates") -> list[str] | None:
    if value is None:
        return None
    if not isinstance(value, list):
        raise RequestError(422, field, f"{field} must be a list of model names")
    if not value:
        raise RequestError(422, field, f"{field} must not be empty (omit it to consider every model)")
    out: list[str] = []
    for i, name in enumerate(value):
        if not isinstance(name, str):
            raise RequestError(422, f"{field}[{i}]", f"{field}[{i}] must be a string")
        if models is not None and name not in models:
            raise RequestError(422, field, f"{field}: unknown model {short_repr(name)}; known: {list(models)}")
        if name not in out:
            out.append(name)
    return out


def parse_mode(value: Any, default_mode: str, field: str = "mode") -> str:
    if value is None:
        return default_mode
    if value not in ROUTE_MODES:
        raise RequestError(422, field, f"{field} must be one of {list(ROUTE_MODES)}, got {short_repr(value)}")
    return value


def check_length(text: str, max_chars: int, field: str) -> None:
    if len(text) > max_chars:
        raise RequestError(413, field, f"{field} is {len(text)} characters long; the limit is {max_chars}")


def parse_route_body(
    body: Any,
    *,
    models: Sequence[str] | None,
    default_w_cost: float,
    default_mode: str,
    max_prompt_chars: int,
    prefix: str = "",
    shared: dict[str, Any] | None = None,
) -> RouteRequest:
    """A /v1/route body -> RouteRequest (or RequestError naming the field).

    ``shared`` gives defaults for preference/candidates/mode (batch calls);
    ``prefix`` prefixes field names (``requests[3].``).
    """
    if not isinstance(body, dict):
        raise RequestError(400 if not prefix else 422, prefix.rstrip(".") or "body", f"{prefix.rstrip('.') or 'the body'} must be a JSON object")
    shared = shared or {}
    has_prompt, has_messages = body.get("prompt") is not None, body.get("messages") is not None
    if has_prompt and has_messages:
        raise RequestError(422, prefix + "prompt", "give either 'prompt' or 'messages', not both")
    if has_prompt:
        prompt = body["prompt"]
        if not isinstance(prompt, str):
            raise RequestError(422, prefix + "prompt", f"{prefix}prompt must be a string")
        if not prompt.strip():
            raise RequestError(422, prefix + "prompt", f"{prefix}prompt must not be empty")
        text, text_field = prompt, prefix + "prompt"
    elif has_messages:
        text, text_field = messages_to_text(body["messages"], prefix + "messages"), prefix + "messages"
    else:
        raise RequestError(422, prefix + "prompt", f"missing {prefix}prompt: give 'prompt' (a string) or 'messages' (a list)")
    check_length(text, max_prompt_chars, text_field)
    w_cost = parse_preference(
        body["preference"] if body.get("preference") is not None else shared.get("preference"),
        default_w_cost,
        prefix + "preference" if body.get("preference") is not None else "preference",
    )
    cand_value = body["candidates"] if "candidates" in body else shared.get("candidates")
    candidates = parse_candidates(cand_value, models, prefix + "candidates" if "candidates" in body else "candidates")
    mode = parse_mode(
        body.get("mode", shared.get("mode")), default_mode, prefix + "mode" if "mode" in body else "mode"
    )
    return RouteRequest(text=text, w_cost=w_cost, candidates=candidates, mode=mode)


def parse_batch_body(
    body: Any,
    *,
    models: Sequence[str] | None,
    default_w_cost: float,
    default_mode: str,
    max_prompt_chars: int,
    max_batch_requests: int,
    max_batch_chars: int | None = None,
) -> list[RouteRequest]:
    """/v1/route/batch: ``{"prompts": [str, ...]}`` or ``{"requests": [route body, ...]}``.

    Top-level ``preference``, ``candidates`` and ``mode`` apply to every item
    that does not set its own. ``max_batch_chars``: most characters of text in
    the whole call (``limits.max_batch_chars``; 413 naming the list past it).
    """
    if not isinstance(body, dict):
        raise RequestError(400, "body", "the body must be a JSON object")
    if ("prompts" in body) == ("requests" in body):
        raise RequestError(422, "requests", "give exactly one of 'prompts' (list of strings) or 'requests' (list of route bodies)")
    key = "prompts" if "prompts" in body else "requests"
    items = body[key]
    if not isinstance(items, list):
        raise RequestError(422, key, f"{key} must be a list")
    if not items:
        raise RequestError(422, key, f"{key} must not be empty")
    if len(items) > max_batch_requests:
        raise RequestError(413, key, f"{key} has {len(items)} items; the limit is {max_batch_requests}")
    shared = {k: body.get(k) for k in ("preference", "candidates", "mode") if k in body}
    out, total_chars = [], 0
    for i, item in enumerate(items):
        if key == "prompts":
            if not isinstance(item, str):
                raise RequestError(422, f"prompts[{i}]", f"prompts[{i}] must be a string")
            item = {"prompt": item}
        out.append(
            parse_route_body(
                item,
                models=models,
                default_w_cost=default_w_cost,
                default_mode=default_mode,
                max_prompt_chars=max_prompt_chars,
                prefix=f"{key}[{i}].",
                shared=shared,
            )
        )
        total_chars += len(out[-1].text or "")
        if max_batch_chars is not None and total_chars > max_batch_chars:
            raise RequestError(413, key, f"{key}: the batch holds over {max_batch_chars} characters of text by item {i} "
                                         f"(limits.max_batch_chars); split it into smaller calls")
    return out
