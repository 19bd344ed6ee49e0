"""Token auth for the embedded local Ray (cluster/ray_auth.py).

Unit tests for the token file (0600, refused when others can read it) and the
environment it resolves to; one end-to-end test in subprocesses (their own
embedded Ray, so the session cluster of conftest.py is untouched): a process
that, like the CLI, already read RAY_AUTH_MODE=disabled starts a token cluster
after enable_local_token_auth(), runs a task on it, and a client without the
token is refused.
"""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from banditroute.cluster.ray_auth import (
    MIN_TOKEN_CHARS,
    RayAuthError,
    check_token_file,
    default_token_path,
    ensure_token_file,
    resolve_local_auth,
)


@pytest.fixture
def home(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    return tmp_path / "home"


def test_token_file_is_created_private_and_kept(home):
    path = ensure_token_file(default_token_path())
    assert path == home / ".ray" / "auth_token"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    token = path.read_text()
    assert len(token) == 64 and int(token, 16) >= 0  # 32 random bytes as hex
    assert ensure_token_file(path).read_text() == token  # a second start reuses it


def test_a_token_file_others_can_read_is_refused(tmp_path):
    path = tmp_path / "token"
    path.write_text("a" * 64)
    path.chmod(0o644)  # what Ray's own `ray get-auth-token --generate` leaves under umask 022
    with pytest.raises(RayAuthError, match=r"readable by other users.*chmod 600"):
        ensure_token_file(path)
    path.chmod(0o600)
    check_token_file(path)


@pytest.mark.parametrize("content, message", [("", "0 characters"), ("x" * (MIN_TOKEN_CHARS - 1), "fewer than"),
                                              ("a" * 40 + " b" * 10, "whitespace")])
def test_weak_tokens_are_refused(tmp_path, content, message):
    path = tmp_path / "token"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    os.write(fd, content.encode())
    os.close(fd)
    with pytest.raises(RayAuthError, match=message):
        check_token_file(path)


def test_symlinked_token_file_is_refused(tmp_path):
    target = tmp_path / "real"
    ensure_token_file(target)
    link = tmp_path / "link"
    link.symlink_to(target)
    with pytest.raises(RayAuthError, match="not a regular file"):
        check_token_file(link)


def test_resolve_default_creates_the_token(home):
    auth, env = resolve_local_auth("token", environ={})
    assert env == {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(home / ".ray" / "auth_token")}
    assert auth.mode == "token" and auth.token_source == env["RAY_AUTH_TOKEN_PATH"]
    assert (home / ".ray" / "auth_token").exists()


def test_resolve_explicit_settings_win(home, tmp_path):
    auth, env = resolve_local_auth("token", environ={"RAY_AUTH_MODE": "disabled"})
    assert auth.mode == "disabled" and env == {"RAY_AUTH_MODE": "disabled"}
    assert not (home / ".ray").exists()  # no token made for a disabled cluster
    assert "anyone who reaches" in auth.describe()

    auth, env = resolve_local_auth("token", environ={"RAY_AUTH_TOKEN": "f" * 64})
    assert auth.token_source == "RAY_AUTH_TOKEN" and env == {"RAY_AUTH_MODE": "token"}
    with pytest.raises(RayAuthError, match="RAY_AUTH_TOKEN"):
        resolve_local_auth("token", environ={"RAY_AUTH_TOKEN": "short"})

    missing = tmp_path / "nowhere" / "token"
    with pytest.raises(RayAuthError, match="does not exist"):  # an operator's path is checked, never created
        resolve_local_auth("token", environ={"RAY_AUTH_TOKEN_PATH": str(missing)})
    with pytest.raises(RayAuthError, match="RAY_AUTH_MODE"):
        resolve_local_auth("tokne", environ={})


def test_enable_refuses_once_ray_is_up(monkeypatch):
    import ray

    from banditroute.cluster import ray_auth

    monkeypatch.setattr(ray, "is_initialized", lambda: True)
    with pytest.raises(RayAuthError, match="before ray.init"):
        ray_auth.enable_local_token_auth(environ={})


PROBE = textwrap.dedent("""
    import os, subprocess, sys
    import ray
    from ray._raylet import get_authentication_mode
    get_authentication_mode()  # as the CLI does: Ray has read RAY_AUTH_MODE=disabled and cached it
    if sys.argv[1] == "with-helper":  # the way `banditroute serve`/`up` start their embedded Ray
        from banditroute.cluster.config import AppConfig
        from banditroute.cluster.launch import start_ray
        app = AppConfig()
        app.start.num_cpus = 1
        start_ray(app)
        print("AUTH", os.environ["RAY_AUTH_MODE"], os.environ.get("RAY_AUTH_TOKEN_PATH"), flush=True)
    else:
        ray.init(num_cpus=1, include_dashboard=False)
    gcs_address = ray.get_runtime_context().gcs_address
    print("TASK", ray.get(ray.remote(lambda: 41 + 1).remote()), flush=True)
    outsider = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH")}
    outsider.update(RAY_AUTH_MODE="disabled", HOME=sys.argv[2])
    probe = "import ray, sys; ray.init(address=sys.argv[1]); print('OUTSIDER_CONNECTED')"
    out = subprocess.run([sys.executable, "-c", probe, gcs_address], env=outsider,
                         capture_output=True, text=True, timeout=180)
    print("OUTSIDER", "connected" if "OUTSIDER_CONNECTED" in out.stdout else "refused", flush=True)
    ray.shutdown()
""")


@pytest.mark.slow
def test_embedded_cluster_refuses_a_client_without_the_token(tmp_path):
    home = tmp_path / "home"
    outsider_home = tmp_path / "outsider"
    outsider_home.mkdir()
    env = {**os.environ, "HOME": str(home), "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_AUTH_TOKEN", None)
    env.pop("RAY_AUTH_TOKEN_PATH", None)
    # The helper is told "token"; the CLI's explicit RAY_AUTH_MODE=disabled would win, so it is unset here.
    env.pop("RAY_AUTH_MODE")
    script = tmp_path / "probe.py"
    script.write_text(PROBE)
    result = subprocess.run([sys.executable, str(script), "with-helper", str(outsider_home)], env=env,
                            capture_output=True, text=True, timeout=400)
    lines = [line for line in result.stdout.splitlines() if line.split(" ", 1)[0] in {"AUTH", "TASK", "OUTSIDER"}]
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    assert lines == [f"AUTH token {home / '.ray' / 'auth_token'}",
                     "TASK 42", "OUTSIDER refused"], result.stderr[-4000:]
    assert stat.S_IMODE((home / ".ray" / "auth_token").stat().st_mode) == 0o600
