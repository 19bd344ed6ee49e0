"""Shared fixtures: ONE local Ray cluster per test session, Serve on a free loopback port.

Tests that need Ray take the ``ray_cluster`` fixture (or ``serve_instance``,
which also starts Serve's HTTP proxy). Every Serve application a test deploys
is deleted after it, so tests stay independent without restarting Ray.
"""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path

import pytest

# Before Ray is imported anywhere: local runs need no token auth, send no usage stats.
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# The decision-token secret every RouterIngress replica needs (security.token_secret_env's default name);
# tests that sign or verify tokens themselves read it from os.environ.
TOKEN_SECRET_ENV = "BANDITROUTE_TOKEN_SECRET"
os.environ.setdefault(TOKEN_SECRET_ENV, "test-secret-" + os.urandom(16).hex())
# API keys per endpoint group for apps deployed with security.*_api_keys_env naming these (test_security, test_fuzz).
TEST_API_KEYS = {"BANDITROUTE_TEST_ROUTE_KEYS": "route-key-1,route-key-2", "BANDITROUTE_TEST_FEEDBACK_KEYS": "feedback-key-1",
                 "BANDITROUTE_TEST_ADMIN_KEYS": "admin-key-1"}
os.environ.update(TEST_API_KEYS)


from banditroute.testkit.s3server import S3_TEST_ENV, s3_server, s3_storage_config  # noqa: E402,F401  (a real moto_server on loopback)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def ray_cluster():
    """A local Ray with more logical CPUs than cores: actors in tests take fractions of them."""
    import ray

    if not ray.is_initialized():
        ray.init(
            num_cpus=8,
            include_dashboard=False,
            log_to_driver=False,
            # S3 credentials of the moto server (any value works there), so actors on S3 storage can sign requests.
            runtime_env={"env_vars": {"RAY_AUTH_MODE": "disabled", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
                                      **S3_TEST_ENV, TOKEN_SECRET_ENV: os.environ[TOKEN_SECRET_ENV], **TEST_API_KEYS}},
        )
    yield ray
    try:
        from ray import serve

        serve.shutdown()
    except Exception:
        pass
    ray.shutdown()


@pytest.fixture(scope="session")
def serve_http_port(ray_cluster) -> int:
    """Serve's HTTP proxy on 127.0.0.1:<free port>, started once per session."""
    from ray import serve

    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    return port


@pytest.fixture
def serve_instance(serve_http_port):
    """Serve running; every application deployed during the test is deleted after it."""
    from ray import serve

    yield serve_http_port
    for name in list(serve.status().applications):
        serve.delete(name)
