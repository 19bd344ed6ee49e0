"""Ray's token authentication for an embedded local cluster (Ray >= 2.52).

An embedded Ray (``ray.init()`` with no address) listens on every interface:
the GCS, each raylet, every worker's gRPC server and the dashboard agent bind
``0.0.0.0``/``::`` whatever ``_node_ip_address`` says (measured with Ray 2.60,
docs/reliability.md, "What is open where"). Without a token anyone who can
reach the machine can submit work that reads this process's environment (the
HMAC secret, API keys, S3 keys). With ``RAY_AUTH_MODE=token`` every Ray RPC
and the dashboard require the shared token; Serve's HTTP port does not (the
ingress checks its own API keys there).

Ray fixes the mode per process the first time it reads its config and never
re-reads the environment, so :func:`enable_local_token_auth` must run before
``ray.init`` and refreshes Ray's cached config itself (as Ray's own
``enable_token_auth_by_default`` does). Workers inherit the environment of the
process that started the cluster; a ``runtime_env`` that sets
``RAY_AUTH_MODE=disabled`` on a token cluster makes every worker fail to
register (tasks hang), so never put the mode in a runtime_env.

The token file: Ray reads ``RAY_AUTH_TOKEN``, then ``RAY_AUTH_TOKEN_PATH``,
then ``~/.ray/auth_token``. Ray writes that default file with the process
umask (usually 0644, readable by every local user); the file made here is
0600 in a 0700 folder, and an existing one that others can read is refused.
"""

from __future__ import annotations

import os
import secrets
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import MutableMapping

MODE_ENV = "RAY_AUTH_MODE"
TOKEN_ENV = "RAY_AUTH_TOKEN"
TOKEN_PATH_ENV = "RAY_AUTH_TOKEN_PATH"
TOKEN_BYTES = 32
"""Random bytes in a generated token (64 hex characters, as Ray's own generator)."""
MIN_TOKEN_CHARS = 32
"""Shortest token accepted from a file or RAY_AUTH_TOKEN: 16 random bytes as hex at the least."""
MODES = ("token", "disabled")


class RayAuthError(RuntimeError):
    """The token auth setup is unsafe or inconsistent; the message names the file or variable."""


@dataclass(frozen=True)
class RayAuth:
    """How the embedded Ray authenticates its control plane."""

    mode: str
    """'token' (every Ray RPC and the dashboard need the token) or 'disabled'."""
    token_source: str | None = None
    """Where the token comes from: the file path, or 'RAY_AUTH_TOKEN' for the variable; None when disabled."""

    def describe(self) -> str:
        if self.mode != "token":
            return f"Ray control plane: auth disabled ({MODE_ENV}=disabled): anyone who reaches its ports can run code"
        return f"Ray control plane: token auth, token in {self.token_source}"


def default_token_path() -> Path:
    """Ray's own default token file, so `ray status` / `ray job submit` from another shell find it."""
    return Path.home() / ".ray" / "auth_token"


def generate_token() -> str:
    return secrets.token_hex(TOKEN_BYTES)


def check_token_file(path: Path) -> None:
    """Raise :class:`RayAuthError` unless ``path`` is this user's regular file, 0600 or stricter, holding a token."""
    try:
        info = path.lstat()
    except FileNotFoundError as exc:
        raise RayAuthError(f"{TOKEN_PATH_ENV}: {path} does not exist") from exc
    if not stat.S_ISREG(info.st_mode):
        raise RayAuthError(f"{TOKEN_PATH_ENV}: {path} is not a regular file (a symlink or folder is refused)")
    if info.st_uid != os.getuid():
        raise RayAuthError(f"{TOKEN_PATH_ENV}: {path} belongs to uid {info.st_uid}, not to this user ({os.getuid()})")
    if info.st_mode & 0o077:
        raise RayAuthError(f"{TOKEN_PATH_ENV}: {path} is readable by other users (mode {stat.S_IMODE(info.st_mode):o}); "
                           f"run `chmod 600 {path}`")
    _check_token(path.read_text().strip(), str(path))


def _check_token(token: str, where: str) -> None:
    if len(token) < MIN_TOKEN_CHARS:
        raise RayAuthError(f"{where}: the Ray auth token has {len(token)} characters, fewer than {MIN_TOKEN_CHARS}")
    if any(ch.isspace() for ch in token):
        raise RayAuthError(f"{where}: the Ray auth token contains whitespace")


def ensure_token_file(path: Path) -> Path:
    """Create ``path`` with a fresh token (0600, parent 0700) unless it exists; then check it. Returns ``path``."""
    path = Path(path).expanduser()
    if not path.parent.exists():
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    try:
        # O_EXCL: two processes starting at once never both write (one token wins, the other checks it).
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o600)
    except FileExistsError:
        pass
    else:
        try:
            os.write(fd, generate_token().encode("ascii"))
            os.fsync(fd)
        finally:
            os.close(fd)
    check_token_file(path)
    return path


def resolve_local_auth(mode: str = "token", environ: MutableMapping[str, str] | None = None) -> tuple[RayAuth, dict[str, str]]:
    """What an embedded Ray should run with, and the environment variables that say so (nothing is changed).

    An explicit ``RAY_AUTH_MODE`` in ``environ`` wins over ``mode``; an
    explicit ``RAY_AUTH_TOKEN`` or ``RAY_AUTH_TOKEN_PATH`` is used as it is
    (the file is checked, not created); otherwise the token lives in
    :func:`default_token_path`, created on first use.
    """
    environ = os.environ if environ is None else environ
    chosen = (environ.get(MODE_ENV) or mode).strip().lower()
    if chosen not in MODES:
        raise RayAuthError(f"{MODE_ENV}: {chosen!r} is not one of {list(MODES)}")
    if chosen == "disabled":
        return RayAuth("disabled"), {MODE_ENV: "disabled"}
    if environ.get(TOKEN_ENV):
        _check_token(environ[TOKEN_ENV].strip(), TOKEN_ENV)
        return RayAuth("token", TOKEN_ENV), {MODE_ENV: "token"}
    if environ.get(TOKEN_PATH_ENV):
        path = Path(environ[TOKEN_PATH_ENV]).expanduser()
        check_token_file(path)
    else:
        path = ensure_token_file(default_token_path())
    return RayAuth("token", str(path)), {MODE_ENV: "token", TOKEN_PATH_ENV: str(path)}


def enable_local_token_auth(mode: str = "token", environ: MutableMapping[str, str] | None = None) -> RayAuth:
    """Set up this process before ``ray.init()`` so the embedded cluster it starts uses ``mode``.

    Sets ``RAY_AUTH_MODE`` (and ``RAY_AUTH_TOKEN_PATH``) in ``environ``
    (default: ``os.environ``, which every Ray process started from here
    inherits) and refreshes Ray's cached config. Raises
    :class:`RayAuthError` if Ray is already initialised in this process.
    """
    import ray

    if ray.is_initialized():
        raise RayAuthError("enable_local_token_auth() must run before ray.init(): Ray is already initialised")
    auth, env = resolve_local_auth(mode, environ)
    target = os.environ if environ is None else environ
    target.update(env)
    if target is os.environ:
        _refresh_ray_config(auth.mode)
    return auth


def _refresh_ray_config(mode: str) -> None:
    """Make this process's Ray see the mode just set (Ray caches it at the first config read)."""
    from ray._raylet import AuthenticationMode, Config, get_authentication_mode

    Config.initialize("")
    wanted = AuthenticationMode.TOKEN if mode == "token" else AuthenticationMode.DISABLED
    if get_authentication_mode() != wanted:
        raise RayAuthError(f"{MODE_ENV}={mode} is set but this process's Ray still reports {get_authentication_mode()}")
