"""Request bounds of the ingress beyond the body sizes (``router.limits``): what one request may cost.

Body sizes per endpoint group are ``security.*max_body_bytes`` (core/security.py).
Here: where JSON is parsed (bodies above ``json_thread_min_bytes`` go to a
worker thread, serve/body.py), the total text of one /v1/route/batch call,
what the chat proxy may forward on the operator's upstream keys
(serve/openai_proxy.py), and the per-API-key rate limit
(serve/rate_limit.py). No imports from the rest of the package: RouterConfig
(serve/config.py) nests this.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field


@dataclass
class LimitsConfig:
    """What one request may cost: JSON parsing, batch text, chat forwarding, and a rate per API key."""

    json_thread_min_bytes: int = 64 * 1024
    """Bodies at least this large are parsed in a worker thread, not on the ingress event loop (0 = always)."""
    max_batch_chars: int = 1_000_000
    """Most characters of text (all prompts / messages together) in one /v1/route/batch call; more -> 413."""
    chat_max_tokens: int = 4096
    """Largest ``max_tokens`` / ``max_completion_tokens`` a chat may ask its upstream for; larger -> 422; absent -> this."""
    chat_max_n: int = 1
    """Largest ``n`` (completions per chat) forwarded; larger -> 422."""
    chat_extra_fields: list[str] = field(default_factory=list)
    """Chat body fields forwarded beyond the built-in allow-list (openai_proxy.FORWARDED_FIELDS); other unknown fields -> 422."""
    rate_limit_per_s: float = 0.0
    """Requests per second each API key (or, for an open group, each client address) may make, per ingress replica; 0 = off."""
    rate_limit_burst: int = 100
    """Requests a key may make at once before the rate applies (the token bucket's size)."""
    rate_limit_max_keys: int = 10_000
    """Buckets kept per ingress replica; the least recently used is dropped beyond this (bounded memory)."""

    def validate(self) -> None:
        if self.json_thread_min_bytes < 0:
            raise ValueError("limits.json_thread_min_bytes must be >= 0")
        for name in ("max_batch_chars", "chat_max_tokens", "chat_max_n", "rate_limit_burst", "rate_limit_max_keys"):
            if getattr(self, name) < 1:
                raise ValueError(f"limits.{name} must be >= 1")
        if not (math.isfinite(self.rate_limit_per_s) and self.rate_limit_per_s >= 0):
            raise ValueError("limits.rate_limit_per_s must be a finite number >= 0 (0 = off)")
        if not all(isinstance(f, str) and f for f in self.chat_extra_fields):
            raise ValueError("limits.chat_extra_fields must be a list of field names")
