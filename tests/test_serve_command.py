"""`banditroute serve` learns by default and `--frozen` takes no feedback (issue 13).

- the flags and defaults (SERVE_DEFAULTS: the loop on, storage runs/serve/storage) and the early checks;
- /v1/feedback of a frozen router: a 405 naming the reason, never a 5xx (unit, then live on the session's Ray);
- done-when: `banditroute serve --policy CKPT` in its own process (the real CLI entry point, its own local
  Ray), then route + feedback over HTTP, moves the served policy version with no other process running.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import uuid

import httpx
import numpy as np
import pytest

from conftest import free_port, wait_until

from banditroute.cli import build_parser
from banditroute.cli.commands.serve import overrides_from_flags
from banditroute.cluster.runner import DEFAULT_SERVE_STORAGE, check_serve, load_serve_config
from banditroute.core.config import ConfigError
from banditroute.serve.config import RouterConfig
from banditroute.serve.feedback_endpoint import feedback_target, handle_feedback
from banditroute.serve.protocol import RequestError
from banditroute.serve.testing import hashing_policy, synthetic_routing_data


def _serve_config(argv: list[str]):
    args = build_parser().parse_args(["serve", *argv])
    return load_serve_config(args.config, overrides_from_flags(args), environ={}, frozen=args.frozen)


def test_serve_runs_the_loop_by_default_over_local_storage(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    app = _serve_config(["--policy", "ckpt/p"])
    assert app.online.enabled and app.online.initial_policy == "ckpt/p"
    assert app.storage.uri == str((tmp_path / DEFAULT_SERVE_STORAGE).resolve())  # absolute: actors may run elsewhere
    assert app.router.parameter_server_name == "banditroute-parameter-server"

    app = _serve_config(["--policy", "s3://b/seed", "--storage", "store", "--set", "learner.promotion.enabled=false"])
    assert app.storage.uri == str(tmp_path / "store") and not app.learner.promotion.enabled
    assert app.online.initial_policy == "s3://b/seed"


def test_frozen_serves_the_checkpoint_without_a_loop(tmp_path):
    app = _serve_config(["--frozen", "--policy", str(tmp_path / "p")])
    assert not app.online.enabled and app.router.policy == str(tmp_path / "p")
    assert app.router.decision_sink != "feedback-actor" and app.router.parameter_server_name is None
    check_serve(app)  # nothing to check: the router loads the policy itself
    with pytest.raises(ConfigError, match=r"router\.policy.*--policy"):
        _serve_config(["--frozen"])


def test_serve_fails_early_without_a_starting_point_or_with_an_unknown_policy_kind(tmp_path):
    with pytest.raises(ValueError, match=r"holds no checkpoint yet.*--policy"):
        check_serve(_serve_config(["--storage", str(tmp_path / "empty")]))
    for kind in ("identity", "mystery"):
        folder = tmp_path / kind
        folder.mkdir()
        (folder / "meta.json").write_text(json.dumps({"kind": kind}))
        (folder / "policy.pt").write_bytes(b"")
    # every registered kind is trained online (barp, value, identity); an unknown one is named before Ray starts
    check_serve(_serve_config(["--policy", str(tmp_path / "identity"), "--storage", str(tmp_path / "s")]))
    with pytest.raises(ValueError, match="unknown policy kind 'mystery'"):
        check_serve(_serve_config(["--policy", str(tmp_path / "mystery"), "--storage", str(tmp_path / "s")]))
    check_serve(_serve_config(["--policy", str(hashing_policy().save(tmp_path / "barp")), "--storage", str(tmp_path / "s")]))


def test_feedback_on_a_frozen_router_is_a_405_before_anything_else():
    target = feedback_target(RouterConfig(policy="p", decision_sink="local"))
    assert target == {"name": None, "namespace": None}
    with pytest.raises(RequestError) as exc:
        asyncio.run(handle_feedback({"decision_id": "x", "score": 5}, **target))  # even an invalid body
    assert exc.value.status == 405 and exc.value.field is None and "frozen" in exc.value.message
    assert exc.value.headers == {"Allow": ""}
    wired = RouterConfig(policy="p", decision_sink="feedback-actor", decision_sink_options={"name": "f", "namespace": "n"})
    assert feedback_target(wired) == {"name": "f", "namespace": "n"}


@pytest.mark.ray
def test_frozen_router_answers_feedback_with_405_over_http(serve_instance, tmp_path):
    from banditroute.cluster.runner import start_application, stop_application

    data = synthetic_routing_data(8)
    ckpt = hashing_policy(models=data.models).save(tmp_path / "policy")
    name = f"frozen{uuid.uuid4().hex[:6]}"
    app = _serve_config(["--frozen", "--policy", str(ckpt), "--set", f"router.app_name={name}",
                         "--set", "router.num_cpus=0.1", "--set", "router.ingress_num_cpus=0.1", "--set", "router.num_gpus=0",
                         "--set", f"router.decision_sink_options.path={tmp_path / 'decisions'}"])
    running = start_application(app, ready_timeout_s=120)
    try:
        assert running.loop is None
        with httpx.Client(base_url=running.base_url, timeout=30, trust_env=False) as client:
            decision = client.post("/v1/route", json={"prompt": data.prompts[0]})
            assert decision.status_code == 200, decision.text
            fb = client.post("/v1/feedback", json={"decision_id": decision.json()["decision_id"], "score": 1.0})
        assert fb.status_code == 405, fb.text
        error = fb.json()["error"]
        assert error["field"] is None and "frozen" in error["message"] and "--frozen" in error["message"]
    finally:
        stop_application(running)


# --- done-when: the real CLI in its own process, nothing else running ---------------------------------------------

CLI = [sys.executable, "-c", "import sys; from banditroute.cli import main; sys.exit(main(sys.argv[1:]))"]


def _healthz(base: str) -> dict | None:
    try:
        r = httpx.get(base + "/healthz", timeout=5, trust_env=False)
    except httpx.HTTPError:
        return None
    return r.json() if r.status_code == 200 else None


@pytest.mark.slow
def test_serve_command_learns_from_feedback_over_http(tmp_path):
    data = synthetic_routing_data(40, seed=1)
    ckpt = hashing_policy(models=data.models).save(tmp_path / "policy")
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # its own local Ray, not the session's
    log = (tmp_path / "serve.log").open("w")
    argv = ["serve", "--policy", str(ckpt), "--storage", str(tmp_path / "storage"), "--port", str(port), "--replicas", "1",
            "--num-cpus", "4", "--set", "router.num_cpus=0.2", "--set", "router.ingress_num_cpus=0.1",
            "--set", "router.num_gpus=0", "--set", "router.torch_threads=1", "--set", "router.weights_poll_timeout_s=2",
            "--set", "online.learner_num_cpus=0.1", "--set", "online.feedback_num_cpus=0.1",
            # every update is served (the gate has its own tests), in batches of 8 rewards
            "--set", "learner.promotion.enabled=false", "--set", "feedback.learner_batch_size=8",
            "--set", "feedback.learner_max_delay_s=0.05"]
    proc = subprocess.Popen(CLI + argv, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=tmp_path, start_new_session=True)

    def output(tail: int = 4000) -> str:
        log.flush()
        return (tmp_path / "serve.log").read_text()[-tail:]

    try:
        def ready() -> dict | None:
            if proc.poll() is not None:
                pytest.fail(f"banditroute serve exited ({proc.returncode}):\n{output()}")
            return _healthz(base)

        health = wait_until(ready, 300, interval_s=1.0, what="banditroute serve to answer /healthz")
        start_version = int(health["policy_version"])
        rng = np.random.default_rng(0)
        with httpx.Client(base_url=base, timeout=30, trust_env=False) as client:
            for _ in range(40):
                row = int(rng.integers(len(data)))
                w = float(rng.uniform())
                r = client.post("/v1/route", json={"prompt": data.prompts[row], "preference": {"quality": 1 - w, "cost": w}})
                assert r.status_code == 200, r.text
                k = data.models.index(r.json()["model"])
                fb = client.post("/v1/feedback", json={"decision_id": r.json()["decision_id"],
                                                       "score": float(data.scores[row, k]), "cost": float(data.costs[row, k])})
                assert fb.status_code == 200 and fb.json()["status"] == "accepted", fb.text
        moved = wait_until(lambda: (h := _healthz(base)) and h["policy_version"] > start_version and h, 120, interval_s=1.0,
                           what="the served policy version to move")
        assert moved["policy_version"] > start_version

        proc.send_signal(signal.SIGINT)  # Ctrl-C: drain, final checkpoint, everything down
        assert proc.wait(timeout=120) == 0, output()
        printed = output(tail=10**7)
        assert "learning online: storage" in printed and f"started from {ckpt}" in printed and "shutting down" in printed
        checkpoints = [p for p in (tmp_path / "storage").rglob("meta.json")]
        assert checkpoints, "the final checkpoint is in storage (the next start resumes from it)"
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
        log.close()
