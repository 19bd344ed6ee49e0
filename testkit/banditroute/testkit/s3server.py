"""A real S3 endpoint for tests: moto's server in a subprocess on 127.0.0.1.

Use the session-scoped fixture ``s3_server`` (import it into a conftest or a
test module: ``from s3server import s3_server  # noqa: F401``). It yields an
:class:`S3Server` with the endpoint URL, helpers to make buckets and
StorageConfigs, and switches to take S3 away mid-test:

- ``stop()`` / ``start()``: the process goes away and connections are
  refused (fast failures). moto keeps everything in memory, so ``start()``
  comes back on the same port with the same buckets, but empty.
- ``pause()`` / ``resume()``: the process is frozen (SIGSTOP), so connections
  hang until the client's timeouts fire; objects survive.
- ``unavailable(mode)``: a context manager doing one of the above and undoing it.

Credentials: moto accepts any, so the fixture sets AWS_ACCESS_KEY_ID /
AWS_SECRET_ACCESS_KEY to "testing" for the session, and
AWS_EC2_METADATA_DISABLED so the AWS SDK never probes instance metadata.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from typing import Iterator

import pytest

from banditroute.core.storage import StorageConfig

S3_TEST_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_EC2_METADATA_DISABLED": "true",
}


def _parent_death_signal():
    """On Linux, a function making the child get SIGTERM when the test process dies.

    So a test run killed hard (timeout, SIGKILL) leaves no moto server behind.
    Resolved here, in the parent, so the forked child only makes one libc call.
    """
    if not sys.platform.startswith("linux"):
        return None
    try:
        import ctypes

        prctl = ctypes.CDLL("libc.so.6", use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    pr_set_pdeathsig = 1

    def set_signal() -> None:
        prctl(pr_set_pdeathsig, int(signal.SIGTERM))

    return set_signal


_die_with_parent = _parent_death_signal()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class S3Server:
    """One moto_server process bound to 127.0.0.1 on a fixed port."""

    def __init__(self, port: int | None = None, start_timeout_s: float = 30.0):
        self.host = "127.0.0.1"
        self.port = port or _free_port()
        self.start_timeout_s = start_timeout_s
        self.process: subprocess.Popen | None = None
        self.buckets: set[str] = set()
        self._paused = False

    @property
    def endpoint_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def start(self) -> None:
        """Start the server (same port as before) and recreate known buckets (empty)."""
        if self.running:
            return
        self.process = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", self.host, "-p", str(self.port)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            preexec_fn=_die_with_parent,
        )
        self._wait_until_up()
        for bucket in sorted(self.buckets):
            self._create_bucket_now(bucket)

    def _wait_until_up(self) -> None:
        deadline = time.monotonic() + self.start_timeout_s
        while True:
            if self.process is not None and self.process.poll() is not None:
                raise RuntimeError(f"moto server exited with code {self.process.returncode} on start")
            try:
                with urllib.request.urlopen(f"{self.endpoint_url}/moto-api/", timeout=1):
                    return
            except OSError as exc:
                if time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"moto server did not answer on {self.endpoint_url}") from exc
                time.sleep(0.05)

    def stop(self) -> None:
        """Terminate the server; connections to the port are then refused."""
        if self.process is None:
            return
        if self._paused:
            self.resume()
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None

    def restart(self) -> None:
        self.stop()
        self.start()

    def pause(self) -> None:
        """Freeze the server: connects are accepted by the kernel but nothing answers."""
        if self.running and not self._paused:
            os.kill(self.process.pid, signal.SIGSTOP)
            self._paused = True

    def resume(self) -> None:
        if self.process is not None and self._paused:
            os.kill(self.process.pid, signal.SIGCONT)
            self._paused = False

    @contextlib.contextmanager
    def unavailable(self, mode: str = "stopped") -> Iterator[None]:
        """S3 is down inside the block: ``mode`` is "stopped" (refused) or "paused" (hangs)."""
        if mode == "stopped":
            self.stop()
            try:
                yield
            finally:
                self.start()
        elif mode == "paused":
            self.pause()
            try:
                yield
            finally:
                self.resume()
        else:
            raise ValueError(f"mode must be 'stopped' or 'paused', got {mode!r}")

    def client(self):
        import boto3  # only tests need boto3; pyarrow.fs does the real work

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint_url,
            region_name=S3_TEST_ENV["AWS_DEFAULT_REGION"],
            aws_access_key_id=S3_TEST_ENV["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=S3_TEST_ENV["AWS_SECRET_ACCESS_KEY"],
        )

    def create_bucket(self, name: str | None = None) -> str:
        """Create a bucket (a fresh unique one by default) and remember it across restarts."""
        name = name or f"test-{uuid.uuid4().hex[:12]}"
        self._create_bucket_now(name)
        self.buckets.add(name)
        return name

    def _create_bucket_now(self, name: str) -> None:
        client = self.client()
        try:
            client.create_bucket(Bucket=name)
        except client.exceptions.BucketAlreadyOwnedByYou:
            pass

    def storage_config(self, bucket: str | None = None, prefix: str = "", **overrides) -> StorageConfig:
        """A StorageConfig for ``s3://bucket/prefix`` on this server, with short test timeouts."""
        bucket = bucket or self.create_bucket()
        uri = f"s3://{bucket}/{prefix.strip('/')}" if prefix.strip("/") else f"s3://{bucket}"
        settings = {
            "uri": uri,
            "endpoint_url": self.endpoint_url,
            "region": S3_TEST_ENV["AWS_DEFAULT_REGION"],
            "connect_timeout_s": 1.0,
            "request_timeout_s": 1.0,
            "max_attempts": 1,
        }
        settings.update(overrides)
        return StorageConfig(**settings)


class S3Proxy:
    """A loopback TCP proxy in front of the moto server that can take S3 away while moto keeps its objects.

    ``down()`` closes the listening socket and every open connection, so
    clients get "connection refused" at once (moto itself keeps running with
    all its buckets and objects); ``up()`` listens on the same port again.
    Point a StorageConfig at :attr:`endpoint_url` (``storage_config()``).
    """

    def __init__(self, server: S3Server, port: int | None = None):
        self.server = server
        self.host = "127.0.0.1"
        self.port = port or _free_port()
        self._listener: socket.socket | None = None
        self._conns: set[socket.socket] = set()
        self._lock = threading.Lock()
        self.connections = 0

    @property
    def endpoint_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def is_up(self) -> bool:
        return self._listener is not None

    def up(self) -> None:
        if self._listener is not None:
            return
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((self.host, self.port))
        listener.listen(128)
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True, name="s3proxy-accept").start()

    def down(self) -> None:
        listener, self._listener = self._listener, None
        if listener is not None:
            with contextlib.suppress(OSError):
                listener.shutdown(socket.SHUT_RDWR)
            listener.close()
        with self._lock:
            conns, self._conns = list(self._conns), set()
        for conn in conns:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
            conn.close()

    @contextlib.contextmanager
    def outage(self) -> Iterator[None]:
        self.down()
        try:
            yield
        finally:
            self.up()

    def storage_config(self, bucket: str | None = None, prefix: str = "", **overrides) -> StorageConfig:
        config = self.server.storage_config(bucket, prefix, **overrides)
        config.endpoint_url = self.endpoint_url
        return config

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return  # closed by down()
            try:
                upstream = socket.create_connection((self.server.host, self.server.port), timeout=5)
                upstream.settimeout(None)
            except OSError:
                client.close()
                continue
            with self._lock:
                if self._listener is not listener:
                    client.close()
                    upstream.close()
                    return
                self._conns.update((client, upstream))
                self.connections += 1
            for src, dst in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(src, dst), daemon=True, name="s3proxy-pipe").start()

    def _pipe(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (src, dst):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
            with self._lock:
                self._conns.discard(src)
                self._conns.discard(dst)
            src.close()


@pytest.fixture
def s3_proxy(s3_server: S3Server) -> Iterator[S3Proxy]:
    """A fresh S3Proxy (up) in front of the session's moto server; taken down for good after the test."""
    if not s3_server.running:
        s3_server.start()
    s3_server.resume()
    proxy = S3Proxy(s3_server)
    proxy.up()
    try:
        yield proxy
    finally:
        proxy.down()


# One server per test process, shared by every module that imports the fixture:
# importing it into both a conftest and a test module creates two fixture
# definitions, and the reference count keeps that from starting two servers.
_shared: S3Server | None = None
_users = 0
_lock = threading.Lock()


def acquire_server() -> S3Server:
    global _shared, _users
    with _lock:
        if _shared is None:
            server = S3Server()
            server.start()
            _shared = server
        _users += 1
        return _shared


def release_server() -> None:
    global _shared, _users
    with _lock:
        _users -= 1
        if _users == 0 and _shared is not None:
            _shared.stop()
            _shared = None


@pytest.fixture(scope="session")
def s3_server() -> Iterator[S3Server]:
    """A running moto S3 server on 127.0.0.1 for the whole test session."""
    saved = {name: os.environ.get(name) for name in S3_TEST_ENV}
    os.environ.update(S3_TEST_ENV)
    server = acquire_server()
    try:
        yield server
    finally:
        release_server()
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


@pytest.fixture
def s3_storage_config(s3_server: S3Server) -> Iterator[StorageConfig]:
    """A StorageConfig on a fresh bucket; restarts the server first if a test left it down."""
    if not s3_server.running:
        s3_server.start()
    s3_server.resume()
    yield s3_server.storage_config()
