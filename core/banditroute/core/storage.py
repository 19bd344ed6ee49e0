"""One small storage interface for checkpoints, the event log and the model registry.

Everything durable that banditroute writes (learner checkpoints, the Parquet
feedback event log, registry entries) goes through :class:`Storage`, so the
same code runs against a local folder on a laptop and against S3 (or MinIO,
or moto in tests) on a cluster. Keys are relative, ``/``-separated paths
under the configured root (``events/2024/part-0001.parquet``).

Backends are ``pyarrow.fs.LocalFileSystem`` and ``pyarrow.fs.S3FileSystem``.
Two promises hold on both:

- a write is all or nothing: readers never see half a file (local: write a
  temporary file beside the target, fsync, ``os.replace``; S3: one PUT, and
  S3 only shows an object once its upload has completed);
- failures are typed: a missing key raises ``FileNotFoundError`` naming the
  key; an S3 endpoint that cannot be reached (refused, timed out, 5xx) raises
  :class:`StorageUnavailable`, quickly (small connect/request timeouts), so a
  caller such as the feedback writer can keep the batch buffered and retry
  instead of blocking requests or losing data.
"""

from __future__ import annotations

import io
import json
import os
import posixpath
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, TypeVar
from urllib.parse import unquote, urlparse

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

T = TypeVar("T")

# Substrings of pyarrow/AWS SDK error messages that mean "the service did not
# answer (usefully)" rather than "the request was wrong". pyarrow raises a
# plain OSError for all of them, so the message is all we have to go on.
_UNAVAILABLE_MARKERS = (
    "NETWORK_CONNECTION",  # curl could not connect, or the request timed out
    "curlCode",
    "Could not connect",
    "Couldn't connect",
    "Timeout was reached",
    "Could not resolve host",
    "SERVICE_UNAVAILABLE",
    "SLOW_DOWN",
    "INTERNAL_FAILURE",
    "HTTP status 500",
    "HTTP status 502",
    "HTTP status 503",
    "HTTP status 504",
)

# Local writes go to a hidden temporary file first; list() never shows them.
TMP_PREFIX = ".tmp-"


class StorageUnavailable(ConnectionError):
    """The storage service could not be reached or did not answer in time.

    The operation did not happen (or it is unknown whether a write landed,
    in which case the write is safe to repeat: every write replaces the whole
    object). Callers keep their data and retry later.
    """


@dataclass
class StorageConfig:
    """Where banditroute keeps durable data, and how to reach it."""

    uri: str = "runs/storage"
    """Root of all keys: ``s3://bucket/prefix``, ``file:///abs/path`` or a plain local path."""

    endpoint_url: str | None = None
    """S3-compatible endpoint (MinIO, moto), e.g. ``http://127.0.0.1:9000``; unset means AWS S3."""

    region: str = "us-east-1"
    """S3 region. Set explicitly so opening storage never has to ask the network for it."""

    access_key_id_env: str = "AWS_ACCESS_KEY_ID"
    """Name of the environment variable holding the S3 access key id (never the key itself)."""

    secret_access_key_env: str = "AWS_SECRET_ACCESS_KEY"
    """Name of the environment variable holding the S3 secret key (never the key itself)."""

    session_token_env: str = "AWS_SESSION_TOKEN"
    """Name of the environment variable holding an optional S3 session token."""

    connect_timeout_s: float = 2.0
    """Seconds to wait for a TCP connection to S3 before giving up on that attempt."""

    request_timeout_s: float = 5.0
    """Seconds a request may go without receiving a byte before it is abandoned."""

    max_attempts: int = 3
    """Attempts per S3 operation (1 = no retry) before StorageUnavailable is raised."""

    create_bucket: bool = False
    """Create the bucket if it is missing (dev MinIO/moto setups; production buckets come from infra)."""

    def validate(self) -> None:
        if not self.uri:
            raise ValueError("storage.uri: must not be empty")
        scheme = urlparse(self.uri).scheme
        if scheme not in ("", "file", "s3"):
            raise ValueError(f"storage.uri: scheme must be s3:// or file://, got {self.uri!r}")
        if scheme == "s3" and not urlparse(self.uri).netloc:
            raise ValueError(f"storage.uri: no bucket in {self.uri!r}")
        if scheme == "file" and not urlparse(self.uri).path.startswith("/"):
            raise ValueError(f"storage.uri: file:// URIs must be absolute, got {self.uri!r}")
        if self.endpoint_url is not None:
            parsed = urlparse(self.endpoint_url)
            if parsed.scheme not in ("http", "https") or not parsed.netloc:
                raise ValueError(
                    f"storage.endpoint_url: expected http(s)://host[:port], got {self.endpoint_url!r}"
                )
        if self.connect_timeout_s <= 0:
            raise ValueError("storage.connect_timeout_s: must be > 0")
        if self.request_timeout_s <= 0:
            raise ValueError("storage.request_timeout_s: must be > 0")
        if self.max_attempts < 1:
            raise ValueError("storage.max_attempts: must be >= 1")

    @property
    def is_s3(self) -> bool:
        return urlparse(self.uri).scheme == "s3"


class Storage:
    """Byte, JSON and Parquet objects under one root, on a local disk or S3.

    Build one with :func:`open_storage`. To use storage inside a Ray actor,
    pass the StorageConfig and open it there: a pickled S3 filesystem would
    carry the credentials through the object store.
    """

    def __init__(self, fs: pafs.FileSystem, root: str, uri_root: str, config: StorageConfig):
        self._fs = fs
        # Root in the filesystem's own path syntax: "/abs/dir" locally, "bucket/prefix" on S3.
        self._root = root.rstrip("/")
        # Root as a URI, for messages and uri_for(): "file:///abs/dir", "s3://bucket/prefix".
        self._uri_root = uri_root.rstrip("/")
        self.config = config

    # -- paths ---------------------------------------------------------------

    @property
    def is_local(self) -> bool:
        return isinstance(self._fs, pafs.LocalFileSystem)

    @property
    def filesystem(self) -> pafs.FileSystem:
        """The underlying pyarrow filesystem (for pyarrow.dataset and friends)."""
        return self._fs

    def path_for(self, key: str) -> str:
        """Path of ``key`` in the filesystem's own syntax (to pair with :attr:`filesystem`)."""
        key = _check_key(key)
        return f"{self._root}/{key}" if key else self._root

    def uri_for(self, key: str = "") -> str:
        """Full URI of ``key``: ``s3://bucket/prefix/key`` or ``file:///root/key``."""
        key = _check_key(key, allow_empty=True)
        return f"{self._uri_root}/{key}" if key else self._uri_root

    def child(self, prefix: str) -> "Storage":
        """A Storage rooted at ``prefix`` under this one (e.g. ``storage.child("checkpoints")``)."""
        prefix = _check_key(prefix)
        return Storage(self._fs, self.path_for(prefix), self.uri_for(prefix), self.config)

    # -- bytes ---------------------------------------------------------------

    def write_bytes(self, key: str, data: bytes) -> None:
        """Store ``data`` under ``key``, replacing any previous object, atomically."""
        path = self.path_for(key)
        if self.is_local:
            atomic_local_write(path, bytes(data))
            return

        def put() -> None:
            # With allow_delayed_open the stream buffers and issues one PutObject
            # on close (no multipart upload for objects below the part size).
            with self._fs.open_output_stream(path) as out:
                out.write(data)

        self._call("write", key, put)

    def read_bytes(self, key: str) -> bytes:
        """The content of ``key``; FileNotFoundError if there is no such key."""
        path = self.path_for(key)

        def get() -> bytes:
            with self._fs.open_input_stream(path) as stream:
                return stream.read()

        return self._call("read", key, get)

    def exists(self, key: str) -> bool:
        """Whether ``key`` holds an object (folders do not count)."""
        path = self.path_for(key)
        info = self._call("stat", key, lambda: self._fs.get_file_info(path))
        return info.type == pafs.FileType.File

    def list(self, prefix: str = "") -> list[str]:
        """Sorted keys of all objects under the folder ``prefix`` (recursive; [] if none)."""
        prefix = _check_key(prefix, allow_empty=True)
        base = f"{self._root}/{prefix}" if prefix else self._root
        selector = pafs.FileSelector(base, recursive=True, allow_not_found=True)
        infos = self._call("list", prefix, lambda: self._fs.get_file_info(selector))
        keys = []
        for info in infos:
            if info.type != pafs.FileType.File or info.base_name.startswith(TMP_PREFIX):
                continue
            keys.append(posixpath.relpath(info.path, self._root))
        return sorted(keys)

    def delete(self, key: str, missing_ok: bool = False) -> None:
        """Remove ``key``; FileNotFoundError if absent unless ``missing_ok``."""
        path = self.path_for(key)
        try:
            self._call("delete", key, lambda: self._fs.delete_file(path))
        except FileNotFoundError:
            if not missing_ok:
                raise

    # -- structured ----------------------------------------------------------

    def write_json(self, key: str, obj: Any) -> None:
        """Store ``obj`` as UTF-8 JSON (sorted keys, so equal objects give equal bytes)."""
        self.write_bytes(key, json.dumps(obj, indent=2, sort_keys=True).encode("utf-8"))

    def read_json(self, key: str) -> Any:
        return json.loads(self.read_bytes(key).decode("utf-8"))

    def write_parquet(self, key: str, table: pa.Table) -> None:
        """Store ``table`` as one Parquet file (serialised in memory, then one atomic write)."""
        sink = io.BytesIO()
        pq.write_table(table, sink)
        self.write_bytes(key, sink.getvalue())

    def read_parquet(self, key: str) -> pa.Table:
        return pq.read_table(pa.BufferReader(self.read_bytes(key)))

    # -- errors --------------------------------------------------------------

    def _call(self, op: str, key: str, fn: Callable[[], T]) -> T:
        """Run ``fn`` and turn pyarrow's OSErrors into errors that name the key."""
        try:
            return fn()
        except FileNotFoundError:
            raise FileNotFoundError(f"storage key not found: {key!r} ({self.uri_for(key)})") from None
        except OSError as exc:
            message = str(exc)
            where = self.uri_for(key)
            if any(marker in message for marker in _UNAVAILABLE_MARKERS):
                raise StorageUnavailable(f"storage unavailable during {op} of {where}: {message}") from exc
            if "NO_SUCH_BUCKET" in message or "NoSuchBucket" in message:
                raise FileNotFoundError(f"bucket does not exist for {op} of {where}: {message}") from exc
            raise OSError(f"storage {op} of {where} failed: {message}") from exc

    def __repr__(self) -> str:
        return f"Storage({self._uri_root!r})"


def _check_key(key: str, allow_empty: bool = False) -> str:
    """Normalise a relative key; refuse absolute paths and '..' so keys stay under the root."""
    if not isinstance(key, str):
        raise TypeError(f"storage key must be a string, got {type(key).__name__}")
    cleaned = key.strip("/")
    if not cleaned:
        if allow_empty:
            return ""
        raise ValueError("storage key must not be empty")
    parts = cleaned.split("/")
    if any(part in ("", ".", "..") for part in parts) or "\\" in cleaned:
        raise ValueError(f"invalid storage key {key!r}: use relative '/'-separated names without '.' or '..'")
    return cleaned


def _fsync_dir(directory: str) -> None:
    """Make ``directory``'s entries (a rename, a new child folder) survive power loss."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _make_dirs_durably(directory: str) -> None:
    """``os.makedirs``, then fsync the parent of every folder it created (new dt=/hr= partitions included)."""
    missing = []
    current = os.path.abspath(directory)
    while not os.path.isdir(current):
        missing.append(current)
        current = os.path.dirname(current)
    os.makedirs(directory, exist_ok=True)
    for created in reversed(missing):
        _fsync_dir(os.path.dirname(created))


def atomic_local_write(path: str, data: bytes) -> None:
    """Temp file beside ``path``, fsync, rename, fsync the folder: what is acknowledged after this survives power loss."""
    directory = os.path.dirname(path)
    _make_dirs_durably(directory)
    tmp = os.path.join(directory, f"{TMP_PREFIX}{uuid.uuid4().hex}-{os.path.basename(path)}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(directory)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def _s3_filesystem(config: StorageConfig) -> pafs.S3FileSystem:
    kwargs: dict[str, Any] = {
        "region": config.region,
        "connect_timeout": config.connect_timeout_s,
        "request_timeout": config.request_timeout_s,
        "retry_strategy": pafs.AwsStandardS3RetryStrategy(max_attempts=config.max_attempts),
        # Defer opening until the first write so small objects go out as one PutObject.
        "allow_delayed_open": True,
        "allow_bucket_creation": config.create_bucket,
    }
    if config.endpoint_url:
        endpoint = urlparse(config.endpoint_url)
        kwargs["endpoint_override"] = endpoint.netloc
        kwargs["scheme"] = endpoint.scheme
    access_key = os.environ.get(config.access_key_id_env)
    secret_key = os.environ.get(config.secret_access_key_env)
    if bool(access_key) != bool(secret_key):
        raise ValueError(
            f"storage: set both {config.access_key_id_env} and {config.secret_access_key_env}, or neither"
        )
    if access_key:
        kwargs["access_key"] = access_key
        kwargs["secret_key"] = secret_key
        kwargs["session_token"] = os.environ.get(config.session_token_env) or None
    # Without keys in the environment, the AWS SDK's default chain applies
    # (config files, web identity on EKS, instance metadata).
    return pafs.S3FileSystem(**kwargs)


def open_storage(config: StorageConfig | str) -> Storage:
    """Open the storage that ``config`` (or a bare URI/path) points at.

    Opening contacts nothing, except to create a missing bucket when
    ``config.create_bucket`` is set.
    """
    if isinstance(config, str):
        config = StorageConfig(uri=config)
    config.validate()
    parsed = urlparse(config.uri)
    if parsed.scheme == "s3":
        fs = _s3_filesystem(config)
        bucket = parsed.netloc
        prefix = parsed.path.strip("/")
        root = f"{bucket}/{prefix}" if prefix else bucket
        storage = Storage(fs, root, f"s3://{root}", config)
        if config.create_bucket:
            storage._call("create bucket", "", lambda: fs.create_dir(bucket))
        return storage
    local = Path(unquote(parsed.path) if parsed.scheme == "file" else config.uri).expanduser().resolve()
    return Storage(pafs.LocalFileSystem(), str(local), local.as_uri(), config)
