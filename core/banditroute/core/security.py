"""Feedback authenticity and access control: signed decision tokens, API keys, limits (pure, no Ray).

Decision tokens
    Every decision id a client sees is ``br1.<payload>.<mac>``: ``payload`` is
    base64url (no padding) of the compact JSON ``[decision_id, model,
    policy_version, expires_at]`` and ``mac`` base64url of
    HMAC-SHA256(secret, "br1." + payload). Only the server can mint one, so a
    reward can only name a decision the router really made, for the model it
    really chose; internal records and logs keep the raw uuid
    (``claims.decision_id``). ``verify`` answers the claims or raises
    ``TokenError`` whose ``kind`` is:

    - ``unsigned``: not a ``br1.`` token at all (e.g. a raw uuid);
    - ``malformed``: a ``br1.`` token that does not have the token's shape;
    - ``tampered``: the MAC does not match (changed bytes, or another secret);
    - ``expired``: authentic, but past ``expires_at`` (``token_ttl_s`` after the decision).

    The MAC is checked before the expiry, and compared in constant time.

Secret rotation
    The secret variable may hold several secrets separated by commas: the FIRST
    signs, ALL verify. Rotate by prepending the new secret, and drop the old one
    once ``token_ttl_s`` has passed. Secrets never go in YAML: the config names
    the environment variable (``security.token_secret_env``, default
    ``BANDITROUTE_TOKEN_SECRET``); each must be at least 32 bytes and look random
    (at least 8 distinct characters): ``python -c "import secrets; print(secrets.token_urlsafe(32))"``.

Key binding
    A token minted for a request that carried a route API key also binds
    ``api_key_id(key)`` (a truncated SHA-256, never the key). /v1/feedback
    then accepts it only from that same key, or from a dedicated feedback
    key (one in the feedback group but not in the route group: an operator's
    grader service); any other caller gets 403 (``check_token_key``). Tokens
    routed without a key (open route group, in-cluster Python callers) bind
    nothing and stay bearer tokens.

API keys
    Three groups, each configured by the NAME of an environment variable that
    holds comma-separated keys: ``route`` (/v1/route, /v1/route/batch,
    /v1/chat/completions, /v1/models), ``feedback`` (/v1/feedback) and ``admin``
    (/v1/admin/*). A client sends ``Authorization: Bearer <key>`` or
    ``x-api-key: <key>``. No variable configured = that group is open, except
    admin: no variable = the admin API is disabled. A configured variable that
    is unset or empty fails the replica at start (it never silently opens).
    ``check_open_bind`` refuses to serve a non-loopback interface while the
    route or feedback group is open, unless ``security.allow_open_bind``.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import logging
import math
import os
import secrets
from dataclasses import dataclass
from typing import Any, Mapping

logger = logging.getLogger("banditroute.core.security")

TOKEN_PREFIX = "br1."
DEFAULT_SECRET_ENV = "BANDITROUTE_TOKEN_SECRET"
MIN_SECRET_BYTES = 32
MIN_SECRET_DISTINCT_CHARS = 8
KEY_ID_HEX_CHARS = 16
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")
MAX_TOKEN_CHARS = 4096
API_KEY_GROUPS = ("route", "feedback", "admin")
TOKEN_ERROR_KINDS = ("unsigned", "malformed", "tampered", "expired")


@dataclass
class SecurityConfig:
    """Decision-token signing, API keys per endpoint group, request limits (``security:`` in RouterConfig)."""

    require_signed_tokens: bool = True
    """Sign every decision id and accept only valid tokens on /v1/feedback; false = raw ids in and out (trusted networks only)."""
    token_secret_env: str = DEFAULT_SECRET_ENV
    """NAME of the environment variable holding the HMAC secret(s), comma-separated: the first signs, all verify."""
    token_ttl_s: float = 86_400.0
    """Seconds a decision token stays valid for feedback (keep it > feedback join.window_s); then 410."""
    route_api_keys_env: str | None = None
    """NAME of the env var with comma-separated keys for /v1/route, /v1/route/batch, /v1/chat/completions, /v1/models; None = open."""
    feedback_api_keys_env: str | None = None
    """NAME of the env var with comma-separated keys for /v1/feedback; None = open."""
    admin_api_keys_env: str | None = None
    """NAME of the env var with comma-separated keys for /v1/admin/*; None = the admin API is disabled (403)."""
    max_body_bytes: int = 8 * 1024 * 1024
    """Largest body of /v1/route, /v1/route/batch and /v1/chat/completions, in bytes; larger -> 413 (a larger
    Content-Length is refused unread)."""
    feedback_max_body_bytes: int = 16 * 1024
    """Largest /v1/feedback body, in bytes (a reward is ~200 bytes); larger -> 413."""
    admin_max_body_bytes: int = 16 * 1024
    """Largest /v1/admin/* body, in bytes; larger -> 413."""
    api_docs: bool = False
    """Serve /docs, /redoc and /openapi.json (FastAPI's schema and UIs); off by default (they map the whole API)."""
    allow_open_bind: bool = False
    """Let `banditroute serve` bind a non-loopback host while the route or feedback API has no keys (--allow-open)."""
    max_reward_cost_usd: float = 100.0
    """Largest ``cost`` (USD) one /v1/feedback may report; larger -> 422."""

    def validate(self) -> None:
        for name in ("token_secret_env", "route_api_keys_env", "feedback_api_keys_env", "admin_api_keys_env"):
            value = getattr(self, name)
            if value is not None and not (isinstance(value, str) and value.strip()):
                raise ValueError(f"security.{name} must be the name of an environment variable")
        if not (math.isfinite(self.token_ttl_s) and self.token_ttl_s > 0):
            raise ValueError("security.token_ttl_s must be a positive number of seconds")
        for name in ("max_body_bytes", "feedback_max_body_bytes", "admin_max_body_bytes"):
            if getattr(self, name) < 1024:
                raise ValueError(f"security.{name} must be >= 1024")
        if not (math.isfinite(self.max_reward_cost_usd) and self.max_reward_cost_usd > 0):
            raise ValueError("security.max_reward_cost_usd must be a positive number")

    def api_keys_env(self, group: str) -> str | None:
        return getattr(self, f"{group}_api_keys_env")

    def body_limit(self, group: str) -> tuple[int, str]:
        """(largest body in bytes, the config key that sets it) of an endpoint group ('route', 'feedback', 'admin')."""
        name = "max_body_bytes" if group == "route" else f"{group}_max_body_bytes"
        return int(getattr(self, name)), f"security.{name}"


# --- tokens ----------------------------------------------------------------------------------------------


class TokenError(ValueError):
    """A decision token that must not be accepted; ``kind`` is one of TOKEN_ERROR_KINDS."""

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind, self.message = kind, message


@dataclass(frozen=True)
class TokenClaims:
    """What a valid token binds."""

    decision_id: str
    model: str
    policy_version: int
    expires_at: int
    key_id: str = ""
    """:func:`api_key_id` of the route key that routed the decision; "" when routing was keyless."""


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _mac(secret: str, signed_part: str) -> str:
    return _b64(hmac.new(secret.encode("utf-8"), signed_part.encode("ascii"), hashlib.sha256).digest())


def sign(decision_id: str, model: str, policy_version: int, expires_at: float, secret: str, key_id: str = "") -> str:
    """An opaque URL-safe token binding the decision id, chosen model, policy version, expiry (unix s) and,
    when given, the id of the API key that routed (:func:`api_key_id`)."""
    claims = [decision_id, model, int(policy_version), int(math.ceil(expires_at))]
    if key_id:  # bound to the API key that routed; keyless routing keeps the 4-claim form
        claims.append(key_id)
    payload = json.dumps(claims, separators=(",", ":"))
    signed_part = TOKEN_PREFIX + _b64(payload.encode("utf-8"))
    return signed_part + "." + _mac(secret, signed_part)


def verify(token: Any, secrets_: list[str] | tuple[str, ...], now: float) -> TokenClaims:
    """The claims of an authentic, unexpired token; TokenError (kind unsigned/malformed/tampered/expired) otherwise."""
    if not isinstance(token, str) or not token.startswith(TOKEN_PREFIX):
        raise TokenError("unsigned", "decision_id is not a signed decision token: send the decision_id exactly as the router answered it")
    if len(token) > MAX_TOKEN_CHARS or not token.isascii() or token.count(".") != 2:
        raise TokenError("malformed", "decision_id is not a well-formed decision token")
    signed_part, mac = token.rsplit(".", 1)
    if not mac or not signed_part[len(TOKEN_PREFIX):]:
        raise TokenError("malformed", "decision_id is not a well-formed decision token")
    # Compare against every accepted secret (no early exit: the time does not say which one matched).
    ok = False
    for secret in secrets_:
        ok |= hmac.compare_digest(_mac(secret, signed_part).encode("ascii"), mac.encode("ascii"))
    if not ok:
        raise TokenError("tampered", "decision_id: the decision token's signature does not match (altered, or not issued by this router)")
    try:
        claims = json.loads(_unb64(signed_part[len(TOKEN_PREFIX):]))
        if not isinstance(claims, list) or len(claims) not in (4, 5):
            raise ValueError("claim count")
        did, model, version, expires_at = claims[:4]
        key_id = claims[4] if len(claims) == 5 else ""
        if not (isinstance(did, str) and isinstance(model, str) and type(version) is int and type(expires_at) is int
                and isinstance(key_id, str)):
            raise ValueError("claim types")
    except (ValueError, TypeError):  # authentic but unreadable: only a bug on our side could do this
        raise TokenError("malformed", "decision_id: the decision token's claims are unreadable") from None
    if now >= expires_at:
        raise TokenError("expired", f"decision_id: the decision token expired {now - expires_at:.0f}s ago; feedback for it is no longer accepted")
    return TokenClaims(did, model, version, expires_at, key_id)


# --- API keys --------------------------------------------------------------------------------------------


def split_keys(value: str | None) -> tuple[str, ...]:
    """Comma-separated secrets or keys -> tuple (blanks dropped)."""
    return tuple(k.strip() for k in (value or "").split(",") if k.strip())


def presented_key(authorization: str | None, x_api_key: str | None) -> str | None:
    """The key a request carries: ``Authorization: Bearer <key>`` (scheme case-insensitive), else ``x-api-key``."""
    if authorization:
        scheme, _, rest = authorization.strip().partition(" ")
        if scheme.lower() == "bearer" and rest.strip():
            return rest.strip()
    if x_api_key and x_api_key.strip():
        return x_api_key.strip()
    return None


def key_matches(presented: str | None, keys: tuple[str, ...]) -> bool:
    """Constant-time membership (every key is compared; no early exit)."""
    if presented is None:
        return False
    given = presented.encode("utf-8", "surrogatepass")
    ok = False
    for key in keys:
        ok |= hmac.compare_digest(key.encode("utf-8"), given)
    return ok


# --- the replica's view --------------------------------------------------------------------------------------


class Security:
    """SecurityConfig plus the secrets and keys read from the environment (once, at replica start)."""

    def __init__(self, cfg: SecurityConfig, environ: Mapping[str, str] | None = None):
        env = os.environ if environ is None else environ
        self.cfg = cfg
        self.secrets: tuple[str, ...] = ()
        if cfg.require_signed_tokens:
            self.secrets = split_keys(env.get(cfg.token_secret_env))
            if not self.secrets:
                raise ValueError(
                    f"security.token_secret_env: the environment variable {cfg.token_secret_env!r} holding the decision-token "
                    f"secret is not set in this replica (set it, e.g. from a Kubernetes Secret; or security.require_signed_tokens=false "
                    f"for trusted setups)"
                )
            for i, secret in enumerate(self.secrets):
                problem = secret_problem(secret)
                if problem:
                    raise ValueError(f"security.token_secret_env: secret #{i} in {cfg.token_secret_env!r} {problem}; "
                                     f"generate one with: python -c \"import secrets; print(secrets.token_urlsafe(32))\"")
        self.keys: dict[str, tuple[str, ...] | None] = {}
        for group in API_KEY_GROUPS:
            var = cfg.api_keys_env(group)
            if var is None:
                self.keys[group] = None
                continue
            keys = split_keys(env.get(var))
            if not keys:
                raise ValueError(f"security.{group}_api_keys_env: the environment variable {var!r} is unset or holds no keys")
            self.keys[group] = keys

    @property
    def signing(self) -> bool:
        return bool(self.secrets)

    def token(self, decision_id: str, model: str, policy_version: int, now: float, key_id: str = "") -> str:
        """The id a client sees for a decision made at ``now`` (the raw id when signing is off); ``key_id``:
        :func:`api_key_id` of the route key the request carried ("" when routing is keyless)."""
        if not self.signing:
            return decision_id
        return sign(decision_id, model, policy_version, now + self.cfg.token_ttl_s, self.secrets[0], key_id)

    def routing_key_id(self, authorization: str | None, x_api_key: str | None) -> str:
        """What a routed token binds: the route key's id when the route group has keys, else ""."""
        if self.keys.get("route") is None:
            return ""
        presented = presented_key(authorization, x_api_key)
        return api_key_id(presented) if presented else ""

    def check_token_key(self, claims: TokenClaims, authorization: str | None, x_api_key: str | None) -> str | None:
        """None when this feedback caller may reward the decision ``claims`` bind; else 'wrong_key'.

        Passes: a keyless token; the key that routed it; a dedicated feedback key (listed
        for feedback, not for routing: a grader service the operator runs)."""
        if not claims.key_id:
            return None
        presented = presented_key(authorization, x_api_key)
        if presented is None:
            return "wrong_key"
        if hmac.compare_digest(api_key_id(presented), claims.key_id):
            return None
        feedback_keys, route_keys = self.keys.get("feedback"), self.keys.get("route") or ()
        if feedback_keys is not None and key_matches(presented, feedback_keys) and not key_matches(presented, route_keys):
            return None
        return "wrong_key"

    def verify(self, token: Any, now: float) -> TokenClaims:
        return verify(token, self.secrets, now)

    def check_key(self, group: str, authorization: str | None, x_api_key: str | None) -> str | None:
        """None when the request may use ``group``; else the rejection reason: 'disabled', 'missing_key' or 'wrong_key'."""
        keys = self.keys[group]
        if keys is None:
            return "disabled" if group == "admin" else None
        presented = presented_key(authorization, x_api_key)
        if presented is None:
            return "missing_key"
        return None if key_matches(presented, keys) else "wrong_key"


def api_key_id(key: str) -> str:
    """A short, stable id of an API key for tokens and logs (truncated SHA-256: the key itself never leaves)."""
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()[:KEY_ID_HEX_CHARS]


def secret_problem(secret: str) -> str | None:
    """Why ``secret`` is too weak to sign tokens (fewer than 32 bytes, or too few distinct characters), or None."""
    size = len(secret.encode("utf-8"))
    if size < MIN_SECRET_BYTES:
        return f"is {size} bytes; at least {MIN_SECRET_BYTES} random bytes are required"
    if len(set(secret)) < MIN_SECRET_DISTINCT_CHARS:
        return f"has fewer than {MIN_SECRET_DISTINCT_CHARS} distinct characters: it is not random"
    return None


def is_loopback(host: str) -> bool:
    return host in LOOPBACK_HOSTS or host.startswith("127.")


def check_open_bind(host: str, cfg: SecurityConfig) -> None:
    """Refuse (ValueError) to serve a non-loopback interface while the route or feedback API takes no key."""
    if is_loopback(host) or cfg.allow_open_bind:
        return
    open_groups = [g for g in ("route", "feedback") if cfg.api_keys_env(g) is None]
    if open_groups:
        raise ValueError(
            f"router.host: {host!r} is reachable from other machines but the {' and '.join(open_groups)} API has no keys "
            f"(security.{open_groups[0]}_api_keys_env): anyone could route on your upstream keys or post rewards. Set the "
            f"keys, bind 127.0.0.1, or pass --allow-open (router.security.allow_open_bind=true) to serve it open anyway"
        )


def ensure_local_secret(cfg: SecurityConfig, environ: dict[str, str] | None = None) -> bool:
    """For local runs (`banditroute serve`, `banditroute up`): put an ephemeral random secret into the environment
    when signing is on and the variable is unset, BEFORE Ray starts (its workers inherit it). True if generated."""
    env = os.environ if environ is None else environ
    if not cfg.require_signed_tokens or split_keys(env.get(cfg.token_secret_env)):
        return False
    env[cfg.token_secret_env] = secrets.token_urlsafe(32)
    logger.warning(
        "%s is not set: generated an ephemeral decision-token secret; decision ids handed out now cannot be rewarded "
        "after a restart (set %s to keep them valid)", cfg.token_secret_env, cfg.token_secret_env,
    )
    return True
